"""Our own FUSE protocol engine: request bytes in, ``Vfs`` call, reply bytes out. No transport.

Owns: ``FuseEngine`` -- decoding of one FUSE request (``fuse_in_header`` + the opcode's arguments),
INIT negotiation, dispatch to the ``Vfs`` the llfuse adapter also serves, and the encoding of the
reply (``fuse_out_header`` + payload, or ``-errno``); the errno boundary (NydusError -> its errno,
OSError -> its errno, anything else logged and EIO: nothing escapes ``handle``); ``Inflight`` (the
requests being served, for ``/api/v1/metrics/inflight``) and ``Gate`` (lets an unmount wait until
no metadata request is inside an image it is about to close).

A transport (virtio-fs virtqueues, a ``/dev/fuse`` fd) hands ``handle`` the bytes of one request
and writes back the returned segments in order, or nothing when ``handle`` returns None (FORGET,
BATCH_FORGET, INTERRUPT, or a request too broken to answer).

Must not import: llfuse, the transports, the daemon, the API.

Threading: ``handle`` may run in many threads at once. Metadata requests run inside ``Gate.shared``;
READ does not (storage I/O may block on the network; the Vfs read path touches only immutable
handles and thread-safe devices, as with llfuse's lock released).
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from nydusd.errors import NydusError
from nydusd.fs.attrs import Attr, decode_ino
from nydusd.fs.proto import messages as m
from nydusd.fs.proto.messages import Opcode
from nydusd.fs.vfs import Vfs
from nydusd.log import get_logger

log = get_logger(__name__)

Buffer = bytes | bytearray | memoryview
#: a reply: segments written back to back (header first); None = no reply
Reply = list[Buffer] | None

SEEK_DATA, SEEK_HOLE = 3, 4
_OUT_HEADER = m.OUT_HEADER
_OUT_HEADER_SIZE = m.OUT_HEADER.size
_get_ident = threading.get_ident
PAGE_SIZE = 4096
#: what the READ fast path decodes: the header's len, opcode, unique, nodeid; ``fuse_read_in``'s
#: fh, offset, size (right after the 40-byte header)
_HEAD = struct.Struct("<IIQQ")
_READ_ARGS = struct.Struct("<QQI")
_READ_MIN = m.IN_HEADER.size + m.READ_IN.size
_OPCODE_READ = int(Opcode.READ)


class BadRequest(Exception):
    """A request whose bytes do not decode (answered EINVAL)."""


class Inflight:
    """Requests being served right now, one slot per thread (for hung-I/O detection)."""

    def __init__(self) -> None:
        self.slots: dict[int, tuple[int, int, int, int]] = {}

    def snapshot(self) -> list[dict[str, int]]:
        return [{"inode": ino, "opcode": opcode, "unique": unique, "timestamp_secs": ts}
                for ino, opcode, unique, ts in list(self.slots.values())]


class Gate:
    """A readers-writer gate: many requests inside (``shared``), or one ``exclusive`` holder.

    ``enter``/``leave`` (what ``shared`` does) take one plain lock each and never touch the
    condition unless an ``exclusive`` caller is waiting: they run once per metadata request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._inside = 0
        self._closed = False
        self._shared = _Shared(self)

    def enter(self) -> None:
        with self._lock:
            while self._closed:
                self._cond.wait()
            self._inside += 1

    def leave(self) -> None:
        with self._lock:
            self._inside -= 1
            if not self._inside and self._closed:  # the exclusive caller waits for this
                self._cond.notify_all()

    def shared(self) -> _Shared:
        return self._shared

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._closed:
                self._cond.wait()
            self._closed = True
            while self._inside:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._closed = False
                self._cond.notify_all()


class _Shared:
    """``with gate.shared():`` -- one reusable object, no generator per request."""

    __slots__ = ("_gate",)

    def __init__(self, gate: Gate) -> None:
        self._gate = gate

    def __enter__(self) -> None:
        self._gate.enter()

    def __exit__(self, *exc: object) -> None:
        self._gate.leave()


def errno_of(exc: BaseException, op: str) -> int:
    """The errno answering ``exc`` (the same mapping as the llfuse adapter's boundary)."""
    if isinstance(exc, NydusError):
        return exc.errno
    if isinstance(exc, BadRequest):
        return errno.EINVAL
    if isinstance(exc, OSError):
        return exc.errno or errno.EIO
    log.exception("fuse_handler_crashed", op=op, error=repr(exc))
    return errno.EIO


def _cstring(data: memoryview | bytes, what: str) -> bytes:
    """The NUL-terminated name at the start of ``data``. Raises BadRequest."""
    raw = bytes(data)
    end = raw.find(b"\0")
    if end < 0:
        raise BadRequest(f"{what}: missing NUL terminator")
    name = raw[:end]
    if len(name) > m.NAME_MAX:
        raise BadRequest(f"{what}: name too long")
    return name


def _lookup_name(data: memoryview) -> bytes:
    name = _cstring(data, "lookup")
    if not name or b"/" in name:
        raise BadRequest("lookup: empty name or name with '/'")
    return name


def _args(st: Any, data: memoryview) -> tuple[Any, ...]:
    if len(data) < st.size:
        raise BadRequest(f"arguments too short: {len(data)} < {st.size}")
    return tuple(st.unpack_from(data))


class FuseEngine:
    """One FUSE connection's protocol state over a shared ``Vfs``. See the module docstring."""

    def __init__(self, vfs: Vfs, *, max_write: int = 1 << 20, max_pages: int = 256,
                 max_readahead: int = 1 << 20, readdirplus: bool = True,
                 inflight: Inflight | None = None, gate: Gate | None = None) -> None:
        self.vfs = vfs
        self.max_write = max_write
        self.max_pages = max_pages
        self.max_readahead = max_readahead
        self.readdirplus = readdirplus
        self.inflight = inflight or Inflight()
        self.gate = gate or Gate()
        self.initialized = False
        self.minor = 0
        self.max_read = max_pages * PAGE_SIZE
        self._handles: set[int] = set()  # open file handles of this connection
        #: resumed from a predecessor process: unknown file handles are its, adopted on first use
        self.adopting = False
        self._handles_lock = threading.Lock()
        self._handlers: dict[int, Callable[[int, memoryview, int], list[Buffer]]] = {
            Opcode.LOOKUP: self._lookup, Opcode.GETATTR: self._getattr,
            Opcode.READLINK: self._readlink, Opcode.OPEN: self._open, Opcode.READ: self._read,
            Opcode.RELEASE: self._release,
            Opcode.OPENDIR: self._opendir, Opcode.READDIR: self._readdir,
            Opcode.READDIRPLUS: self._readdirplus, Opcode.RELEASEDIR: self._ok,
            Opcode.STATFS: self._statfs, Opcode.GETXATTR: self._getxattr,
            Opcode.LISTXATTR: self._listxattr, Opcode.ACCESS: self._access, Opcode.FLUSH: self._ok,
            Opcode.FSYNC: self._ok, Opcode.FSYNCDIR: self._ok, Opcode.SYNCFS: self._ok,
            Opcode.LSEEK: self._lseek, Opcode.DESTROY: self._destroy}

    # -- the entry point ----------------------------------------------------------------------

    def handle(self, request: Buffer, out_size: int | None = None) -> Reply:
        """Serve one request. ``out_size`` bounds the reply (the transport's writable space).
        Never raises; returns the reply segments, or None when no reply is due."""
        if type(request) is memoryview and request.format == "B":
            data = request
        else:
            data = memoryview(request).cast("B")
        if len(data) >= _READ_MIN:
            length, opcode, unique, nodeid = _HEAD.unpack_from(data)
            if opcode == _OPCODE_READ and length == len(data) and self.initialized:
                fh, offset, size = _READ_ARGS.unpack_from(data, m.IN_HEADER.size)
                if fh in self._handles:
                    return self._read_fast(unique, nodeid, fh, offset, size, out_size)
        if len(data) < m.IN_HEADER.size:
            log.warning("fuse_request_dropped", reason="short header", size=len(data))
            return None
        length, opcode, unique, nodeid, _uid, _gid, _pid, _pad = m.IN_HEADER.unpack_from(data)
        if opcode in m.NO_REPLY_OPCODES or opcode == Opcode.NOTIFY_REPLY:
            if length == len(data):
                self._forget(opcode, data[m.IN_HEADER.size:])
            return None
        if length != len(data):
            return self._error(unique, errno.EINVAL)
        args = data[m.IN_HEADER.size:]
        if opcode == Opcode.INIT:
            return self._guarded(opcode, unique, nodeid, lambda: self._init(args))
        if not self.initialized:
            return self._error(unique, errno.EIO)
        if opcode in m.WRITE_OPCODES:
            return self._error(unique, errno.EROFS)
        handler = self._handlers.get(opcode)
        if handler is None:
            return self._error(unique, errno.ENOSYS)
        reply: Reply
        if opcode != Opcode.READ:
            reply = self._serve_metadata(handler, opcode, unique, nodeid, args, out_size or 0)
        else:
            reply = self._guarded(opcode, unique, nodeid, lambda: handler(nodeid, args, out_size or 0))
        if out_size is not None and reply is not None and sum(len(s) for s in reply) > out_size:
            return self._error(unique, errno.ERANGE) if out_size >= m.OUT_HEADER.size else None
        return reply

    def _guarded(self, opcode: int, unique: int, nodeid: int,
                 fn: Callable[[], list[Buffer]]) -> Reply:
        slots = self.inflight.slots
        ident = threading.get_ident()
        slots[ident] = (nodeid, opcode, unique, int(time.time()))
        try:
            if opcode == Opcode.READ:
                payload = fn()
            else:
                with self.gate.shared():
                    payload = fn()
        except BaseException as e:  # noqa: BLE001 - the boundary must catch everything
            name = Opcode(opcode).name if opcode in Opcode._value2member_map_ else str(opcode)
            return self._error(unique, errno_of(e, name))
        finally:
            slots.pop(ident, None)
        size = m.OUT_HEADER.size + sum(len(p) for p in payload)
        return [m.pack_out_header(size, 0, unique), *payload]

    def _serve_metadata(self, handler: Callable[[int, memoryview, int], list[Buffer]], opcode: int,
                        unique: int, nodeid: int, args: memoryview, out_size: int) -> list[Buffer]:
        """``_guarded`` for every request but READ (inside the gate), without a closure: the
        per-request cost of LOOKUP/GETATTR/OPENDIR/READDIR(PLUS)/RELEASEDIR."""
        slots = self.inflight.slots
        ident = _get_ident()
        slots[ident] = (nodeid, opcode, unique, int(time.time()))
        gate = self.gate
        try:
            gate.enter()
            try:
                payload = handler(nodeid, args, out_size)
            finally:
                gate.leave()
        except BaseException as e:  # noqa: BLE001 - the boundary must catch everything
            name = Opcode(opcode).name if opcode in Opcode._value2member_map_ else str(opcode)
            return self._error(unique, errno_of(e, name))
        finally:
            slots.pop(ident, None)
        if len(payload) == 1:
            return [_OUT_HEADER.pack(_OUT_HEADER_SIZE + len(payload[0]), 0, unique), payload[0]]
        size = _OUT_HEADER_SIZE + sum(len(p) for p in payload)
        return [_OUT_HEADER.pack(size, 0, unique), *payload]

    @staticmethod
    def _error(unique: int, err: int) -> list[Buffer]:
        return [m.pack_out_header(m.OUT_HEADER.size, -err, unique)]

    def close(self) -> None:
        """The connection is gone: release every file it left open. Never raises."""
        with self._handles_lock:
            handles, self._handles = self._handles, set()
        for fh in handles:
            with contextlib.suppress(Exception):
                self.vfs.release(fh)
        self.initialized = False

    def open_handles(self) -> int:
        return len(self._handles)

    # -- hand-over: a successor process serves the same kernel connection --------------------------

    def export_state(self) -> dict[str, int]:
        """What INIT negotiated, for a successor (``resume``)."""
        return {"minor": self.minor, "max_read": self.max_read, "initialized": int(self.initialized)}

    def resume(self, state: dict[str, int]) -> None:
        """Serve a connection whose INIT a predecessor answered (the kernel never sends it again).
        Its file handles are adopted on first use: READ and RELEASE carry the node id.
        Raises ValueError for a state that cannot come from ``export_state``."""
        minor, max_read = int(state["minor"]), int(state["max_read"])
        if state.get("initialized", 1):
            if not m.MIN_KERNEL_MINOR <= minor <= m.KERNEL_MINOR or not 0 < max_read <= 1 << 24:
                raise ValueError(f"unusable FUSE connection state {state!r}")
            self.minor, self.max_read, self.initialized = minor, max_read, True
        self.adopting = True

    # -- session --------------------------------------------------------------------------------

    def _init(self, args: memoryview) -> list[Buffer]:
        major, minor, max_readahead, flags = _args(m.INIT_IN, args)
        if major > m.KERNEL_MAJOR:  # the kernel will retry with our major
            return [m.INIT_OUT.pack(m.KERNEL_MAJOR, m.KERNEL_MINOR, 0, 0, 0, 0, 0, 0, 0, 0, 0)[:8]]
        if major < m.KERNEL_MAJOR or minor < m.MIN_KERNEL_MINOR:
            log.warning("fuse_init_refused", major=major, minor=minor)
            raise OSError(errno.EPROTO, "FUSE protocol too old")
        want = (m.FUSE_ASYNC_READ | m.FUSE_BIG_WRITES | m.FUSE_PARALLEL_DIROPS | m.FUSE_MAX_PAGES
                | m.FUSE_CACHE_SYMLINKS)
        if self.readdirplus:
            want |= m.FUSE_DO_READDIRPLUS | m.FUSE_READDIRPLUS_AUTO
        out_flags = flags & want
        if self.initialized:  # a new FUSE session (the guest rebooted): the old one's files are gone
            self.close()
        self.minor = min(minor, m.KERNEL_MINOR)
        if not out_flags & m.FUSE_MAX_PAGES:
            self.max_read = min(self.max_read, 32 * PAGE_SIZE)
        reply = m.INIT_OUT.pack(m.KERNEL_MAJOR, self.minor, min(max_readahead, self.max_readahead),
                                out_flags, 64, 48, self.max_write, 1,
                                self.max_pages if out_flags & m.FUSE_MAX_PAGES else 0, 0, 0)
        self.initialized = True
        log.info("fuse_init", kernel=f"{major}.{minor}", flags=hex(out_flags),
                 max_pages=self.max_pages, max_write=self.max_write)
        return [reply]

    def _destroy(self, nodeid: int, args: memoryview, out_size: int) -> list[Buffer]:
        self.close()
        return []

    def _forget(self, opcode: int, args: memoryview) -> None:
        """FORGET/BATCH_FORGET (no reply). Malformed ones are ignored."""
        try:
            if opcode == Opcode.BATCH_FORGET:
                count, _ = _args(m.BATCH_FORGET_IN, args)
                body = args[m.BATCH_FORGET_IN.size:]
                count = min(count, len(body) // m.FORGET_ONE.size)
                items = [m.FORGET_ONE.unpack_from(body, i * m.FORGET_ONE.size) for i in range(count)]
                self.vfs.forget(items)
        except Exception as e:  # noqa: BLE001 - forget has no reply to carry an error
            log.warning("fuse_forget_failed", error=repr(e))

    @staticmethod
    def _ok(nodeid: int, args: memoryview, out_size: int) -> list[Buffer]:
        return []

    # -- metadata -------------------------------------------------------------------------------

    def _lookup_attr(self, parent: int, name: bytes) -> Attr:
        """``Vfs.lookup``; an entry in a pseudo directory (which mount/umount change, and which
        virtio-fs cannot invalidate in the guest) is cached no longer than the directory itself."""
        attr = self.vfs.lookup(parent, name)
        if decode_ino(parent)[0] == 0:
            limit = self.vfs.getattr(parent).entry_timeout
            if limit < attr.entry_timeout:
                attr = attr._replace(entry_timeout=limit)
        return attr

    def _lookup(self, nodeid: int, args: memoryview, out_size: int) -> list[Buffer]:
        return [m.pack_entry(self._lookup_attr(nodeid, _lookup_name(args)))]

    def _getattr(self, nodeid: int, args: memoryview, out_size: int) -> list[Buffer]:
        return [m.pack_attr_out(self.vfs.getattr(nodeid))]

    def _readlink(self, nodeid: int, args: memoryview, out_size: int) -> list[Buffer]:
        return [self.vfs.readlink(nodeid)]

    def _statfs(self, nodeid: int, args: memoryview, out_size: int) -> list[Buffer]:
        return [m.pack_statfs(self.vfs.statfs())]

    def _access(self, nodeid: int, args: memoryview, out_size: int) -> list[Buffer]:
        mask, _ = _args(m.ACCESS_IN, args)
        self.vfs.access(nodeid, mask)
        return []

    def _xattr_reply(self, value: bytes, size: int) -> list[Buffer]:
        if size == 0:
            return [m.GETXATTR_OUT.pack(len(value), 0)]
        if size < len(value):
            raise OSError(errno.ERANGE, "xattr buffer too small")
        return [value]

    def _getxattr(self, nodeid: int, args: memoryview, out_size: int) -> list[Buffer]:
        size, _ = _args(m.GETXATTR_IN, args)
        name = _cstring(args[m.GETXATTR_IN.size:], "getxattr")
        return self._xattr_reply(self.vfs.getxattr(nodeid, name), size)

    def _listxattr(self, nodeid: int, args: memoryview, out_size: int) -> list[Buffer]:
        size, _ = _args(m.GETXATTR_IN, args)
        names = self.vfs.listxattr(nodeid)
        return self._xattr_reply(b"".join(n + b"\0" for n in names), size)

    # -- files ----------------------------------------------------------------------------------

    def _open(self, nodeid: int, args: memoryview, out_size: int) -> list[Buffer]:
        flags, _ = _args(m.OPEN_IN, args)
        fh = int(self.vfs.open(nodeid, flags))
        with self._handles_lock:
            self._handles.add(fh)
        return [m.OPEN_OUT.pack(fh, m.FOPEN_KEEP_CACHE, 0)]

    def _read(self, nodeid: int, args: memoryview, out_size: int) -> list[Buffer]:
        fh, offset, size, *_ = _args(m.READ_IN, args)
        if fh not in self._handles:
            if not self.adopting:
                raise OSError(errno.EBADF, "not an open file of this connection")
            with self.gate.shared():
                self.vfs.adopt_handle(fh, nodeid)
            with self._handles_lock:
                self._handles.add(fh)
        limit = self.max_read if not out_size else min(self.max_read, out_size - m.OUT_HEADER.size)
        size = min(size, max(limit, 0))
        # warm bytes in the page cache without the full read path; the view it may return lives
        # until this thread's next read, and every transport writes the reply before that
        data = self.vfs.read_nowait(fh, offset, size)
        return [data if data is not None else self.vfs.read(fh, offset, size)]

    def _read_fast(self, unique: int, nodeid: int, fh: int, offset: int, size: int,
                   out_size: int | None) -> Reply:
        """READ of a handle this connection opened (the common case, served per request): what
        ``handle`` -> ``_guarded`` -> ``_read`` do, with no closure, gate or generic decoding."""
        limit = self.max_read if not out_size else min(self.max_read, out_size - m.OUT_HEADER.size)
        if size > limit:
            size = max(limit, 0)
        slots = self.inflight.slots
        ident = threading.get_ident()
        slots[ident] = (nodeid, _OPCODE_READ, unique, int(time.time()))
        try:
            # warm bytes in the page cache without the full read path (see ``_read``)
            data: Buffer | None = self.vfs.read_nowait(fh, offset, size)
            if data is None:
                data = self.vfs.read(fh, offset, size)
        except BaseException as e:  # noqa: BLE001 - the boundary must catch everything
            return self._error(unique, errno_of(e, "READ"))
        finally:
            del slots[ident]
        if out_size is not None and m.OUT_HEADER.size + len(data) > out_size:
            return self._error(unique, errno.ERANGE) if out_size >= m.OUT_HEADER.size else None
        return [m.OUT_HEADER.pack(m.OUT_HEADER.size + len(data), 0, unique), data]

    def _release(self, nodeid: int, args: memoryview, out_size: int) -> list[Buffer]:
        fh, *_ = _args(m.RELEASE_IN, args)
        with self._handles_lock:
            if fh not in self._handles and not self.adopting:
                raise OSError(errno.EBADF, "not an open file of this connection")
            self._handles.discard(fh)
        self.vfs.release(fh)
        return []

    def _lseek(self, nodeid: int, args: memoryview, out_size: int) -> list[Buffer]:
        _fh, offset, whence, _ = _args(m.LSEEK_IN, args)
        if whence not in (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END, SEEK_DATA, SEEK_HOLE):
            raise OSError(errno.EINVAL, "bad whence")
        size = self.vfs.getattr(nodeid).size
        if whence in (SEEK_DATA, SEEK_HOLE):
            if offset >= size:
                raise OSError(errno.ENXIO, "offset beyond end of file")
            return [m.LSEEK_OUT.pack(offset if whence == SEEK_DATA else size)]
        return [m.LSEEK_OUT.pack(offset)]  # the kernel resolves these itself; echo

    # -- directories ----------------------------------------------------------------------------

    def _opendir(self, nodeid: int, args: memoryview, out_size: int) -> list[Buffer]:
        """A directory of an image below the root is immutable: the kernel may keep its listing
        (FOPEN_CACHE_DIR). Pseudo directories change with mounts, and the root may be remounted
        with another image under the same inode number: those are listed afresh each time."""
        fh = int(self.vfs.opendir(nodeid))
        flags = 0
        if decode_ino(nodeid)[0] != 0:
            flags = m.FOPEN_KEEP_CACHE | m.FOPEN_CACHE_DIR
        return [m.OPEN_OUT.pack(fh, flags, 0)]

    def _readdir(self, nodeid: int, args: memoryview, out_size: int) -> list[Buffer]:
        return self._list(args, out_size, plus=False)

    def _readdirplus(self, nodeid: int, args: memoryview, out_size: int) -> list[Buffer]:
        return self._list(args, out_size, plus=True)

    def _list(self, args: memoryview, out_size: int, plus: bool) -> list[Buffer]:
        fh, offset, size, *_ = _args(m.READ_IN, args)
        if out_size:
            size = min(size, out_size - m.OUT_HEADER.size)
        size = min(size, self.max_read)
        out: list[Buffer] = []
        append = out.append
        used = 0
        # the handle is the directory's inode (Vfs.opendir)
        raw = self.vfs.image_listing(fh, offset) if decode_ino(fh)[0] != 0 else None
        if raw is not None:  # an image directory: the cached entries as they are
            pos = offset
            if plus:
                pack = m.pack_direntplus
                for name, fields in raw:
                    used += 152 + ((len(name) + 7) & ~7)  # m.dirent_size(len(name), True)
                    if used > size:
                        break
                    pos += 1
                    if fields[2] and name != b"." and name != b"..":  # nlink: a complete entry
                        append(pack(fields, pos, name))  # the common case, one pack
                    else:
                        append(self._plus_entry(fh, name, Attr(*fields), True))
                        append(m.pack_dirent(fields[0], pos, fields[1], name))
            else:
                for name, fields in raw:
                    used += 24 + ((len(name) + 7) & ~7)  # m.dirent_size(len(name))
                    if used > size:
                        break
                    pos += 1
                    append(m.pack_dirent(fields[0], pos, fields[1], name))
        else:
            for name, attr, next_offset in self.vfs.readdir(fh, offset):
                need = m.dirent_size(len(name), plus)
                if used + need > size:
                    break
                if plus:
                    append(self._plus_entry(fh, name, attr, False))
                append(m.pack_dirent(attr.ino, next_offset, attr.mode, name))
                used += need
        # one segment: a big getdents buffer (1 MiB requests) lists thousands of entries, and a
        # transport's writev takes at most IOV_MAX (1024) segments
        return [b"".join(out)]

    def _plus_entry(self, dir_ino: int, name: bytes, attr: Attr, in_image: bool) -> bytes:
        """The ``fuse_entry_out`` of a READDIRPLUS entry: nodeid 0 ("look it up yourself") for
        ``.``/``..`` and for an entry whose attributes fail, so one bad entry never fails the
        listing. Inside an image the listing already carries the entry's full attributes (with
        the image's timeouts): the kernel keeps them and sends no LOOKUP/GETATTR for the name;
        an incomplete one (``nlink`` 0, see ``RafsFs.readdir``) is fetched by inode. In a pseudo
        directory it goes through lookup (short timeouts)."""
        if name == b"." or name == b"..":
            return m.EMPTY_ENTRY
        try:
            if in_image:
                return m.pack_entry(attr if attr.nlink else self.vfs.getattr(attr.ino))
            return m.pack_entry(self._lookup_attr(dir_ino, name))
        except NydusError:
            return m.EMPTY_ENTRY


def serve_one(engine: FuseEngine, request: Buffer, out_size: int | None = None) -> bytes:
    """Test/diagnostic helper: the reply as one bytes object (b"" for no reply)."""
    reply = engine.handle(request, out_size)
    return b"".join(bytes(s) for s in reply) if reply else b""


def request(opcode: int, nodeid: int = 1, payload: Sequence[Buffer] = (), *, unique: int = 1,
            uid: int = 0, gid: int = 0, pid: int = 0) -> bytes:
    """Encode one FUSE request (what the kernel sends): header + payload."""
    body = b"".join(bytes(p) for p in payload)
    return m.IN_HEADER.pack(m.IN_HEADER.size + len(body), opcode, unique, nodeid, uid, gid, pid,
                            0) + body
