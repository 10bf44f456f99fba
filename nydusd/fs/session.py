"""The FUSE session: mount the kernel filesystem, run llfuse's loop, unmount.

Owns: ``FuseSession`` -- the llfuse ``init``/``main``/``close`` lifecycle, the mount options that make
the mount look like upstream nydusd's (type ``fuse``, source ``rafs``, ``default_permissions``,
``allow_other``, read-only unless writable) and the kernel cache invalidation that follows a
detach or remount (``invalidate_entry``/``invalidate_inode``).

Must not import: the daemon, the API. Only this module and ``fs/fuse.py`` import llfuse.

Threading: ``mount``/``run``/``close`` belong to the main thread (``llfuse.main`` installs signal
handlers). ``invalidate_*`` may be called from any thread without llfuse's lock: llfuse queues the
notification and a thread of its own sends it, so the caller never waits for the kernel (which could
be waiting for a worker) -- the deadlock libfuse warns about cannot happen.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator

import llfuse

from nydusd.errors import NydusError
from nydusd.fs.fuse import FuseOperations
from nydusd.log import get_logger

log = get_logger(__name__)


class FuseSession:
    """One FUSE mount served by llfuse (a process can hold only one: llfuse is a singleton)."""

    def __init__(self, ops: FuseOperations, mountpoint: str, *, threads: int = 4,
                 writable: bool = False, fsname: str = "rafs") -> None:
        self.ops = ops
        self.mountpoint = mountpoint
        self.threads = max(1, threads)
        self.writable = writable
        self.fsname = fsname
        self.mounted = False
        self.running = False
        self._closed = False
        self._lock = threading.Lock()

    def options(self) -> set[str]:
        opts = set(llfuse.default_options)
        opts |= {f"fsname={self.fsname}", "allow_other", "default_permissions"}
        if not self.writable:
            opts.add("ro")
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

    def run(self) -> int | None:
        """Serve requests until unmounted (returns None) or a signal arrives (returns its number)."""
        self.running = True
        try:
            reason: int | None = llfuse.main(workers=self.threads)
            return reason
        finally:
            self.running = False

    def close(self, unmount: bool = True) -> None:
        """Tear the session down; with ``unmount`` also unmount the kernel filesystem. Idempotent."""
        with self._lock:
            if self._closed or not self.mounted:
                return
            self._closed = True
        llfuse.close(unmount=unmount)
        log.info("fuse_closed", mountpoint=self.mountpoint, unmounted=unmount)

    @staticmethod
    def stop_from_thread() -> None:
        """Make ``run`` return from another thread (llfuse has no stop(): signal ourselves)."""
        os.kill(os.getpid(), signal.SIGTERM)

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
