"""Our own FUSE session: ``/dev/fuse`` + ``mount(2)`` + worker threads over the protocol engine.

Owns: ``DevFuseSession`` -- opening ``/dev/fuse``, the kernel mount (``fd=N,rootmode=40000,
user_id=…,group_id=…,default_permissions,allow_other``, source ``rafs``, type ``fuse``, read-only
unless writable: what the llfuse session mounts), the worker threads that read requests from the
device, hand them to ``FuseEngine`` and write the replies, kernel cache invalidation (notify
messages), and the hand-over of the connection: ``fd`` for sendfd, ``adopt`` for a successor
that received the fd from a supervisor, and the failover policy applied when it starts serving
(``FUSE_NOTIFY_RESEND`` for ``resend``; ``flush`` answers the re-sent requests of the dead
predecessor with EIO; ``none`` leaves them).

Unlike libfuse2/llfuse it negotiates ``max_pages`` (1 MiB reads) and readdirplus, and it can serve
a connection it did not mount -- which is why failover and hot upgrade need it.

Must not import: llfuse, the daemon, the API. Offers the session interface ``Daemon`` drives
(``mount``/``run``/``stop``/``close``, ``quiesced``, ``settle``, ``invalidate_*``, ``ops.inflight``).

Threading: ``mount``/``run``/``close`` belong to the main thread; ``stop`` and ``invalidate_*``
may come from any thread and never block. ``threads`` workers (``fuse-worker-N``) read requests,
and that many stay readers: a worker about to wait on a backend (``storage/waits.py`` calls its
blocking listener) wakes a parked worker or starts one while fewer than ``threads`` others read,
up to ``max_threads`` (the daemon passes ``--thread-num`` + the backend-wait reserve, as for
llfuse), so requests stuck on a dead backend never stall the others. When a wait ends, a surplus
reader parks (takes no requests) until a reader blocks again; one parked for ``RETIRE_SECONDS``
ends. Busy workers alone start none: with more readers than concurrent requests each request
would go to a sleeping worker (a wakeup and a GIL hand-off per request; 132 llfuse workers serve
half the IOPS of 4). Each worker tries a non-blocking read of the device and, when none is
queued, waits in its own epoll on the device (``EPOLLEXCLUSIVE``: one wakes per request) and on a
stop pipe; a worker that loses the race for a request just waits again. A worker finishes the
request it is serving before it notices a stop, so ``exit`` hands no half-served request to the
successor. Invalidations go through a queue to a ``fuse-notify`` thread: a notify write may wait
for the kernel, which may wait for a worker (libfuse's documented deadlock), never a caller.

Cloned device fds (``FUSE_DEV_IOC_CLONE``) give each worker its own processing queue, but a
clone's requests are aborted (ECONNABORTED to the reader) when its process dies, while requests
read from the original fd survive in the supervisor's copy and can be re-sent. So workers clone
only when no hand-over is possible (``clone_fd``; the daemon disables it with ``--supervisor``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import queue
import select
import struct
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

from nydusd.errors import NydusError
from nydusd.fs.proto.engine import FuseEngine
from nydusd.fs.vfs import Vfs
from nydusd.log import get_logger
from nydusd.storage import waits as backend_waits

log = get_logger(__name__)

MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4
MNT_DETACH = 2
#: _IOR(229, 0, uint32_t)
FUSE_DEV_IOC_CLONE = 0x8004E500
NOTIFY_INVAL_INODE, NOTIFY_INVAL_ENTRY, NOTIFY_RESEND = 2, 3, 7
#: the kernel marks a re-sent request's unique id with this bit
UNIQUE_RESEND = 1 << 63
OUT_HEADER = struct.Struct("<IiQ")
INVAL_INODE = struct.Struct("<Qqq")
INVAL_ENTRY = struct.Struct("<QII")
#: a read buffer must hold the largest request: header + write header + max_write
BUFFER_SIZE = (1 << 20) + (64 << 10)
#: kernel readahead window (KiB) set after INIT (which caps it at 128 KiB); 1 MiB = one request
READAHEAD_KB = 1024
FAILOVER_POLICIES = ("none", "resend", "flush")
#: the most segments one writev takes (Linux UIO_MAXIOV)
IOV_MAX = 1024
#: a parked worker (beyond ``threads`` readers) ends after this long unneeded
RETIRE_SECONDS = 5.0

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str, **ctx: Any) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise NydusError(f"{what} failed: {os.strerror(err)}", errno=err, **ctx)


class DevFuseSession:
    """One FUSE connection served by our own engine; see the module docstring."""

    def __init__(self, vfs: Vfs, mountpoint: str, *, threads: int = 4, writable: bool = False,
                 fsname: str = "rafs", failover_policy: str = "resend", clone_fd: bool = False,
                 engine: FuseEngine | None = None, max_threads: int | None = None) -> None:
        if failover_policy not in FAILOVER_POLICIES:
            raise NydusError("unknown failover policy", policy=failover_policy)
        self.vfs = vfs
        self.mountpoint = mountpoint
        self.threads = max(1, threads)
        #: workers at most: ``threads`` readers plus one per worker waiting on a backend (default:
        #: the backend-wait reserve of ``storage/waits.py``, which bounds those waits anyway)
        if max_threads is None:
            max_threads = self.threads + backend_waits.limits()[1]
        self.max_threads = max(self.threads, max_threads)
        self.writable = writable
        self.fsname = fsname
        self.failover_policy = failover_policy
        self.clone_fd = clone_fd
        self.engine = engine or FuseEngine(vfs)
        self.ops = SimpleNamespace(inflight=self.engine.inflight)  # what Daemon.metrics_inflight reads
        self.fd = -1
        self.mounted = False
        self.adopted = False
        self.running = False
        self._closed = False
        self._lock = threading.Lock()
        self._stop_reason: str | None = None
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._ended = threading.Event()  # the kernel ended the connection (unmounted)
        self._halt = False  # stop or ended: what the workers check per request (a plain bool)
        self._workers: list[threading.Thread] = []  # live ones (guarded by ``_lock``)
        self._blocked = 0  # workers waiting on a backend (guarded by ``_lock``)
        self._parked = 0  # workers parked in ``_park``, not reading (guarded by ``_lock``)
        self._wakeups = 0  # parked workers told to read again, not yet running (``_lock``)
        self._wake = threading.Condition(self._lock)
        self._started = 0  # workers started so far (names)
        self._notify: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._notifier: threading.Thread | None = None
        #: requests re-sent after a takeover and answered per the failover policy
        self.resent = 0

    # -- set-up -----------------------------------------------------------------------------------

    def options(self) -> str:
        st = os.stat(self.mountpoint)
        return (f"fd={self.fd},rootmode={st.st_mode & 0o170000:o},user_id={os.getuid()},"
                f"group_id={os.getgid()},default_permissions,allow_other")

    def mount(self) -> None:
        """Open ``/dev/fuse`` and mount it at the mountpoint. Raises NydusError."""
        if not os.path.isdir(self.mountpoint):
            raise NydusError("mountpoint is not a directory", mountpoint=self.mountpoint)
        try:
            self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            raise NydusError(f"cannot open /dev/fuse: {e.strerror}", errno=e.errno) from None
        flags = MS_NOSUID | MS_NODEV | (0 if self.writable else MS_RDONLY)
        result = _libc.mount(self.fsname.encode(), os.fsencode(self.mountpoint), b"fuse",
                             ctypes.c_ulong(flags), self.options().encode())
        if result != 0:
            err = ctypes.get_errno()
            os.close(self.fd)
            self.fd = -1
            raise NydusError(f"FUSE mount failed: {os.strerror(err)}", mountpoint=self.mountpoint)
        self.mounted = True
        log.info("fuse_mounted", mountpoint=self.mountpoint, threads=self.threads, session="own")

    def adopt(self, fd: int, engine_state: dict[str, int]) -> None:
        """Serve the connection of a predecessor: ``fd`` is its ``/dev/fuse`` fd (from the
        supervisor), ``engine_state`` what its engine negotiated. Raises NydusError."""
        try:
            self.engine.resume(engine_state)
        except (ValueError, KeyError, TypeError) as e:
            raise NydusError(f"unusable FUSE connection state: {e}") from None
        try:
            st = os.fstat(fd)
            if not os.major(st.st_rdev) == 10 or os.minor(st.st_rdev) != 229:
                raise NydusError("the supervisor's fd is not /dev/fuse", rdev=st.st_rdev)
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
        except OSError as e:
            raise NydusError(f"the supervisor's fd is unusable: {e.strerror}") from None
        self.fd = fd
        self.mounted = self.adopted = True
        log.info("fuse_adopted", mountpoint=self.mountpoint, policy=self.failover_policy)

    # -- serving ----------------------------------------------------------------------------------

    def run(self) -> str | None:
        """Serve until unmounted from outside (None) or ``stop`` (its reason). Main thread only."""
        with self._lock:
            if self._stop_reason is not None:
                return self._stop_reason
            self.running = True
        self._notifier = threading.Thread(target=self._notify_loop, name="fuse-notify", daemon=True)
        self._notifier.start()
        for _ in range(self.threads):
            self._start_worker()
        if self.adopted:
            self._apply_failover_policy()
        else:
            threading.Thread(target=self._set_readahead, name="fuse-readahead", daemon=True).start()
        while True:  # also those started meanwhile; a retiring worker removes itself
            with self._lock:
                live = [t for t in self._workers if t.is_alive()]
            if not live:
                break
            for t in live:
                t.join()
        with self._lock:
            self.running = False
        self._notify.put(None)
        self._notifier.join(5)
        log.info("fuse_session_done", mountpoint=self.mountpoint, adopted=self.adopted,
                 resent=self.resent, reason=self._stop_reason or "unmounted")
        return self._stop_reason

    def _worker_fd(self) -> int:
        if not self.clone_fd:
            return self.fd
        clone = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            fcntl.ioctl(clone, FUSE_DEV_IOC_CLONE, struct.pack("I", self.fd))
        except OSError as e:
            os.close(clone)
            log.info("fuse_clone_unavailable", error=e.strerror)
            return self.fd
        return clone

    def _start_worker(self) -> None:
        """Start one more worker (none past ``max_threads`` or once stopping)."""
        with self._lock:
            if len(self._workers) >= self.max_threads or self._halt:
                return
            t = threading.Thread(target=self._worker, args=(self._worker_fd(),),
                                 name=f"fuse-worker-{self._started}", daemon=True)
            self._started += 1
            self._workers.append(t)
            t.start()  # under the lock: ``run`` joins only started threads

    def _blocking(self, entering: bool) -> None:
        """Blocking listener of every worker (``storage/waits.py``): a worker is about to wait on
        a backend (True) or done waiting (False). Keeps ``threads`` workers reading: wakes a
        parked one, or starts one."""
        with self._lock:
            if not entering:
                self._blocked -= 1
                return
            self._blocked += 1
            if len(self._workers) - self._blocked - self._parked >= self.threads:
                return
            if self._parked:
                self._parked -= 1
                self._wakeups += 1
                self._wake.notify()
                return
        try:
            self._start_worker()
        except (RuntimeError, OSError) as e:  # no thread or fd left: the waits' bounds still hold
            log.warning("fuse_worker_start_failed", error=str(e))

    def _park(self) -> bool:
        """More than ``threads`` workers read (a wait on a backend ended): park this one until a
        reader blocks again. False: it stayed parked for ``RETIRE_SECONDS`` and ends (removed
        from the live ones)."""
        with self._lock:
            if self._halt or len(self._workers) - self._blocked - self._parked <= self.threads:
                return True
            self._parked += 1
            while not self._wakeups and not self._halt:
                if not self._wake.wait(RETIRE_SECONDS) and not self._wakeups and not self._halt:
                    self._parked -= 1
                    with contextlib.suppress(ValueError):
                        self._workers.remove(threading.current_thread())
                    return False
            if self._wakeups:
                self._wakeups -= 1  # the waker counted this one unparked
            else:
                self._parked -= 1  # halted
            return True

    def _worker(self, fd: int) -> None:
        # an anonymous mapping: only the pages requests touch become resident (a READ request is
        # a few dozen bytes), so a worker costs little memory until it serves a large request
        buf = mmap.mmap(-1, BUFFER_SIZE)
        view = memoryview(buf)
        bufs = [buf]
        ep = select.epoll()
        readv, writev, poll = os.readv, os.writev, ep.poll
        workers, threads, handle = self._workers, self.threads, self.engine.handle
        resend = self.adopted  # only a successor asks the kernel to re-send requests
        backend_waits.set_blocking_listener(self._blocking)
        try:
            ep.register(fd, select.EPOLLIN | select.EPOLLEXCLUSIVE)
            ep.register(self._stop_r, select.EPOLLIN)
            while not self._halt:
                # surplus readers once a backend wait ended (an unlocked peek; ``_park`` checks)
                if len(workers) - self._blocked - self._parked > threads and not self._park():
                    return
                try:
                    n = readv(fd, bufs)
                except BlockingIOError:
                    poll()
                    continue
                except OSError as e:
                    if e.errno in (errno.ENOENT, errno.EINTR):  # interrupted before we got it
                        continue
                    if e.errno != errno.ENODEV:
                        log.error("fuse_read_failed", error=e.strerror)
                    self._end()
                    return
                reply = self._resent(view[:n]) if resend else handle(view[:n])
                if not reply:
                    continue
                if len(reply) > IOV_MAX:  # writev refuses more (EINVAL): the request would never end
                    reply = [b"".join(reply)]
                try:
                    writev(fd, reply)
                except OSError as e:
                    # ENOENT: the request was interrupted or aborted meanwhile; ENODEV: connection gone
                    if e.errno not in (errno.ENOENT, errno.ENODEV):
                        log.warning("fuse_reply_failed", error=e.strerror)
        finally:
            backend_waits.set_blocking_listener(None)
            ep.close()
            with contextlib.suppress(BufferError):  # a request view still referenced: GC frees it
                view.release()
                buf.close()
            if fd != self.fd:
                os.close(fd)

    def _resent(self, request: memoryview) -> list[Any] | None:
        """A successor's request: one the kernel re-sent (``UNIQUE_RESEND``) is counted, and
        answered EIO under the ``flush`` policy (the dead predecessor had taken it)."""
        unique = struct.unpack_from("<Q", request, 8)[0] if len(request) >= 16 else 0
        if unique & UNIQUE_RESEND:
            self.resent += 1
            if self.failover_policy == "flush":
                return [OUT_HEADER.pack(OUT_HEADER.size, -errno.EIO, unique)]
        return self.engine.handle(request)

    def _end(self) -> None:
        if not self._ended.is_set():
            self._ended.set()
            with self._lock:
                self._halt = True
                self._wake.notify_all()
            os.write(self._stop_w, b"x")  # workers run: the session is not closed yet
            log.info("fuse_session_ended", mountpoint=self.mountpoint)

    def _apply_failover_policy(self) -> None:
        """After a takeover: make the kernel re-send what the dead predecessor had read but not
        answered (``resend``; ``flush`` then answers them with EIO). Requests still queued in
        the kernel need nothing: the workers read them as usual."""
        if self.failover_policy == "none":
            return
        try:
            os.write(self.fd, OUT_HEADER.pack(OUT_HEADER.size, NOTIFY_RESEND, 0))
            log.info("fuse_resend_requested", policy=self.failover_policy)
            return
        except OSError as e:
            log.info("fuse_notify_resend_unavailable", error=e.strerror)
        conn = self.connection_id()
        for root in ("/sys/fs/fuse/connections", "/proc/sys/fs/fuse/connections"):
            path = f"{root}/{conn}/{self.failover_policy}"
            with contextlib.suppress(OSError), open(path, "w") as f:
                f.write("1")
                log.info("fuse_failover_policy_applied", path=path)
                return
        log.warning("fuse_failover_policy_unavailable", policy=self.failover_policy, conn=conn)

    def connection_id(self) -> int | None:
        """``(major << 20) | minor`` of the mountpoint's st_dev: the fusectl connection name."""
        try:
            dev = os.stat(self.mountpoint).st_dev
        except OSError:
            return None
        return (os.major(dev) << 20) | os.minor(dev)

    def _set_readahead(self) -> None:
        """Thread: widen the mount's readahead once INIT is done (the statfs is answered only
        after INIT). Best effort (needs root)."""
        with contextlib.suppress(OSError):
            os.statvfs(self.mountpoint)
            dev = os.stat(self.mountpoint).st_dev
            with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb", "w") as f:
                f.write(f"{READAHEAD_KB}\n")

    def stop(self, reason: str) -> None:
        """Make ``run`` return ``reason`` once every worker finished its request. Thread-safe,
        idempotent, never blocks."""
        with self._lock:
            if self._stop_reason is not None:
                return
            self._stop_reason = reason
            self._halt = True
            self._wake.notify_all()
            if not self._closed:  # the pipe is closed with the session
                os.write(self._stop_w, b"x")

    def close(self, unmount: bool = True) -> None:
        """Tear down; with ``unmount`` also unmount (lazily, as libfuse does). Without, the kernel
        mount lives on as long as another process (supervisor, successor) holds the fd."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if unmount and self.mounted and not self._ended.is_set():
            _check(_libc.umount2(os.fsencode(self.mountpoint), MNT_DETACH), "umount",
                   mountpoint=self.mountpoint)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        os.close(self._stop_r)
        os.close(self._stop_w)
        self.engine.close()
        log.info("fuse_closed", mountpoint=self.mountpoint, unmounted=unmount)

    # -- kernel cache ------------------------------------------------------------------------------

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        if self.running and name:
            body = INVAL_ENTRY.pack(parent, len(name), 0) + name + b"\0"
            self._notify.put(OUT_HEADER.pack(OUT_HEADER.size + len(body), NOTIFY_INVAL_ENTRY, 0) + body)

    def invalidate_inode(self, ino: int) -> None:
        if self.running:
            body = INVAL_INODE.pack(ino, 0, 0)
            self._notify.put(OUT_HEADER.pack(OUT_HEADER.size + len(body), NOTIFY_INVAL_INODE, 0) + body)

    def _notify_loop(self) -> None:
        while True:
            message = self._notify.get()
            if message is None:
                return
            try:
                os.write(self.fd, message)
            except OSError as e:
                if e.errno != errno.ENOENT:  # ENOENT: the kernel does not know the inode
                    log.info("fuse_notify_failed", error=e.strerror)

    def settle(self) -> None:
        """Give the notify thread a moment to hand queued invalidations to the kernel."""
        if self.running:
            deadline = time.monotonic() + 0.05
            while not self._notify.empty() and time.monotonic() < deadline:
                time.sleep(0.001)
            time.sleep(0.002)

    @contextlib.contextmanager
    def quiesced(self) -> Iterator[None]:
        """No metadata request is inside the engine while the caller holds this."""
        with self.engine.gate.exclusive():
            yield
