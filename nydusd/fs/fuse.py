"""The llfuse protocol adapter: kernel requests in, ``Vfs`` calls, ``EntryAttributes``/errnos out.

Owns: ``FuseOperations`` (an ``llfuse.Operations``) and the ``fuse_op`` error boundary every handler
passes through (design R3): FUSEError passes, NydusError -> its errno, OSError -> its errno (or EIO),
anything else is logged with its traceback and answered with EIO. Nothing escapes a handler, because
llfuse stops its main loop -- and with it every mounted image -- on the first stray exception.
Generator handlers (``readdir``) are wrapped too, since their errors surface while llfuse iterates.

Must not import: the daemon, the API, storage or rafs internals. Only this module and
``fs/session.py`` import llfuse. Handlers are thin (design R2): meaning lives in ``fs/vfs.py``.

Threading: llfuse runs handlers in its worker threads with its global lock held. ``read`` RELEASES
the lock around ``Vfs.read`` (storage I/O) so several workers fetch data in parallel -- unless the
bytes are in the page cache already (``Vfs.read_nowait``); nothing else releases it.
"""

from __future__ import annotations

import errno
import functools
import inspect
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from threading import get_ident
from typing import Any, TypeVar, cast

import llfuse

from nydusd.errors import NydusError
from nydusd.fs.attrs import Attr, DirEntry, StatFs
from nydusd.fs.vfs import Vfs
from nydusd.log import get_logger

log = get_logger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


class SessionStop(BaseException):
    """Raised by ``lookup`` for the session's private stop name: the one exception allowed to leave
    a handler. llfuse answers that request EIO, marks the session exited and re-raises this from
    ``llfuse.main``, which is how ``FuseSession.stop`` ends the loop (llfuse has no ``stop()``)."""


def _translate(exc: BaseException, op: str) -> llfuse.FUSEError:
    if isinstance(exc, llfuse.FUSEError):
        return exc
    if isinstance(exc, NydusError):
        return llfuse.FUSEError(exc.errno)
    if isinstance(exc, OSError):
        return llfuse.FUSEError(exc.errno or errno.EIO)
    log.exception("fuse_handler_crashed", op=op, error=repr(exc))
    return llfuse.FUSEError(errno.EIO)


#: FUSE protocol opcodes of the handled operations (``/api/v1/metrics/inflight`` reports them)
OPCODES = {"lookup": 1, "getattr": 3, "readlink": 5, "open": 14, "read": 15, "statfs": 17,
           "release": 18, "flush": 25, "getxattr": 22, "listxattr": 23, "opendir": 27, "readdir": 28,
           "releasedir": 29, "fsyncdir": 30, "access": 34, "fsync": 20}

_unique = itertools.count(1)
_READ_OPCODE = OPCODES["read"]


class Inflight:
    """Requests being handled right now, one slot per worker thread (for hung-I/O detection).

    Each worker writes only its own slot (a tuple: cheap on the hot path); readers copy the dict
    (GIL-atomic) and build the JSON objects.
    """

    def __init__(self) -> None:
        self.slots: dict[int, tuple[int, int, int, int]] = {}

    def enter(self, op: str, inode: Any) -> int:
        ident = threading.get_ident()
        self.slots[ident] = (inode if isinstance(inode, int) else 0, OPCODES.get(op, 0),
                             next(_unique), int(time.time()))
        return ident

    def leave(self, ident: int) -> None:
        self.slots.pop(ident, None)

    def snapshot(self) -> list[dict[str, int]]:
        return [{"inode": ino, "opcode": opcode, "unique": unique, "timestamp_secs": ts}
                for ino, opcode, unique, ts in list(self.slots.values())]


def _inflight_of(args: tuple[Any, ...]) -> Inflight | None:
    return getattr(args[0], "inflight", None) if args else None


def fuse_op(fn: F) -> F:
    """Wrap one llfuse handler in the error boundary described in the module docstring (and record
    the request in the owner's ``inflight`` table while it runs)."""
    op = fn.__name__
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args: Any, **kwargs: Any) -> Iterator[Any]:
            try:
                yield from fn(*args, **kwargs)
            except GeneratorExit:
                raise
            except BaseException as e:  # noqa: BLE001 - the boundary must catch everything
                raise _translate(e, op) from None
        return cast(F, gen_wrapper)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        inflight = _inflight_of(args)
        ident = inflight.enter(op, args[1] if len(args) > 1 else 0) if inflight is not None else 0
        try:
            return fn(*args, **kwargs)
        except SessionStop:
            raise
        except BaseException as e:  # noqa: BLE001 - the boundary must catch everything
            raise _translate(e, op) from None
        finally:
            if inflight is not None:
                inflight.leave(ident)
    return cast(F, wrapper)


def entry_attributes(attr: Attr) -> llfuse.EntryAttributes:
    """Convert a neutral ``Attr`` into llfuse's ``EntryAttributes``."""
    out = llfuse.EntryAttributes()
    out.st_ino = attr.ino
    out.generation = 0
    out.entry_timeout = attr.entry_timeout
    out.attr_timeout = attr.attr_timeout
    out.st_mode = attr.mode
    out.st_nlink = attr.nlink
    out.st_uid = attr.uid
    out.st_gid = attr.gid
    out.st_rdev = attr.rdev
    out.st_size = attr.size
    out.st_blksize = attr.blksize
    out.st_blocks = attr.blocks
    out.st_atime_ns = attr.atime_ns
    out.st_mtime_ns = attr.mtime_ns
    out.st_ctime_ns = attr.ctime_ns
    return out


def dirent_attributes(attr: Attr) -> llfuse.EntryAttributes:
    """The cut-down ``EntryAttributes`` of a readdir entry: a FUSE dirent carries only the inode
    number and the file type, so the other fields are not worth setting (once per entry)."""
    out = llfuse.EntryAttributes()
    out.st_ino = attr.ino
    out.st_mode = attr.mode
    return out


def statvfs_data(st: StatFs) -> llfuse.StatvfsData:
    out = llfuse.StatvfsData()
    out.f_bsize = st.bsize
    out.f_frsize = st.frsize
    out.f_blocks = st.blocks
    out.f_bfree = st.bfree
    out.f_bavail = st.bavail
    out.f_files = st.files
    out.f_ffree = st.ffree
    out.f_favail = st.favail
    out.f_namemax = st.namemax
    return out


def _erofs(*_args: Any, **_kwargs: Any) -> Any:
    raise llfuse.FUSEError(errno.EROFS)


class FuseOperations(llfuse.Operations):  # type: ignore[misc]  # llfuse ships no type stubs
    """Read-only llfuse operations over a ``Vfs``. Write operations answer EROFS."""

    def __init__(self, vfs: Vfs) -> None:
        super().__init__()
        self.vfs = vfs
        self.inflight = Inflight()
        #: set by ``FuseSession.stop``: looking this name up ends the main loop
        self.stop_name: bytes | None = None

    @fuse_op
    def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> llfuse.EntryAttributes:
        if name == self.stop_name:
            raise SessionStop
        return entry_attributes(self.vfs.lookup(parent_inode, name))

    @fuse_op
    def getattr(self, inode: int, ctx: Any = None) -> llfuse.EntryAttributes:
        return entry_attributes(self.vfs.getattr(inode))

    @fuse_op
    def readlink(self, inode: int, ctx: Any = None) -> bytes:
        return self.vfs.readlink(inode)

    @fuse_op
    def opendir(self, inode: int, ctx: Any = None) -> int:
        return self.vfs.opendir(inode)

    @fuse_op
    def readdir(self, fh: int, off: int) -> Iterator[tuple[bytes, llfuse.EntryAttributes, int]]:
        entry: DirEntry
        for entry in self.vfs.readdir(fh, off):
            yield entry.name, dirent_attributes(entry.attr), entry.next_offset

    @fuse_op
    def releasedir(self, fh: int) -> None:
        return None

    @fuse_op
    def open(self, inode: int, flags: int, ctx: Any = None) -> int:
        return self.vfs.open(inode, flags)

    def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        """The hot path, with ``fuse_op``'s boundary and in-flight record written out (one frame
        less per request). Warm bytes already in the page cache are served with llfuse's lock
        held (``Vfs.read_nowait``: no I/O wait, no lock; llfuse replies from the returned view
        before this worker reads its next request). Anything else -- a miss, a disk read, the
        backend -- runs with the lock released so other workers keep going (design R13)."""
        slots = self.inflight.slots
        ident = get_ident()
        slots[ident] = (fh, _READ_OPCODE, next(_unique), int(time.time()))
        try:
            fast = self.vfs.read_nowait(fh, off, size)
            if fast is not None:
                return fast
            with llfuse.lock_released:
                return self.vfs.read(fh, off, size)
        except BaseException as e:  # noqa: BLE001 - the boundary must catch everything
            raise _translate(e, "read") from None
        finally:
            slots.pop(ident, None)

    @fuse_op
    def release(self, fh: int) -> None:
        self.vfs.release(fh)

    @fuse_op
    def flush(self, fh: int) -> None:
        return None

    @fuse_op
    def getxattr(self, inode: int, name: bytes, ctx: Any = None) -> bytes:
        return self.vfs.getxattr(inode, name)

    @fuse_op
    def listxattr(self, inode: int, ctx: Any = None) -> list[bytes]:
        return self.vfs.listxattr(inode)

    @fuse_op
    def statfs(self, ctx: Any = None) -> llfuse.StatvfsData:
        return statvfs_data(self.vfs.statfs())

    @fuse_op
    def access(self, inode: int, mode: int, ctx: Any = None) -> bool:
        return self.vfs.access(inode, mode)

    def forget(self, inode_list: list[tuple[int, int]]) -> None:
        # llfuse forbids any exception here (not even FUSEError): swallow and log.
        try:
            self.vfs.forget(inode_list)
        except Exception as e:  # noqa: BLE001
            log.exception("fuse_forget_failed", error=repr(e))

    # Every modifying request is refused: the images are immutable.
    setattr = staticmethod(_erofs)
    mknod = staticmethod(_erofs)
    mkdir = staticmethod(_erofs)
    unlink = staticmethod(_erofs)
    rmdir = staticmethod(_erofs)
    symlink = staticmethod(_erofs)
    rename = staticmethod(_erofs)
    link = staticmethod(_erofs)
    create = staticmethod(_erofs)
    write = staticmethod(_erofs)
    setxattr = staticmethod(_erofs)
    removexattr = staticmethod(_erofs)

    @fuse_op
    def fsync(self, fh: int, datasync: bool) -> None:
        return None

    @fuse_op
    def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None

