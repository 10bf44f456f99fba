"""The FUSE session: mount the kernel filesystem, run llfuse's loop, unmount.

Owns: ``FuseSession`` -- the llfuse ``init``/``main``/``close`` lifecycle, the mount options that make
the mount look like upstream nydusd's (type ``fuse``, source ``rafs``, ``default_permissions``,
``allow_other``, read-only unless writable) and the kernel cache invalidation that follows a
detach or remount (``invalidate_entry``/``invalidate_inode``).

Must not import: the daemon, the API. Only this module and ``fs/fuse.py`` import llfuse.

Threading: ``mount``/``run``/``close`` belong to the main thread. ``stop`` may be called from any
thread, at any time (before, during or after ``run``). ``invalidate_*`` may be called from any
thread without llfuse's lock: llfuse queues the notification and a thread of its own sends it, so
the caller never waits for the kernel (which could be waiting for a worker) -- the deadlock libfuse
warns about cannot happen.

Stopping (see README "Exit paths"): ``llfuse.main`` runs with ``handle_signals=False`` -- the daemon
owns SIGTERM/SIGINT/SIGHUP. llfuse's own handlers only work when the signal lands on the main
thread, and its shutdown (SIGUSR1 to each worker, then join) loses the wake-up of a worker that is
between its "exited?" check and its blocking read, so the loop hung about 1 in 15 stops. ``stop``
instead ends the loop from inside: it looks up a private name, the ``lookup`` handler raises
``SessionStop`` (llfuse marks the session exited and re-raises it from ``main``), and until ``main``
has returned a helper thread keeps interrupting the workers' reads with SIGUSR1 (a no-op handler
is installed for it), so no wake-up can be lost.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType

import llfuse

from nydusd.errors import NydusError
from nydusd.fs.fuse import FuseOperations, SessionStop
from nydusd.log import get_logger

log = get_logger(__name__)

#: kernel readahead window of the mount (KiB). FUSE requests stay 128 KiB (libfuse2), but a 1 MiB
#: window keeps 8 of them in flight instead of 1: sequential reads measured 2.1 -> 3.4 GB/s with one
#: worker, 1.5 -> 2.0 GB/s with four; 4 MiB was slower again (bench/bench_fuse.py).
READAHEAD_KB = 1024
#: the kernel's default FUSE congestion threshold (FUSE_DEFAULT_CONGESTION_THRESHOLD)
CONGESTION_THRESHOLD = 9


class FuseSession:
    """One FUSE mount served by llfuse (a process can hold only one: llfuse is a singleton)."""

    def __init__(self, ops: FuseOperations, mountpoint: str, *, threads: int = 4,
                 writable: bool = False, fsname: str = "rafs", max_background: int = 0) -> None:
        """``max_background``: the kernel's limit of asynchronous (readahead) requests in flight on
        this connection, raised from its default 12 when larger (0: kernel default). Requests one
        image's dead backend holds count against it, and once it is reached the kernel holds back
        the readahead of every image (see README, "A hung backend")."""
        self.ops = ops
        self.mountpoint = mountpoint
        self.max_background = max_background
        self.threads = max(1, threads)
        self.writable = writable
        self.fsname = fsname
        self.mounted = False
        self.running = False
        self._closed = False
        self._lock = threading.Lock()  # guards running / _stop_reason / _closed
        self._stop_reason: str | None = None
        self._loop_done = threading.Event()

    def options(self) -> set[str]:
        opts = set(llfuse.default_options)
        opts |= {f"fsname={self.fsname}", "allow_other", "default_permissions"}
        if not self.writable:
            opts.add("ro")
        if self.max_background > 0:  # libfuse sends them in its INIT reply
            # only the hard limit moves: the congestion threshold (when the kernel starts skipping
            # asynchronous readahead) stays the kernel's default, so healthy reads see the same
            # readahead as before (a higher one multiplied parallel requests into one chunk)
            opts |= {f"max_background={self.max_background}",
                     f"congestion_threshold={CONGESTION_THRESHOLD}"}
        return opts

    def mount(self) -> None:
        """FUSE-mount the mountpoint. Raises NydusError when the kernel refuses."""
        if not os.path.isdir(self.mountpoint):
            raise NydusError("mountpoint is not a directory", mountpoint=self.mountpoint)
        try:
            llfuse.init(self.ops, self.mountpoint, self.options())
        except (RuntimeError, OSError) as e:
            raise NydusError(f"FUSE mount failed: {e}", mountpoint=self.mountpoint) from None
        self.mounted = True
        log.info("fuse_mounted", mountpoint=self.mountpoint, threads=self.threads)

    def _set_readahead(self, kib: int) -> None:
        """Thread: widen the mount's readahead (``/sys/class/bdi/<dev>/read_ahead_kb``) once the
        kernel has processed FUSE INIT, whose reply sets it to at most 128 KiB: the statfs below
        (never cached by the kernel, not counted in any image's metrics) is answered only after
        INIT. Best effort (needs root)."""
        dev = _mount_device(self.mountpoint)
        try:
            os.statvfs(self.mountpoint)
        except OSError:
            return
        if dev is None or self._loop_done.is_set():
            return
        try:
            with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
                f.write(f"{kib}\n")
        except OSError as e:
            log.info("fuse_readahead_unchanged", mountpoint=self.mountpoint, error=str(e))

    def run(self) -> str | None:
        """Serve requests until unmounted from outside (returns None) or ``stop`` (returns its
        reason). Returns at once if ``stop`` came first. Main thread only."""
        with self._lock:
            if self._stop_reason is not None:
                return self._stop_reason
            self.running = True
        # SIGUSR1 interrupts a worker's read of /dev/fuse; its default action would kill us. The
        # no-op handler stays installed for good: the stop thread (_end_loop) may still be sending
        # its last SIGUSR1 after the loop is done, and a restored default action would kill the
        # process on its way out (seen as an exit by SIGUSR1 under load with many workers).
        signal.signal(signal.SIGUSR1, _ignore_signal)
        threading.Thread(target=self._set_readahead, args=(READAHEAD_KB,), name="fuse-readahead",
                         daemon=True).start()
        try:
            llfuse.main(workers=self.threads, handle_signals=False)
        except SessionStop:
            pass
        finally:
            self._loop_done.set()
            with self._lock:
                self.running = False
        return self._stop_reason

    def stop(self, reason: str) -> None:
        """Make ``run`` return ``reason`` (or not start serving). Thread-safe, idempotent, never
        blocks."""
        with self._lock:
            if self._stop_reason is not None:
                return
            self._stop_reason = reason
            running = self.running
        if running:
            threading.Thread(target=self._end_loop, name="fuse-stop", daemon=True).start()

    def _end_loop(self) -> None:
        """Thread: ask the loop to end through a request, then interrupt the workers' reads until
        ``llfuse.main`` has returned (each worker re-checks "exited" after an interrupted read)."""
        name = b".nydusd-stop-" + secrets.token_hex(8).encode()
        self.ops.stop_name = name
        request = threading.Thread(target=_lookup_quietly, args=(self.mountpoint, name),
                                   name="fuse-stop-request", daemon=True)
        request.start()
        request.join(1.0)  # answered as soon as a worker is free; then the loop is ending
        while not self._loop_done.wait(0.02):
            _interrupt_fuse_threads()

    def close(self, unmount: bool = True) -> None:
        """Tear the session down; with ``unmount`` also unmount the kernel filesystem. Idempotent."""
        with self._lock:
            if self._closed or not self.mounted:
                return
            self._closed = True
        llfuse.close(unmount=unmount)
        log.info("fuse_closed", mountpoint=self.mountpoint, unmounted=unmount)

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        """Ask the kernel to forget ``name`` in ``parent`` (asynchronous; never blocks)."""
        if self.running and name:
            llfuse.invalidate_entry(parent, name)

    @contextlib.contextmanager
    def quiesced(self) -> Iterator[None]:
        """Hold llfuse's global lock (from a non-worker thread): no metadata handler runs inside.

        Used to release an unmounted image's metadata while a worker that resolved it just before
        the unmount might still touch it. Never invalidate or wait on workers inside.
        """
        if not self.running:
            yield
            return
        with llfuse.lock:
            yield

    def settle(self) -> None:
        """Give llfuse's notify thread a moment to hand queued invalidations to the kernel, so a
        client that saw its umount/remount request succeed does not meet a stale cached entry."""
        if self.running:
            time.sleep(0.005)

    def invalidate_inode(self, ino: int) -> None:
        """Ask the kernel to drop cached attributes and data of ``ino`` (asynchronous)."""
        if self.running:
            llfuse.invalidate_inode(ino)


def _ignore_signal(signum: int, frame: FrameType | None) -> None:
    """SIGUSR1 exists only to interrupt a blocking read; nothing to do."""


def _lookup_quietly(mountpoint: str, name: bytes) -> None:
    """The request that ends the loop: its ``lookup`` raises SessionStop, the reply is EIO."""
    with contextlib.suppress(OSError):
        os.lstat(os.path.join(os.fsencode(mountpoint), name))


_libc: ctypes.CDLL | None = None


def _interrupt_fuse_threads() -> None:
    """SIGUSR1 to llfuse's worker threads and the main thread (by kernel thread id: a tid that has
    exited answers ESRCH, where pthread_kill on a joined thread would be undefined)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    tgkill = getattr(_libc, "tgkill", None)
    if tgkill is None:  # glibc < 2.30: llfuse's own SIGUSR1 is all there is
        return
    pid = os.getpid()
    tids = [t.native_id for t in threading.enumerate()
            if t.name.startswith("fuse-worker-") or t is threading.main_thread()]
    for tid in tids:
        if tid:
            tgkill(pid, tid, signal.SIGUSR1)


def _mount_device(mountpoint: str) -> str | None:
    """``major:minor`` of the newest mount at ``mountpoint`` (from /proc/self/mountinfo)."""
    found = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and fields[4].replace("\\040", " ") == mountpoint:
                    found = fields[2]
    except OSError:
        return None
    return found
