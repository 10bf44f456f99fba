"""One mounted RAFS image as a read-only filesystem, in terms of image inode numbers and ``Attr``.

Owns: ``RafsFs`` -- lookup/getattr/readdir/readlink/xattrs/statfs over a loaded bootstrap
(``RafsSuper`` from ``nydusd.rafs``) and file reads through a ``BlobDevice`` (``nydusd.storage``).
Inode numbers here are the image's own; ``fs/vfs.py`` re-encodes them per mount.

Must not import: llfuse, the daemon, the API. Raises only NydusError subclasses (NotFound for a
missing name, InvalidArgument for an operation on the wrong inode type, BackendError/IntegrityError
from the storage layer for data that cannot be read: EIO).

Threading: every method is safe to call from several threads at once. Metadata methods run with
llfuse's global lock held; ``read`` runs with it RELEASED (the adapter drops it around storage I/O),
so it touches only immutable state and the thread-safe device.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple, Protocol

from nydusd.config import PrefetchConfig
from nydusd.errors import InvalidArgument, NydusError
from nydusd.fs.attrs import BLOCK_SIZE, IMAGE_TIMEOUT, INO_MASK, Attr, DirEntry, StatFs, encode_ino
from nydusd.log import get_logger
from nydusd.storage.cache.prefetch import BULK_MERGE_SIZE

log = get_logger(__name__)

class NoXattr(NydusError):
    """The inode has no such extended attribute (``ENODATA``)."""

    errno = errno.ENODATA
    http_status = 404
    code = "NO_XATTR"


class NotADirectory(InvalidArgument):
    errno = errno.ENOTDIR


class IsADirectory(InvalidArgument):
    errno = errno.EISDIR


class ImageDevice(Protocol):
    """What RafsFs needs of the image's blob device (``nydusd.storage.device.BlobDevice``)."""

    def open_file(self, chunks: Sequence[Any], size: int) -> FileData: ...

    def prefetch(self, chunks: Iterable[Any], *, merge_limit: int | None = None,
                 bulk: bool = False) -> int: ...

    def stop_prefetch(self) -> None: ...

    def wait_ondemand_quiet(self, stop: threading.Event) -> None: ...


class FileData(Protocol):
    """One file's data on the device (``nydusd.storage.device.ChunkedFile``)."""

    def read(self, offset: int, size: int) -> bytes | memoryview: ...

    def read_nowait(self, offset: int, size: int) -> memoryview | None: ...


def _no_data(offset: int, size: int) -> bytes:
    return b""


def _no_device(offset: int, size: int) -> bytes:
    raise NydusError("image has no blob device", offset=offset)


def _never(offset: int, size: int) -> None:
    return None


class RafsFile:
    """An open regular file: its attributes and ``read(offset, size)`` -- the bound read of its
    data on the device (``ChunkedFile.read``), so the file adds no frame to the read path.
    Immutable; thread-safe."""

    __slots__ = ("attr", "ino", "read", "read_nowait")

    def __init__(self, ino: int, attr: Attr, read: Callable[[int, int], bytes | memoryview],
                 read_nowait: Callable[[int, int], memoryview | None] = _never) -> None:
        self.ino = ino
        self.attr = attr
        #: up to ``size`` bytes at ``offset`` (short at EOF): ``bytes``, or a read-only
        #: ``memoryview`` into a buffered chunk (llfuse replies from any buffer). Runs with
        #: llfuse's lock RELEASED. Raises BackendError/IntegrityError (EIO).
        self.read = read
        #: the same bytes when they can be had at once without blocking (warm, page-cached), as a
        #: view of the calling thread's read buffer valid until its next call; else None. For the
        #: llfuse handler, which calls it with the lock held and replies before its next read.
        self.read_nowait = read_nowait


_I64_MAX = (1 << 63) - 1
_I64_MIN = -(1 << 63)


def _mtime_ns(mtime: int, mtime_nsec: int) -> int:
    """Nanoseconds since the epoch for an on-disk u64 ``mtime`` (seconds) + ``mtime_nsec``.

    Upstream stores the seconds as u64 and hands them to the kernel cast to i64, so a value with the
    top bit set is a time before 1970; the result is clamped to the signed 64-bit nanosecond range
    ``stat`` (and llfuse) can carry. Integer arithmetic only: floats lose precision here.
    """
    secs = mtime - (1 << 64) if mtime >= 1 << 63 else mtime
    return max(_I64_MIN, min(_I64_MAX, secs * 1_000_000_000 + mtime_nsec))


#: below this many seconds ``mtime * 10**9 + mtime_nsec`` (nsec < 2**32) fits a signed 64-bit ns
_FAST_MTIME_MAX = (_I64_MAX - (1 << 32)) // 1_000_000_000


class _StatView(NamedTuple):
    """A ``StatTuple`` with the ``Inode`` field names ``RafsFs._attr`` reads (the rare path)."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int
    mtime: int
    mtime_nsec: int


#: one listing entry as ``RafsFs.listing`` gives it: name and the fields of its ``Attr``
RawEntry = tuple[bytes, tuple[Any, ...]]


class RafsFs:
    """A read-only view of one image. See the module docstring for the threading contract."""

    def __init__(self, sb: Any, device: ImageDevice | None, *, enable_xattr: bool = False,
                 timeout: float = IMAGE_TIMEOUT) -> None:
        self.sb = sb
        self.device = device
        self.enable_xattr = enable_xattr
        self.timeout = timeout
        self.root_ino: int = int(sb.root_ino)
        # the bulk decoders of RafsSuper (absent from readers that only offer the basic API)
        self._stat: Callable[[int], tuple[int, ...]] | None = getattr(sb, "stat", None)
        self._lookup_stat: Callable[[int, bytes], tuple[int, ...]] | None = getattr(
            sb, "lookup_stat", None)

    # -- attributes ---------------------------------------------------------------------------

    def _attr(self, inode: Any) -> Attr:
        mode = inode.mode
        size = inode.size
        if size == 0 and stat.S_ISLNK(mode):
            size = len(self.sb.readlink(inode.ino))
        mtime_ns = _mtime_ns(inode.mtime, inode.mtime_nsec)
        blocks = getattr(inode, "blocks", None)
        if blocks is None:
            blocks = (size + 511) // 512 if stat.S_ISREG(mode) else 0
        t = self.timeout
        return Attr(inode.ino, mode, inode.nlink, inode.uid, inode.gid, inode.rdev, min(size, _I64_MAX),
                    min(blocks, _I64_MAX), BLOCK_SIZE, mtime_ns, mtime_ns, mtime_ns, t, t)

    def _stat_attr(self, st: tuple[int, ...]) -> Attr:
        """``_attr`` of a ``StatTuple`` (``RafsSuper.stat``): the common case without a copy."""
        ino, mode, nlink, uid, gid, rdev, size, blocks, mtime, nsec = st
        if size == 0 and mode & 0o170000 == stat.S_IFLNK or mtime >= _FAST_MTIME_MAX \
                or size > _I64_MAX or blocks > _I64_MAX:
            return self._attr(_StatView(*st))
        mt = mtime * 1_000_000_000 + nsec
        t = self.timeout
        return tuple.__new__(Attr, (ino, mode, nlink, uid, gid, rdev, size, blocks, BLOCK_SIZE, mt,
                                    mt, mt, t, t))

    def getattr(self, ino: int) -> Attr:
        """Attributes of image inode ``ino``. Raises NotFound for an unknown inode."""
        if self._stat is not None:
            return self._stat_attr(self._stat(ino))
        return self._attr(self.sb.get_inode(ino))

    def lookup(self, parent: int, name: bytes) -> Attr:
        """Attributes of ``name`` in directory ``parent``. Raises NotFound.

        The kernel only looks names up in directories, so ``parent`` is not type-checked here.
        """
        if self._lookup_stat is not None:
            return self._stat_attr(self._lookup_stat(parent, name))
        return self._attr(self.sb.lookup(parent, name))

    def is_dir(self, ino: int) -> bool:
        """Whether image inode ``ino`` is a directory. Raises NotFound for an unknown inode."""
        mode = self._stat(ino)[1] if self._stat is not None else self.sb.get_inode(ino).mode
        return stat.S_ISDIR(mode)

    def _require_dir(self, ino: int) -> None:
        if not self.is_dir(ino):
            raise NotADirectory("not a directory", inode=ino)

    def readdir(self, ino: int, offset: int = 0) -> Iterator[DirEntry]:
        """Entries of directory ``ino`` from ``offset`` on (``.`` and ``..`` included when the image
        lists them, as upstream does; ``ls -a`` shows them).

        The entries carry the child's full ``Attr`` (its inode is decoded here anyway): a
        READDIRPLUS reply hands them to the kernel, which then needs no LOOKUP/GETATTR per entry.
        An entry whose attributes cannot be built (a corrupt symlink) carries only ``ino`` and
        ``mode`` with ``nlink`` 0 -- "incomplete": the listing still works, the name's own lookup
        reports the error.
        """
        self._require_dir(ino)
        get_inode = self.sb.get_inode
        attr_of = self._attr
        for name, child, next_offset in self.sb.iter_dir(ino, offset):
            inode = get_inode(child)
            try:
                attr = attr_of(inode)
            except NydusError:
                attr = Attr(child, inode.mode, 0)
            yield DirEntry(bytes(name), attr, next_offset)

    def listing(self, ino: int, base: int = 0, root: int = -1) -> list[RawEntry]:
        """The whole listing of directory ``ino``, as ``readdir`` gives it from 0 (entry k has
        ``next_offset`` k + 1), as ``(name, attr fields)`` pairs of plain tuples (``Attr(*fields)``
        is the entry's ``Attr``): a cache of them costs the garbage collector nothing after its
        first look, unlike ``DirEntry``/``Attr`` objects. Each child's inode number is re-encoded
        for the caller: ``base | ino``, or 1 (the FUSE root) for the image root when ``root`` is the
        image's root inode. One bulk decode (``RafsSuper.dir_stats``): the listing hot path."""
        self._require_dir(ino)
        dir_stats = getattr(self.sb, "dir_stats", None)
        if dir_stats is None:  # a reader without the bulk decoder (test doubles)
            return [(e.name, tuple(e.attr.with_ino(1 if e.attr.ino == root else base | e.attr.ino)))
                    for e in self.readdir(ino)]
        t = self.timeout
        out: list[RawEntry] = []
        append = out.append
        for name, (child, mode, nlink, uid, gid, rdev, size, blocks, mtime, nsec) in dir_stats(ino):
            if child > INO_MASK:
                encode_ino(0, child)  # raises OverflowError, as re-encoding one entry would
            kino = 1 if child == root else base | child
            if size == 0 and mode & 0o170000 == stat.S_IFLNK or mtime >= _FAST_MTIME_MAX \
                    or size > _I64_MAX or blocks > _I64_MAX:
                try:
                    attr = tuple(self._attr(_StatView(child, mode, nlink, uid, gid, rdev, size,
                                                      blocks, mtime, nsec)).with_ino(kino))
                except NydusError:
                    attr = tuple(Attr(kino, mode, 0))
                append((name, attr))
            else:
                mt = mtime * 1_000_000_000 + nsec
                append((name, (kino, mode, nlink, uid, gid, rdev, size, blocks, BLOCK_SIZE, mt, mt,
                               mt, t, t)))
        return out

    def readlink(self, ino: int) -> bytes:
        """Target of symlink ``ino``. Raises InvalidArgument if it is not a symlink."""
        inode = self.sb.get_inode(ino)
        if not stat.S_ISLNK(inode.mode):
            raise InvalidArgument("not a symlink", inode=ino)
        return bytes(self.sb.readlink(ino))

    # -- extended attributes ------------------------------------------------------------------

    def listxattr(self, ino: int) -> list[bytes]:
        """Names of the xattrs of ``ino`` (empty unless ``enable_xattr``)."""
        if not self.enable_xattr:
            self.sb.get_inode(ino)
            return []
        return sorted(self.sb.xattrs(ino))

    def getxattr(self, ino: int, name: bytes) -> bytes:
        """Value of xattr ``name``. Raises NoXattr (ENODATA) when absent or xattrs are disabled."""
        if not self.enable_xattr:
            self.sb.get_inode(ino)
            raise NoXattr("xattrs are disabled", inode=ino)
        value = self.sb.xattrs(ino).get(name)
        if value is None:
            raise NoXattr("no such xattr", inode=ino, name=name)
        return bytes(value)

    # -- data ---------------------------------------------------------------------------------

    def open(self, ino: int) -> RafsFile:
        """Open regular file ``ino`` for reading. Raises NotFound, IsADirectory, InvalidArgument
        (other non-regular types), NydusError when the file has data but the image no device."""
        inode = self.sb.get_inode(ino)
        if stat.S_ISDIR(inode.mode):
            raise IsADirectory("is a directory", inode=ino)
        if not stat.S_ISREG(inode.mode):
            raise InvalidArgument("not a regular file", inode=ino)
        attr = self._attr(inode)
        if not attr.size:
            return RafsFile(ino, attr, _no_data)
        if self.device is None:
            return RafsFile(ino, attr, _no_device)
        data = self.device.open_file(list(self.sb.chunks(ino)), attr.size)
        return RafsFile(ino, attr, data.read, data.read_nowait)

    # -- prefetch -----------------------------------------------------------------------------

    def start_prefetch(self, config: PrefetchConfig, prefetch_files: list[str] | None, *,
                       name: str = "") -> Callable[[], None] | None:
        """fs_prefetch: warm the cache with ``prefetch_files`` (absolute paths in the image), else
        the image's prefetch table, then with ``config.prefetch_all`` every other file, from a
        background thread named after ``name``. Best effort: failures are logged. Returns the
        function that stops it (call before closing the device), None when ``config`` is off."""
        if not config.enable or self.device is None:
            return None
        device = self.device
        stop = threading.Event()
        thread = threading.Thread(target=self._prefetch_walk, args=(config, prefetch_files, stop, name),
                                  name=f"prefetch-{name}", daemon=True)
        thread.start()

        def halt() -> None:
            stop.set()
            thread.join(5)
            device.stop_prefetch()
        return halt

    def _prefetch_walk(self, config: PrefetchConfig, prefetch_files: list[str] | None, stop: threading.Event,
                       name: str) -> None:
        sb, device = self.sb, self.device
        assert device is not None
        try:
            roots: list[int] = []
            if prefetch_files:
                for path in prefetch_files:
                    try:
                        roots.append(int(sb.resolve(os.fsencode(path)).ino))
                    except NydusError:
                        log.info("prefetch_file_skipped", path=path)
            else:
                roots = [int(i) for i in sb.prefetch_inodes()]
            seen: set[int] = set()
            # a table listing "/" (nydusify's default) asks for the whole image: that is the
            # speculative bulk pass, which stays behind the container's reads, not a hint
            whole = self.root_ino in roots
            roots = [r for r in roots if r != self.root_ino]
            # the hinted files (a recorded access order) in one submission: their chunks are
            # fetched in hint order, adjacent ones merged whatever their place in the list
            queued = self._queue_prefetch(roots, stop, seen, together=True)
            if config.prefetch_all or whole:
                # walking a whole image costs CPU (and the GIL) the container's first reads need
                device.wait_ondemand_quiet(stop)
                # upstream: the hinted files first, then everything else. The whole-image pass
                # streams long runs of the blob (one ranged request per BULK_MERGE_SIZE) instead of
                # the on-demand merging size: per-request latency dominates small ranges.
                queued += self._queue_prefetch([self.root_ino], stop, seen,
                                               merge_limit=BULK_MERGE_SIZE, bulk=True)
            log.info("prefetch_queued", mountpoint=name, roots=len(roots), requests=queued)
        except Exception as e:  # noqa: BLE001 - prefetch is best effort; the mount stays usable
            log.warning("prefetch_failed", mountpoint=name, error=repr(e))

    def _queue_prefetch(self, roots: list[int], stop: threading.Event, seen: set[int],
                        merge_limit: int | None = None, together: bool = False,
                        bulk: bool = False) -> int:
        """Submit the chunks of every regular file under ``roots`` (files or directories) not in
        ``seen`` (updated), merging adjacent chunks up to ``merge_limit`` (None: the prefetch
        config's size); file by file, or with ``together`` all in one ordered submission."""
        sb, device = self.sb, self.device
        assert device is not None
        queued = 0
        collected: list[Any] = []
        pending = deque(roots)  # breadth first, in hint order
        while pending and not stop.is_set():
            ino = pending.popleft()
            if ino in seen:
                continue
            seen.add(ino)
            inode = sb.get_inode(ino)
            if stat.S_ISDIR(inode.mode):
                pending.extend(int(child) for _name, child in sb.children(ino))
            elif stat.S_ISREG(inode.mode) and inode.size:
                if together:
                    collected.extend(sb.chunks(ino))
                else:
                    queued += device.prefetch(sb.chunks(ino), merge_limit=merge_limit, bulk=bulk)
        if collected and not stop.is_set():
            queued += device.prefetch(collected, merge_limit=merge_limit)
        return queued

    def root_names(self) -> list[bytes]:
        """Names in the image's root directory (the kernel entries to forget when it is swapped);
        empty when the root cannot be read."""
        try:
            return [e.name for e in self.readdir(self.root_ino) if e.name not in (b".", b"..")]
        except NydusError:
            return []

    def statfs(self) -> StatFs:
        files = int(getattr(self.sb, "inode_count", 0))
        return StatFs(files=files)

    def close(self) -> None:
        """Release the device (cache files) and the bootstrap mapping. Idempotent."""
        for obj in (self.device, self.sb):
            close = getattr(obj, "close", None)
            if close is not None:
                close()
