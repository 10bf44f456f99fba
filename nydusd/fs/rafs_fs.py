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
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from nydusd.errors import InvalidArgument, NydusError
from nydusd.fs.attrs import BLOCK_SIZE, IMAGE_TIMEOUT, Attr, DirEntry, StatFs
from nydusd.log import get_logger

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


class BlobReader(Protocol):
    """What RafsFs needs of ``nydusd.storage.device.BlobDevice``."""

    def read(self, chunks: Sequence[Any], offset: int, size: int) -> bytes: ...


class ChunkBuffer:
    """The last few decoded chunks of an image, keyed by ``(inode, chunk index)``.

    The storage layer hands out whole chunks (1 MiB by default) while FUSE reads arrive in 128 KiB
    requests, so a sequential read would fetch and slice the same chunk eight times; this keeps the
    chunk for the following requests. Immutable data: no invalidation needed. Guarded by its own
    lock, held only for the dict operations (never across I/O).
    """

    def __init__(self, slots: int = 4) -> None:
        self.slots = slots
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[int, int], bytes] = OrderedDict()

    def get(self, key: tuple[int, int]) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: tuple[int, int], data: bytes) -> None:
        with self._lock:
            self._items[key] = data
            self._items.move_to_end(key)
            while len(self._items) > self.slots:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


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


class RafsFs:
    """A read-only view of one image. See the module docstring for the threading contract."""

    def __init__(self, sb: Any, device: BlobReader | None, *, enable_xattr: bool = False,
                 timeout: float = IMAGE_TIMEOUT) -> None:
        self.sb = sb
        self.device = device
        self.enable_xattr = enable_xattr
        self.timeout = timeout
        self.root_ino: int = int(sb.root_ino)
        self.chunk_size: int = int(getattr(sb, "chunk_size", 0) or 0)
        self.buffer = ChunkBuffer()

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

    def getattr(self, ino: int) -> Attr:
        """Attributes of image inode ``ino``. Raises NotFound for an unknown inode."""
        return self._attr(self.sb.get_inode(ino))

    def lookup(self, parent: int, name: bytes) -> Attr:
        """Attributes of ``name`` in directory ``parent``. Raises NotFound.

        The kernel only looks names up in directories, so ``parent`` is not type-checked here.
        """
        return self._attr(self.sb.lookup(parent, name))

    def _require_dir(self, ino: int) -> Any:
        inode = self.sb.get_inode(ino)
        if not stat.S_ISDIR(inode.mode):
            raise NotADirectory("not a directory", inode=ino)
        return inode

    def readdir(self, ino: int, offset: int = 0) -> Iterator[DirEntry]:
        """Entries of directory ``ino`` from ``offset`` on (``.`` and ``..`` included when the image
        lists them, as upstream does; ``ls -a`` shows them).

        The entries' ``Attr`` carry only ``ino`` and ``mode``: a FUSE readdir reply holds nothing
        else, and the kernel looks each name up for the rest.
        """
        self._require_dir(ino)
        get_inode = self.sb.get_inode
        for name, child, next_offset in self.sb.iter_dir(ino, offset):
            yield DirEntry(bytes(name), Attr(child, get_inode(child).mode), next_offset)

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

    def open(self, ino: int) -> tuple[Attr, list[Any]]:
        """Check ``ino`` is a regular file; return its attributes and chunk list (for reads).

        Raises NotFound, IsADirectory, InvalidArgument (other non-regular types).
        """
        inode = self.sb.get_inode(ino)
        if stat.S_ISDIR(inode.mode):
            raise IsADirectory("is a directory", inode=ino)
        if not stat.S_ISREG(inode.mode):
            raise InvalidArgument("not a regular file", inode=ino)
        attr = self._attr(inode)
        chunks = list(self.sb.chunks(ino)) if attr.size else []
        return attr, chunks

    def read(self, chunks: Sequence[Any], file_size: int, offset: int, size: int,
             ino: int | None = None) -> bytes | memoryview:
        """Up to ``size`` bytes of a file at ``offset`` (short at EOF): ``bytes``, or a read-only
        ``memoryview`` into a buffered chunk (llfuse replies from any buffer; no 128 KiB copy).

        With ``ino``, a request inside one chunk that does not cover all of it is served from the
        chunk buffer (see ``ChunkBuffer``), which a request starting at the chunk's first byte
        fills. Runs with llfuse's lock RELEASED: touches only its
        arguments, the locked buffer and the thread-safe device. Raises BackendError/IntegrityError
        (EIO) when the data cannot be fetched or verified.
        """
        if offset >= file_size or size <= 0:
            return b""
        end = min(offset + size, file_size)
        if self.device is None:
            raise NydusError("image has no blob device", offset=offset)
        csize = self.chunk_size
        if ino is not None and csize > 0:
            index = offset // csize
            start = index * csize
            length = min(csize, file_size - start)
            if (end - 1) // csize == index and end - offset < length:
                key = (ino, index)
                data = self.buffer.get(key)
                if data is None and offset == start:
                    # a read starting at a chunk boundary is how a sequential stream enters a
                    # chunk; random reads rarely do and would only pay for the whole-chunk copy
                    data = self.device.read(chunks, start, length)
                    self.buffer.put(key, data)
                if data is not None:
                    return memoryview(data)[offset - start:end - start]
        return self.device.read(chunks, offset, end - offset)

    def statfs(self) -> StatFs:
        files = int(getattr(self.sb, "inode_count", 0))
        return StatFs(files=files)

    def close(self) -> None:
        """Release the device (cache files) and the bootstrap mapping. Idempotent."""
        self.buffer.clear()
        for obj in (self.device, self.sb):
            close = getattr(obj, "close", None)
            if close is not None:
                close()
