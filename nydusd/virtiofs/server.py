"""The vhost-user-fs back-end: one unix socket QEMU connects to, FUSE over virtqueues.

Owns: ``VirtioFsServer`` -- listening on the socket, answering the vhost-user messages of one
connection at a time (features, protocol features incl. REPLY_ACK and MQ, owner, memory table,
vring setup, enable, stop/reset), one poller thread per started queue (hiprio = queue 0: FORGETs;
request queues 1..n: their requests run on a shared pool of worker threads through a
``FuseEngine``), and the wait for the next connection when QEMU goes away (the ``Vfs`` and its
mounts stay). It offers the session interface ``Daemon`` drives (``mount``/``run``/``stop``/
``close``, ``quiesced``, ``invalidate_*``, ``ops.inflight``).

Must not import: the daemon, the API, llfuse.

Threading: ``run`` (the daemon's main thread) accepts and reads the vhost-user messages; per queue a
``virtiofs-q<n>`` poller waits on the kick eventfd and a stop pipe; request queues hand chains to
``virtiofs-worker`` threads. ``stop`` may come from any thread. A queue is stopped (poller joined,
in-flight requests finished) before its rings are unmapped or reported by GET_VRING_BASE.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import stat
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

from nydusd.errors import NydusError
from nydusd.fs.proto.engine import FuseEngine, Gate, Inflight
from nydusd.fs.vfs import Vfs
from nydusd.log import get_logger
from nydusd.virtiofs import vhost_user as vu
from nydusd.virtiofs.vhost_user import GuestMemory, Message, ProtocolError, Request
from nydusd.virtiofs.virtqueue import BadChain, Chain, VirtQueue

log = get_logger(__name__)

FEATURES = vu.VIRTIO_F_VERSION_1 | vu.VHOST_USER_F_PROTOCOL_FEATURES | vu.VIRTIO_RING_F_INDIRECT_DESC
PROTOCOL_FEATURES = vu.PROTOCOL_F_MQ | vu.PROTOCOL_F_REPLY_ACK
#: hiprio + up to 8 request queues (vhost-user-fs-pci num-request-queues)
MAX_QUEUES = 9
#: how long a stopping queue waits for its in-flight requests (a read may wait on the network)
DRAIN_TIMEOUT = 30.0


class _QueueRunner:
    """The poller thread of one started queue and the count of its requests in flight."""

    def __init__(self, server: VirtioFsServer, queue: VirtQueue) -> None:
        self.server = server
        self.queue = queue
        self.stop_r, self.stop_w = os.pipe()
        self.pending = 0
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._loop, name=f"virtiofs-q{queue.index}",
                                       daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        q = self.queue
        kick = q.kick_fd
        assert kick is not None
        poller = select.poll()
        poller.register(kick, select.POLLIN)
        poller.register(self.stop_r, select.POLLIN)
        while True:
            events = dict(poller.poll())
            if self.stop_r in events:
                return
            if kick in events:
                with contextlib.suppress(BlockingIOError, OSError):
                    os.eventfd_read(kick)
            self._drain()

    def _drain(self) -> None:
        q = self.queue
        while True:
            try:
                chain = q.pop()
            except BadChain as e:
                log.warning("virtiofs_bad_chain", queue=q.index, error=str(e))
                head = getattr(e, "head", None)
                if head is not None:
                    q.push(head, 0)
                continue
            if chain is None:
                return
            if q.index == 0:
                self.server.serve_chain(q, chain)  # FORGETs: cheap, no reply
                continue
            with self.cond:
                self.pending += 1
            self.server.pool.submit(self._serve, chain)

    def _serve(self, chain: Chain) -> None:
        try:
            self.server.serve_chain(self.queue, chain)
        finally:
            with self.cond:
                self.pending -= 1
                if not self.pending:
                    self.cond.notify_all()

    def stop(self) -> None:
        """Stop popping, then wait for the requests already handed to workers."""
        with contextlib.suppress(OSError):
            os.write(self.stop_w, b"x")
        self.thread.join()
        deadline = time.monotonic() + DRAIN_TIMEOUT
        with self.cond:
            while self.pending and time.monotonic() < deadline:
                self.cond.wait(0.1)
        os.close(self.stop_r)
        os.close(self.stop_w)


class VirtioFsServer:
    """vhost-user-fs back-end serving ``vfs`` on the unix socket ``path``."""

    def __init__(self, vfs: Vfs, path: str, *, threads: int = 4) -> None:
        self.vfs = vfs
        self.path = path
        self.threads = max(1, threads)
        self.inflight = Inflight()
        self.gate = Gate()
        self.ops = SimpleNamespace(inflight=self.inflight)  # what Daemon.metrics_inflight reads
        self.running = False
        self.connections = 0
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="virtiofs-worker")
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._stop_reason: str | None = None
        self._stop_r, self._stop_w = os.pipe()
        self._lock = threading.Lock()
        self._reset_connection_state()

    def _reset_connection_state(self) -> None:
        self.features = 0
        self.protocol_features = 0
        self.mem: GuestMemory | None = None
        self.queues: dict[int, VirtQueue] = {}
        self.runners: dict[int, _QueueRunner] = {}
        self.engine = FuseEngine(self.vfs, inflight=self.inflight, gate=self.gate)

    # -- session interface (driven by the daemon) ----------------------------------------------

    def mount(self) -> None:
        """Create the listening socket. Raises NydusError if it cannot (e.g. a live one exists)."""
        if os.path.exists(self.path):
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise NydusError("vhost-user socket path exists and is not a socket", path=self.path)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(self.path)
                except OSError:
                    os.unlink(self.path)  # stale socket of a dead daemon
                else:
                    raise NydusError("vhost-user socket is in use", path=self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.path)
            listener.listen(1)
        except OSError as e:
            listener.close()
            raise NydusError(f"cannot listen on vhost-user socket: {e.strerror}",
                             path=self.path) from None
        self._listener = listener
        log.info("virtiofs_listening", sock=self.path, threads=self.threads)

    def run(self) -> str | None:
        """Serve connections one after another until ``stop``; returns its reason."""
        listener = self._listener
        assert listener is not None, "mount() first"
        with self._lock:
            if self._stop_reason is not None:
                return self._stop_reason
            self.running = True
        try:
            while True:
                ready, _, _ = select.select([listener.fileno(), self._stop_r], [], [])
                if self._stop_r in ready:
                    break
                conn, _ = listener.accept()
                self.connections += 1
                log.info("virtiofs_connected", sock=self.path, connection=self.connections)
                self._serve_connection(conn)
                if self._stop_reason is not None:
                    break
        finally:
            with self._lock:
                self.running = False
        return self._stop_reason

    def stop(self, reason: str) -> None:
        with self._lock:
            if self._stop_reason is not None:
                return
            self._stop_reason = reason
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")

    def close(self, unmount: bool = True) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        self.pool.shutdown(wait=True)
        log.info("virtiofs_closed", sock=self.path)

    @contextlib.contextmanager
    def quiesced(self) -> Iterator[None]:
        with self.gate.exclusive():
            yield

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        """virtio-fs has no notification queue here: pseudo entries expire on their own (1 s)."""

    def invalidate_inode(self, ino: int) -> None:
        """See ``invalidate_entry``."""

    def settle(self) -> None:
        """Nothing queued to settle (see ``invalidate_entry``)."""

    # -- one connection ---------------------------------------------------------------------------

    def _serve_connection(self, conn: socket.socket) -> None:
        self._conn = conn
        reason = "eof"
        try:
            while True:
                ready, _, _ = select.select([conn.fileno(), self._stop_r], [], [])
                if self._stop_r in ready:
                    reason = "stopped"
                    return
                msg = vu.read_message(conn)
                if msg is None:
                    return
                try:
                    self._dispatch(conn, msg)
                finally:
                    msg.close_fds()
        except (ProtocolError, BadChain) as e:
            reason = f"protocol error: {e}"
            log.warning("virtiofs_protocol_error", error=str(e))
        except (OSError, EOFError) as e:
            reason = f"connection error: {e}"
            log.warning("virtiofs_connection_error", error=repr(e))
        finally:
            self._teardown()
            conn.close()
            self._conn = None
            log.info("virtiofs_disconnected", sock=self.path, reason=reason,
                     open_files=self.vfs.open_handles())

    def _teardown(self) -> None:
        for index in list(self.runners):
            self._stop_queue(index)
        for q in self.queues.values():
            q.detach()
            q.close_fds()
        self.engine.close()
        if self.mem is not None:
            self.mem.close()
        self._reset_connection_state()

    def _queue(self, index: int) -> VirtQueue:
        if not 0 <= index < MAX_QUEUES:
            raise ProtocolError("queue index out of range", index=index)
        q = self.queues.get(index)
        if q is None:
            q = self.queues[index] = VirtQueue(index)
        return q

    def _stop_queue(self, index: int) -> None:
        runner = self.runners.pop(index, None)
        if runner is not None:
            runner.stop()

    def _maybe_start(self, q: VirtQueue) -> None:
        """Start serving ``q`` once it has memory, rings and a kick fd."""
        if q.index in self.runners or q.kick_fd is None or self.mem is None or not q.size:
            return
        q.attach(self.mem)
        self.runners[q.index] = _QueueRunner(self, q)
        log.info("virtiofs_queue_started", queue=q.index, size=q.size)

    def _dispatch(self, conn: socket.socket, msg: Message) -> None:
        req = msg.request
        reply: bytes | None = None
        if req == Request.GET_FEATURES:
            reply = vu.U64.pack(FEATURES)
        elif req == Request.SET_FEATURES:
            features = msg.u64()
            if features & ~FEATURES:
                raise ProtocolError("driver acked features we do not offer", features=hex(features))
            self.features = features
        elif req == Request.GET_PROTOCOL_FEATURES:
            reply = vu.U64.pack(PROTOCOL_FEATURES)
        elif req == Request.SET_PROTOCOL_FEATURES:
            self.protocol_features = msg.u64() & PROTOCOL_FEATURES
        elif req == Request.GET_QUEUE_NUM:
            reply = vu.U64.pack(MAX_QUEUES)
        elif req in (Request.SET_OWNER, Request.RESET_OWNER, Request.RESET_DEVICE):
            if req != Request.SET_OWNER:
                self._reset_queues()
        elif req == Request.SET_MEM_TABLE:
            self._set_mem_table(msg)
        elif req in (Request.SET_VRING_NUM, Request.SET_VRING_BASE, Request.SET_VRING_ENABLE):
            index, num = msg.unpack(vu.VRING_STATE)
            q = self._queue(index)
            if req == Request.SET_VRING_NUM:
                q.set_size(num)
            elif req == Request.SET_VRING_BASE:
                q.base = num & 0xFFFF
            else:
                q.enabled = bool(num)
        elif req == Request.SET_VRING_ADDR:
            index, _flags, desc, used, avail, _log = msg.unpack(vu.VRING_ADDR)
            q = self._queue(index)
            q.desc_addr, q.used_addr, q.avail_addr = desc, used, avail
        elif req == Request.GET_VRING_BASE:
            index, _ = msg.unpack(vu.VRING_STATE)
            q = self._queue(index)
            self._stop_queue(index)
            base = q.last_avail if q.mem is not None else q.base
            q.detach()
            q.close_fds()  # the ring is stopped: QEMU sends new fds before any restart
            q.base = base
            reply = vu.VRING_STATE.pack(index, base)
        elif req in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
            self._set_vring_fd(msg)
        else:
            raise ProtocolError("unsupported vhost-user request", request=req)
        if reply is not None:
            vu.send_reply(conn, msg, reply)
        elif msg.need_reply and self.protocol_features & vu.PROTOCOL_F_REPLY_ACK:
            vu.send_reply(conn, msg, vu.U64.pack(0))

    def _reset_queues(self) -> None:
        for index in list(self.runners):
            self._stop_queue(index)
        for q in self.queues.values():
            q.detach()
            q.close_fds()
        self.queues = {}
        self.engine.close()
        self.engine = FuseEngine(self.vfs, inflight=self.inflight, gate=self.gate)

    def _set_mem_table(self, msg: Message) -> None:
        mem = GuestMemory.from_message(msg)
        running = list(self.runners)
        for index in running:  # remap: rings move with the new table
            self._stop_queue(index)
        for q in self.queues.values():
            if q.mem is not None:
                q.base = q.last_avail
                q.detach()
        if self.mem is not None:
            self.mem.close()
        self.mem = mem
        log.info("virtiofs_memory_mapped", regions=len(mem.regions),
                 size=sum(r.size for r in mem.regions))
        for q in self.queues.values():
            self._maybe_start(q)

    def _set_vring_fd(self, msg: Message) -> None:
        value = msg.u64()
        index = value & vu.VRING_IDX_MASK
        if value & ~(vu.VRING_IDX_MASK | vu.VRING_NOFD_MASK):
            raise ProtocolError("bad vring fd payload", value=hex(value))
        q = self._queue(index)
        fd = None if value & vu.VRING_NOFD_MASK else msg.take_fd()
        if msg.request == Request.SET_VRING_KICK:
            self._stop_queue(index)
            if q.mem is not None:
                q.base = q.last_avail
                q.detach()
            old, q.kick_fd = q.kick_fd, fd
            if fd is None:
                raise ProtocolError("polling mode (no kick fd) is not supported", queue=index)
        elif msg.request == Request.SET_VRING_CALL:
            old, q.call_fd = q.call_fd, fd
        else:
            old, q.err_fd = q.err_fd, fd
        if old is not None:
            os.close(old)
        if msg.request == Request.SET_VRING_KICK:
            self._maybe_start(q)

    # -- requests ---------------------------------------------------------------------------------

    def serve_chain(self, q: VirtQueue, chain: Chain) -> None:
        """Run one FUSE request and return its chain (never raises: a worker must survive)."""
        written = 0
        try:
            reply = self.engine.handle(chain.request_bytes(), chain.writable_size)
            if reply is not None and chain.writable:
                written = chain.write(reply)
        except Exception as e:  # noqa: BLE001 - the guest must get its buffers back
            log.exception("virtiofs_request_failed", queue=q.index, error=repr(e))
        head = chain.head
        chain.readable, chain.writable = [], []  # drop guest-memory views before the push
        q.push(head, written)
