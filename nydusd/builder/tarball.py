"""Tar sources (``--type tar-rafs``): stream an OCI layer tar into builder nodes.

Owns: ``open_tar_stream`` (plain / gzip / zstd detected by magic; path, ``-`` for stdin, FIFO or
character device, or a binary file object) and ``read_tarball`` (one forward pass over the
entries, never extracting anything to disk: each regular file's bytes go straight to a callback,
the chunk pipeline, while the tar is read).

Entry rules (documented divergences from upstream in ``nydus-image create --help``):
* names are normalised like GNU tar extraction: leading ``/`` and ``./`` and empty / ``.``
  components are dropped; a ``..`` component is rejected (BuildError);
* a name longer than 255 bytes in any component is rejected, and so is a normalised path whose
  absolute form ``/a/b`` does not fit Linux PATH_MAX (4096 bytes with the NUL): no real rootfs can
  hold it, and refusing it bounds the path depth (tar names are otherwise unbounded in PAX);
* uid and gid must be 0..2^32-1 and a size must not be negative (BuildError naming the entry and
  field). A negative mtime (a file dated before 1970) is clamped to 0 and one beyond 2^64-1 to
  2^64-1, as RAFS stores an unsigned 64-bit mtime (debug event ``tar_mtime_clamped``);
* a duplicate name is rejected, except a directory listed again as a directory (its attributes
  are updated, as tar extraction would);
* a hard link must name an earlier entry of the tar or, when the layer is built on a parent image
  (``lower``), a file of that image: a later layer may re-link a file of a lower one (docker save
  produces such layers). That is applied as containerd applies it on overlayfs (``link(2)`` to the
  copied-up lower file): the new name joins the lower file's hard-link group (same inode, same
  data, nlink + 1; the lower name stays as it is). Entries already read take precedence, so a link
  that precedes a replacement of its target in the same tar keeps the lower file, and a target this
  tar already deleted (whiteout, opaque directory, an ancestor replaced by a non-directory) is gone.
  A link to a missing entry or to a directory is rejected; a link to a non-regular entry copies
  it (RAFS groups only regular files);
* symlink targets are stored verbatim (they may point anywhere) and never followed;
* missing parent directories are created 0755 root:root with mtime 0 (as upstream), marked
  ``implicit`` so that, stacked on a parent, they do not reset the parent's directory attributes.
Must not import rafs. Threading: single-threaded; the callback runs in the reading thread.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import stat
import sys
import tarfile
import zlib
from collections.abc import Callable, Iterator
from typing import BinaryIO

from nydusd.builder.options import WhiteoutSpec
from nydusd.builder.tree import (
    OCI_OPAQUE,
    OCI_WHITEOUT_PREFIX,
    FileData,
    Node,
    check_name,
    check_xattr,
    is_overlay_opaque,
    is_whiteout,
    keep_xattr,
    lookup_path,
    new_dir,
)
from nydusd.compress import stream_decompressor
from nydusd.errors import BuildError
from nydusd.log import get_logger

log = get_logger(__name__)

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
XATTR_PAX_PREFIX = "SCHILY.xattr."
PATH_MAX = 4096  # Linux, including the terminating NUL
ID_MAX = (1 << 32) - 1
MTIME_MAX = (1 << 64) - 1

FileCallback = Callable[[FileData, BinaryIO, str], None]


class _Prepended(io.RawIOBase):
    """A read-only stream: ``head`` bytes already consumed by magic sniffing, then ``rest``."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self._head = head
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = len(b)
        if self._head:
            k = min(n, len(self._head))
            b[:k] = self._head[:k]
            self._head = self._head[k:]
            return k
        data = self._rest.read(n)
        if not data:
            return 0
        b[:len(data)] = data
        return len(data)


class _Guarded(io.RawIOBase):
    """Turns a decompressor's own exception types into OSError (its library has one home)."""

    def __init__(self, inner: BinaryIO) -> None:
        self._inner = inner

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        try:
            data = self._inner.read(len(b))
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001 - zstandard.ZstdError and friends
            raise OSError(f"corrupt compressed stream: {e}") from None
        b[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self._inner.close()
        super().close()


def _read_head(stream: BinaryIO, n: int) -> bytes:
    head = b""
    while len(head) < n:
        more = stream.read(n - len(head))
        if not more:
            break
        head += more
    return head


@contextlib.contextmanager
def open_tar_stream(source: str | os.PathLike[str] | BinaryIO) -> Iterator[BinaryIO]:
    """Yield the *uncompressed* tar byte stream of ``source`` (sequential reads only).

    Raises BuildError if the path cannot be opened or is a directory / other non-stream file.
    """
    with contextlib.ExitStack() as stack:
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            if path == "-":
                raw: BinaryIO = sys.stdin.buffer
            else:
                try:
                    st = os.stat(path)
                except OSError as e:
                    raise BuildError(f"cannot access tar source: {e.strerror}", path=path) from None
                if not (stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode)):
                    raise BuildError("tar source must be a regular file, FIFO or character device",
                                     path=path)
                try:
                    raw = stack.enter_context(open(path, "rb"))  # noqa: SIM115 - ExitStack closes
                except OSError as e:
                    raise BuildError(f"cannot open tar source: {e.strerror}", path=path) from None
        else:
            raw = source
        head = _read_head(raw, 4)
        joined = io.BufferedReader(_Prepended(head, raw), buffer_size=1 << 20)
        if head.startswith(GZIP_MAGIC):
            yield stack.enter_context(gzip.GzipFile(fileobj=joined, mode="rb"))  # type: ignore[misc]
        elif head.startswith(ZSTD_MAGIC):
            reader = stream_decompressor("zstd").stream_reader(joined, read_across_frames=True)
            yield stack.enter_context(io.BufferedReader(_Guarded(reader), buffer_size=1 << 20))
        else:
            yield joined


def _split_name(name: str) -> list[bytes]:
    raw = os.fsencode(name)
    parts = [p for p in raw.split(b"/") if p and p != b"."]
    if b".." in parts:
        raise BuildError("tar entry name contains '..'", path=name)
    for p in parts:
        check_name(p, name)
    # "/" + components joined by "/" + NUL must fit PATH_MAX
    if sum(len(p) + 1 for p in parts) + 1 > PATH_MAX:
        raise BuildError(f"tar entry path longer than PATH_MAX ({PATH_MAX} bytes)", path=name[:256] + "...",
                         depth=len(parts))
    return parts


def _raw_mtime(info: tarfile.TarInfo) -> tuple[int, int]:
    text = info.pax_headers.get("mtime")
    if text:
        sec, _, frac = text.partition(".")
        try:
            if frac and sec.startswith("-"):  # "-1.25" is 1.25 s before the epoch
                ns = int((frac + "000000000")[:9])
                return (int(sec) - 1, 1_000_000_000 - ns) if ns else (int(sec), 0)
            return int(sec), int((frac + "000000000")[:9]) if frac else 0
        except ValueError:
            pass
    return int(info.mtime), 0


def _mtime(info: tarfile.TarInfo) -> tuple[int, int]:
    """Seconds and nanoseconds, clamped into RAFS's unsigned 64-bit range."""
    sec, nsec = _raw_mtime(info)
    if 0 <= sec <= MTIME_MAX:
        return sec, nsec
    log.debug("tar_mtime_clamped", path=info.name, mtime=sec)
    return (0, 0) if sec < 0 else (MTIME_MAX, 0)


def _check_numbers(info: tarfile.TarInfo) -> None:
    for field, value in (("uid", info.uid), ("gid", info.gid)):
        if not 0 <= value <= ID_MAX:
            raise BuildError(f"tar entry {field} {value} out of range 0..{ID_MAX}", path=info.name,
                             field=field)
    if info.size < 0:
        raise BuildError(f"tar entry size {info.size} is negative", path=info.name, field="size")


def _node_for(info: tarfile.TarInfo, name: bytes) -> Node:
    _check_numbers(info)
    mtime, nsec = _mtime(info)
    perm = info.mode & 0o7777
    node = Node(name=name, mode=perm, uid=info.uid, gid=info.gid, mtime=mtime, mtime_nsec=nsec)
    for key, value in sorted(info.pax_headers.items()):
        if key.startswith(XATTR_PAX_PREFIX):
            xname = os.fsencode(key[len(XATTR_PAX_PREFIX):])
            xval = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else bytes(value)
            if keep_xattr(xname):
                check_xattr(xname, xval, info.name)
                node.xattrs[xname] = xval
    if info.isreg():
        node.mode |= stat.S_IFREG
        node.data = FileData(size=info.size)
    elif info.isdir():
        node.mode |= stat.S_IFDIR
        node.children = {}
    elif info.issym():
        node.mode |= stat.S_IFLNK
        node.symlink = os.fsencode(info.linkname)
        if not node.symlink or len(node.symlink) > 4096:
            raise BuildError("symlink target must be 1..4096 bytes", path=info.name)
    elif info.ischr() or info.isblk():
        node.mode |= stat.S_IFCHR if info.ischr() else stat.S_IFBLK
        node.rdev = os.makedev(info.devmajor, info.devminor)
    elif info.isfifo():
        node.mode |= stat.S_IFIFO
    else:
        raise BuildError(f"unsupported tar entry type {info.type!r}", path=info.name)
    return node


class _TarTree:
    def __init__(self, lower: Node | None = None, whiteout_spec: WhiteoutSpec = WhiteoutSpec.OCI) -> None:
        self.root = new_dir(b"/")
        self.root.implicit = True
        self.lower = lower
        self.spec = whiteout_spec
        # what this tar has deleted from the lower image so far (hard links must not reach it)
        self.whiteouts: set[tuple[bytes, ...]] = set()
        self.opaque: set[tuple[bytes, ...]] = set()

    def find(self, parts: tuple[bytes, ...] | list[bytes]) -> Node | None:
        """The entry this tar has read (or implied) at ``parts``, walking the tree (linear in depth)."""
        node = self.root
        for p in parts:
            if node.children is None:
                return None
            child = node.children.get(p)
            if child is None:
                return None
            node = child
        return node

    def parent_of(self, parts: list[bytes], name: str) -> Node:
        node = self.root
        for p in parts[:-1]:
            assert node.children is not None
            child = node.children.get(p)
            if child is None:
                child = new_dir(p)
                child.implicit = True
                node.children[p] = child
            elif not child.is_dir:
                raise BuildError("tar entry lies below a non-directory", path=name)
            node = child
        return node

    def add(self, parts: list[bytes], node: Node, name: str) -> None:
        if not parts:  # the root entry ("./"): attributes only
            if not node.is_dir:
                raise BuildError("tar root entry is not a directory", path=name)
            self._update_dir(self.root, node)
            return
        parent = self.parent_of(parts, name)
        assert parent.children is not None
        old = parent.children.get(parts[-1])
        if old is not None:
            if old.is_dir and node.is_dir:
                self._update_dir(old, node)
                return
            raise BuildError("duplicate tar entry", path=name)
        parent.children[parts[-1]] = node

    @staticmethod
    def _update_dir(old: Node, new: Node) -> None:
        old.mode, old.uid, old.gid = new.mode, new.uid, new.gid
        old.mtime, old.mtime_nsec, old.xattrs = new.mtime, new.mtime_nsec, new.xattrs
        old.implicit = False

    def note_whiteout(self, parts: list[bytes], node: Node) -> None:
        """Remember what a whiteout marker of this tar removes from the lower image."""
        key = tuple(parts)
        if self.spec is WhiteoutSpec.OCI and parts and parts[-1] == OCI_OPAQUE:
            self.opaque.add(key[:-1])
        elif self.spec is WhiteoutSpec.OCI and parts and parts[-1].startswith(OCI_WHITEOUT_PREFIX):
            self.whiteouts.add(key[:-1] + (parts[-1][len(OCI_WHITEOUT_PREFIX):],))
        elif is_whiteout(node, self.spec):
            self.whiteouts.add(key)
        elif self.spec is WhiteoutSpec.OVERLAYFS and is_overlay_opaque(node):
            self.opaque.add(key)

    def _deleted_below(self, target: tuple[bytes, ...]) -> bool:
        """Whether the entries read so far hide the lower image's ``target``."""
        mine: Node | None = self.root
        for i in range(len(target) + 1):
            prefix = target[:i]  # paths are bounded by PATH_MAX, so these slices stay small
            if prefix in self.whiteouts:
                return True
            if i < len(target):
                if prefix in self.opaque:
                    return True
                if mine is not None:
                    if mine.children is None:  # this tar replaced the ancestor by a non-directory
                        return True
                    mine = mine.children.get(target[i])
        return False

    def _link_target(self, info: tarfile.TarInfo) -> Node:
        key = tuple(_split_name(info.linkname))
        target = self.find(key)
        if target is not None:
            return target
        if self.lower is None:
            raise BuildError("hard link to a missing or later tar entry", path=info.name,
                             target=info.linkname)
        if self._deleted_below(key):
            raise BuildError("hard link to a lower-layer file this layer deleted", path=info.name,
                             target=info.linkname)
        target = lookup_path(self.lower, b"/".join(key)) if key else self.lower
        if target is None:
            raise BuildError("hard link to a missing or later tar entry (not in the parent image "
                             "either)", path=info.name, target=info.linkname)
        log.debug("tar_hardlink_to_lower_layer", path=info.name, target=info.linkname)
        return target

    def hardlink(self, info: tarfile.TarInfo, parts: list[bytes]) -> Node:
        target = self._link_target(info)
        if target.is_dir:
            raise BuildError("hard link to a directory", path=info.name, target=info.linkname)
        if target.is_reg:
            return Node(name=parts[-1], mode=target.mode, uid=target.uid, gid=target.gid,
                        mtime=target.mtime, mtime_nsec=target.mtime_nsec, xattrs=target.xattrs,
                        data=target.data)
        return Node(name=parts[-1], mode=target.mode, uid=target.uid, gid=target.gid,
                    mtime=target.mtime, mtime_nsec=target.mtime_nsec, rdev=target.rdev,
                    xattrs=dict(target.xattrs), symlink=target.symlink)


def read_tarball(stream: BinaryIO, on_file: FileCallback, *, lower: Node | None = None,
                 whiteout_spec: WhiteoutSpec = WhiteoutSpec.OCI) -> Node:
    """Read every entry of the (uncompressed) tar ``stream``; returns the tree root.

    ``on_file(data, reader, path)`` must consume exactly ``data.size`` bytes of each regular file.
    ``lower`` is the parent image's tree the layer will be stacked on (read only here): hard links
    may name its files, and the returned nodes then share their ``FileData`` (``whiteout_spec`` says
    which entries of this tar delete lower files). Raises BuildError for a malformed tar or an entry
    breaking the rules in the module docstring.
    """
    tree = _TarTree(lower, whiteout_spec)
    try:
        tf = tarfile.open(fileobj=stream, mode="r|", errorlevel=2)  # noqa: SIM115 - closed below
    except (tarfile.TarError, OSError, EOFError) as e:
        raise BuildError(f"not a tar stream: {e}") from None
    count = 0
    with tf:
        try:
            for info in tf:
                count += 1
                _add_entry(tree, tf, info, on_file)
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            raise BuildError(f"malformed tar stream: {e}", entries=count) from None
    log.debug("tarball_read", entries=count)
    return tree.root


def _add_entry(tree: _TarTree, tf: tarfile.TarFile, info: tarfile.TarInfo, on_file: FileCallback) -> None:
    parts = _split_name(info.name)
    if info.islnk():
        if not parts:
            raise BuildError("hard link entry without a name", path=info.name)
        tree.add(parts, tree.hardlink(info, parts), info.name)
        return
    node = _node_for(info, parts[-1] if parts else b"/")
    if tree.lower is not None:
        tree.note_whiteout(parts, node)
    if node.data is not None:
        if not parts:
            raise BuildError("tar root entry is not a directory", path=info.name)
        reader = tf.extractfile(info)
        assert reader is not None
        tree.add(parts, node, info.name)
        on_file(node.data, reader, info.name)  # type: ignore[arg-type]
        return
    tree.add(parts, node, info.name)
