"""File-by-file views of an image's root filesystem, for ``nydusify check``.

Owns: ``Entry`` (what is compared per path: st_mode, uid, gid, size, rdev, symlink target, xattrs,
sha256 of the content), ``oci_rootfs`` (the rootfs an OCI runtime sees: layer tars applied bottom-up
with OCI whiteouts and opaque markers, hard links resolved) , ``nydus_rootfs`` (the same view read
from a RAFS bootstrap and its blobs, every chunk decompressed and digest-verified) and ``compare``
(every difference, as readable lines). Must not import requests or the registry client: callers
pass tar streams and a blob reader. Threading: single-threaded, pure over its inputs.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import IO, Any

from nydusd.converter.layer_stream import safe_member_name
from nydusd.errors import BuildError, IntegrityError
from nydusd.rafs import RafsSuper
from nydusd.storage.chunk import decode_chunk

WH_PREFIX = ".wh."
WH_OPAQUE = ".wh..wh..opq"
XATTR_PAX = "SCHILY.xattr."

_TYPE_BITS = {tarfile.REGTYPE: stat.S_IFREG, tarfile.AREGTYPE: stat.S_IFREG,
              tarfile.CONTTYPE: stat.S_IFREG, tarfile.DIRTYPE: stat.S_IFDIR,
              tarfile.SYMTYPE: stat.S_IFLNK, tarfile.CHRTYPE: stat.S_IFCHR,
              tarfile.BLKTYPE: stat.S_IFBLK, tarfile.FIFOTYPE: stat.S_IFIFO}


@dataclass(frozen=True)
class Entry:
    mode: int
    uid: int = 0
    gid: int = 0
    size: int = 0
    rdev: int = 0
    link: bytes | None = None
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    sha256: str | None = None

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


def _xattrs(ti: tarfile.TarInfo) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for key, value in ti.pax_headers.items():
        if key.startswith(XATTR_PAX):
            out[key[len(XATTR_PAX):].encode("utf-8", "surrogateescape")] = value.encode(
                "utf-8", "surrogateescape")
    return out


def _entry(ti: tarfile.TarInfo, tar: tarfile.TarFile) -> Entry:
    kind = _TYPE_BITS.get(ti.type)
    if kind is None:
        raise BuildError("unsupported tar entry type", path=ti.name, type=ti.type.decode(errors="replace"))
    digest = None
    size = 0
    if kind == stat.S_IFREG:
        h = hashlib.sha256()
        f = tar.extractfile(ti)
        if f is not None:
            while data := f.read(1 << 20):
                h.update(data)
        digest, size = h.hexdigest(), ti.size
    rdev = os.makedev(ti.devmajor, ti.devminor) if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0
    link = ti.linkname.encode("utf-8", "surrogateescape") if kind == stat.S_IFLNK else None
    return Entry(mode=kind | (ti.mode & 0o7777), uid=ti.uid, gid=ti.gid, size=size, rdev=rdev, link=link,
                 xattrs=_xattrs(ti), sha256=digest)


def _remove_subtree(tree: dict[str, Entry], path: str, *, keep_self: bool = False) -> None:
    prefix = path.rstrip("/") + "/"
    for p in [p for p in tree if p.startswith(prefix) and p != "/"]:
        del tree[p]
    if not keep_self and path != "/":
        tree.pop(path, None)


def _ensure_parents(tree: dict[str, Entry], path: str) -> None:
    parent = os.path.dirname(path)
    missing: list[str] = []
    while parent not in tree:
        missing.append(parent)
        parent = os.path.dirname(parent)
    for p in reversed(missing):
        tree[p] = Entry(mode=stat.S_IFDIR | 0o755)


def _ancestors(path: str) -> list[str]:
    out = []
    while path != "/":
        path = os.path.dirname(path)
        out.append(path)
    return out


def _link_target(tree: dict[str, Entry], layer: dict[str, Entry], whiteouts: list[str],
                 opaque: list[str], path: str, target: str) -> Entry:
    """What a hard link names, at its place in the tar: an entry of this layer read before it, else
    a lower file this layer has not deleted so far (as containerd applies a layer, in order)."""
    found = layer.get(target)
    if found is None:
        above = _ancestors(target)
        gone = set(whiteouts)
        hidden = (target in gone or any(a in gone or a in opaque for a in above)
                  or any(a in layer and not layer[a].is_dir for a in above))
        found = None if hidden else tree.get(target)
    if found is None or found.is_dir:
        raise BuildError("hard link to a missing or non-regular file", path=path, target=target)
    return found


def apply_layer(tree: dict[str, Entry], tar_stream: IO[bytes] | Any) -> None:
    """Apply one uncompressed layer tar to ``tree`` (path -> Entry, root ``/``). Whiteouts act on
    the lower layers only; hard links may name entries of this layer read before them or files
    of the layers below. Raises BuildError for entries leaving the root or a dangling hard link,
    IntegrityError for a corrupt tar."""
    whiteouts: list[str] = []
    opaque: list[str] = []
    layer: dict[str, Entry] = {}
    entries: list[tuple[str, Entry]] = []
    try:
        with tarfile.open(fileobj=tar_stream, mode="r|") as tar:
            for ti in tar:
                path = "/" + safe_member_name(ti.name)
                base = os.path.basename(path)
                if base == WH_OPAQUE:
                    opaque.append(os.path.dirname(path))
                    continue
                if base.startswith(WH_PREFIX):
                    whiteouts.append(os.path.join(os.path.dirname(path), base[len(WH_PREFIX):]))
                    continue
                if ti.type == tarfile.LNKTYPE:
                    entry = _link_target(tree, layer, whiteouts, opaque, path,
                                         "/" + safe_member_name(ti.linkname))
                else:
                    entry = _entry(ti, tar)
                entries.append((path, entry))
                layer[path] = entry
    except tarfile.TarError as e:
        raise IntegrityError(f"layer is not a valid tar: {e}") from None
    for d in opaque:
        _remove_subtree(tree, d, keep_self=True)
    for w in whiteouts:
        _remove_subtree(tree, w)
    for path, entry in entries:
        old = tree.get(path)
        if old is not None and not (old.is_dir and entry.is_dir):
            _remove_subtree(tree, path)
        if path != "/":
            _ensure_parents(tree, path)
        tree[path] = entry


def oci_rootfs(layers: Iterable[IO[bytes] | Any]) -> dict[str, Entry]:
    tree: dict[str, Entry] = {"/": Entry(mode=stat.S_IFDIR | 0o755)}
    for layer in layers:
        apply_layer(tree, layer)
    return tree


#: ``read_blob(blob_id, offset, size)`` -> the stored bytes of that range of a blob
ReadBlobRange = Callable[[str, int, int], bytes]


def nydus_rootfs(rs: RafsSuper, read_blob: ReadBlobRange) -> dict[str, Entry]:
    """The tree of a RAFS image; ``read_blob(blob_id, offset, size)`` returns stored chunk bytes.
    Raises IntegrityError when a chunk fails to decompress or verify."""
    tree: dict[str, Entry] = {}
    hashed: dict[int, str] = {}
    for raw_path, inode in rs.walk():
        path = raw_path.decode("utf-8", "surrogateescape") or "/"
        digest = None
        if inode.is_reg:
            digest = hashed.get(inode.ino)
            if digest is None:
                digest = hashed[inode.ino] = _hash_file(rs, inode.ino, inode.size, read_blob, path)
        fmt = stat.S_IFMT(inode.mode)
        tree[path] = Entry(
            mode=inode.mode, uid=inode.uid, gid=inode.gid, size=inode.size if inode.is_reg else 0,
            rdev=inode.rdev if fmt in (stat.S_IFCHR, stat.S_IFBLK) else 0,
            link=rs.readlink(inode.ino) if inode.is_symlink else None,
            xattrs=dict(rs.xattrs(inode.ino)) if inode.has_xattr else {}, sha256=digest)
    return tree


def _hash_file(rs: RafsSuper, ino: int, size: int, read_blob: ReadBlobRange, path: str) -> str:
    h = hashlib.sha256()
    total = 0
    for chunk in rs.chunks(ino):
        blob = rs.blobs[chunk.blob_index]
        payload = read_blob(blob.blob_id, chunk.compressed_offset, chunk.compressed_size)
        data = decode_chunk(payload, chunk, blob, verify=True)
        h.update(data)
        total += len(data)
    if total != size:
        raise IntegrityError("file chunks do not add up to its size", path=path, size=size, chunks_size=total)
    return h.hexdigest()


def dir_rootfs(root: str | os.PathLike[str]) -> dict[str, Entry]:
    """The same view of a directory tree on disk (an unpacked rootfs or a nydusd mount)."""
    tree: dict[str, Entry] = {}
    base = os.fspath(root)
    for dirpath, dirnames, filenames in os.walk(base):
        rel = os.path.relpath(dirpath, base)
        prefix = "/" if rel == "." else "/" + rel + "/"
        if rel == ".":
            tree["/"] = _dir_entry(dirpath)
        for name in sorted(dirnames + filenames):
            tree[prefix + name] = _dir_entry(os.path.join(dirpath, name))
    return tree


def _dir_entry(path: str) -> Entry:
    st = os.lstat(path)
    fmt = stat.S_IFMT(st.st_mode)
    digest = None
    if fmt == stat.S_IFREG:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while data := f.read(1 << 20):
                h.update(data)
        digest = h.hexdigest()
    names = os.listxattr(path, follow_symlinks=False)
    xattrs = {n.encode(): os.getxattr(path, n, follow_symlinks=False) for n in names}
    return Entry(mode=st.st_mode, uid=st.st_uid, gid=st.st_gid,
                 size=st.st_size if fmt == stat.S_IFREG else 0,
                 rdev=st.st_rdev if fmt in (stat.S_IFCHR, stat.S_IFBLK) else 0,
                 link=os.fsencode(os.readlink(path)) if fmt == stat.S_IFLNK else None,
                 xattrs=xattrs, sha256=digest)


def _fmt_mode(mode: int) -> str:
    return f"{stat.filemode(mode)} ({mode:o})"


def compare(oci: dict[str, Entry], nydus: dict[str, Entry], *, check_owner: bool = True) -> list[str]:
    """Every difference between the two trees, one readable line each (empty list = identical)."""
    diffs: list[str] = []
    for path in sorted(oci.keys() - nydus.keys()):
        diffs.append(f"{path}: missing in nydus image")
    for path in sorted(nydus.keys() - oci.keys()):
        diffs.append(f"{path}: only in nydus image")
    for path in sorted(oci.keys() & nydus.keys()):
        a, b = oci[path], nydus[path]
        if not check_owner:
            b = replace(b, uid=a.uid, gid=a.gid)
        if a.mode != b.mode:
            diffs.append(f"{path}: mode {_fmt_mode(a.mode)} != {_fmt_mode(b.mode)}")
        if (a.uid, a.gid) != (b.uid, b.gid):
            diffs.append(f"{path}: owner {a.uid}:{a.gid} != {b.uid}:{b.gid}")
        if a.size != b.size:
            diffs.append(f"{path}: size {a.size} != {b.size}")
        if a.rdev != b.rdev:
            diffs.append(f"{path}: rdev {a.rdev} != {b.rdev}")
        if a.link != b.link:
            diffs.append(f"{path}: symlink target {a.link!r} != {b.link!r}")
        if a.xattrs != b.xattrs:
            diffs.append(f"{path}: xattrs {sorted(a.xattrs.items())} != {sorted(b.xattrs.items())}")
        if a.sha256 != b.sha256 and a.size == b.size:
            diffs.append(f"{path}: content differs (sha256 {a.sha256} != {b.sha256})")
    return diffs
