"""Bounded, cancellable waits on a backend: one image's dead backend must not stall the others.

Owns: ``BackendWaits`` -- one per mounted image (its cache manager holds it) -- and the process-wide
budget all of them share. Must not import rafs, fs, daemon, cache or any transport.

Why (see ``nydusd/fs/README.md``, "A hung backend"): llfuse handlers answer synchronously, so a
FUSE read that waits on the network holds its worker thread until the data or an error arrives.
With a handful of workers, a few readers of an image whose backend accepts connections and never
answers occupy every worker for the backend's whole timeout, and reads of every other image queue
behind them. The daemon therefore runs many more llfuse workers than ``--thread-num`` (a blocked
thread costs a little memory, nothing else) and bounds how many of them may wait on backends:

- at most ``per_mount`` workers of one image wait on its backend at once,
- at most ``shared`` workers of all images together (``limits``),

so at least ``--thread-num`` workers are always free for metadata, cached data and the reads of
images whose backends answer. A read that would exceed a bound is not queued (queuing would hold a
worker, which is what the bound prevents): it fails at once with EIO (``BackendBusy``) and the
event ``backend_waits_exhausted`` is logged (once per second and image at most). The bound is set far above
what healthy reading needs: a waiting read is one FUSE request (at most 128 KiB), and the kernel
keeps about eight of them in flight per sequentially read file.

Cancellation: the wait itself runs on the calling worker, but the fetch runs on a helper thread
(``run``; helpers are reused, see ``_Helpers``), so ``cancel`` -- called when the image is
unmounted -- wakes every waiting worker at once with EIO (``ImageDetached``) while the helpers
finish or time out on their own, holding no worker.

Blocking listener: a FUSE transport that keeps only a few threads reading requests (the own
``/dev/fuse`` session) must learn when one of them is about to wait on a backend, to start another
reader meanwhile. ``set_blocking_listener`` registers a callback for the calling thread; ``blocked()``
(entered around the wait of ``run`` and around a wait for another thread's fetch of the same chunk,
``cache/singleflight.py``) calls it with True before the thread blocks and with False after -- only
for the outermost wait of a thread. Threads without a listener (helpers, prefetch workers, llfuse
workers) pay one thread-local lookup. Storage thereby knows nothing of the transport.

Threading: every method may be called from any thread; one small lock guards the counters and the
set of pending waits, never held while waiting or fetching.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

from nydusd.errors import BackendError
from nydusd.log import get_logger

log = get_logger(__name__)

T = TypeVar("T")

#: backend waits one image may have at once
PER_MOUNT_WAITS = 64
#: backend waits all images together may have at once (the extra llfuse workers)
SHARED_WAITS = 128


class _ThreadState(threading.local):
    listener: Callable[[bool], None] | None = None
    depth = 0  # nested ``blocked()`` of this thread: only the outermost one is announced


_thread = _ThreadState()


def set_blocking_listener(listener: Callable[[bool], None] | None) -> None:
    """Register (None: drop) the calling thread's blocking listener (see module docstring). It
    must not raise and must not block: it runs on the reader's path."""
    _thread.listener = listener
    _thread.depth = 0


class blocked:  # noqa: N801 - used like a function: ``with blocked(): future.result()``
    """Context of a wait on a backend: tells the calling thread's listener, if any."""

    __slots__ = ("_listener",)

    def __enter__(self) -> None:
        state = _thread
        listener = state.listener
        self._listener = listener
        if listener is not None:
            state.depth += 1
            if state.depth == 1:
                listener(True)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        listener = self._listener
        if listener is not None:
            state = _thread
            state.depth -= 1
            if state.depth == 0:
                listener(False)


class BackendBusy(BackendError):
    """Too many reads are already waiting on this (or every) backend: refused at once (EIO)."""

    code = "BACKEND_BUSY"


class ImageDetached(BackendError):
    """The image was unmounted while the read waited on its backend (EIO)."""

    code = "IMAGE_DETACHED"


@dataclass
class _Budget:
    """The process-wide count of backend waits (shared by every ``BackendWaits``)."""

    limit: int = SHARED_WAITS
    used: int = 0


_budget = _Budget()
_budget_lock = threading.Lock()


def limits() -> tuple[int, int]:
    """``(per image, all images)``: how many FUSE workers may wait on backends at once."""
    return PER_MOUNT_WAITS, _budget.limit


class BackendWaits:
    """Admission and cancellation of the backend waits of one image (see module docstring)."""

    def __init__(self, name: str = "", per_mount: int = PER_MOUNT_WAITS) -> None:
        self.name = name
        self.per_mount = per_mount
        self._pending: set[Future[object]] = set()
        self._cancelled: BaseException | None = None
        #: reads refused by a bound, and waits ended by ``cancel`` (for tests and logs)
        self.refused = 0
        self.cancelled = 0
        self._last_refusal_log = -1.0

    @property
    def waiting(self) -> int:
        with _budget_lock:
            return len(self._pending)

    def run(self, fetch: Callable[[], T]) -> T:
        """``fetch()`` on a helper thread while the caller waits; raises what it raises, or
        ``ImageDetached`` as soon as ``cancel`` is called, or ``BackendBusy`` without running it
        when a bound is reached."""
        future: Future[object] = Future()
        with _budget_lock:
            if self._cancelled is not None:
                raise ImageDetached("image unmounted", mountpoint=self.name)
            if len(self._pending) >= self.per_mount or _budget.used >= _budget.limit:
                self.refused += 1
                self._log_refusal()
                raise BackendBusy("too many reads are waiting on the backend", mountpoint=self.name,
                                  waiting=len(self._pending), shared=_budget.used)
            self._pending.add(future)
            _budget.used += 1
        try:
            _helpers.submit(future, fetch)
            with blocked():
                return future.result()  # type: ignore[return-value]
        finally:
            with _budget_lock:
                self._pending.discard(future)
                _budget.used -= 1

    def cancel(self, reason: str = "image unmounted") -> int:
        """Fail every current wait with ``ImageDetached`` and refuse new ones. Idempotent; returns
        how many waits were ended."""
        with _budget_lock:
            if self._cancelled is None:
                self._cancelled = ImageDetached(reason, mountpoint=self.name)
            err = self._cancelled
            pending = list(self._pending)
        ended = sum(1 for f in pending if _fail(f, err))
        self.cancelled += ended
        if ended:
            log.info("backend_waits_cancelled", mountpoint=self.name, waits=ended, reason=reason)
        return ended

    def _log_refusal(self) -> None:
        now = time.monotonic()
        if self._last_refusal_log < 0 or now - self._last_refusal_log >= 1.0:
            self._last_refusal_log = now
            log.warning("backend_waits_exhausted", mountpoint=self.name, waiting=len(self._pending),
                        per_mount=self.per_mount, shared=_budget.used, shared_limit=_budget.limit)


class _Helpers:
    """The threads that run fetches for waiting readers: reused (a thread start costs 0.1-0.6 ms,
    a hand-off through the queue a few µs), started when none is idle, ended after
    ``IDLE_SECONDS`` without work. ``_idle`` counts helpers blocked on the queue with no job
    promised to them, so a helper may leave only while another one is idle."""

    IDLE_SECONDS = 30.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle = 0
        self._jobs: queue.SimpleQueue[tuple[Future[object], Callable[[], object]]] = queue.SimpleQueue()

    def submit(self, future: Future[object], fetch: Callable[[], object]) -> None:
        with self._lock:
            start = self._idle == 0
            if not start:
                self._idle -= 1
        self._jobs.put((future, fetch))
        if start:
            threading.Thread(target=self._serve, name="backend-wait", daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                future, fetch = self._jobs.get(timeout=self.IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:
                        self._idle -= 1
                        return
                continue  # a job was promised to an idle helper: this one takes it
            _complete(future, fetch)
            del future, fetch  # nothing of the job outlives it
            with self._lock:
                self._idle += 1


_helpers = _Helpers()


def _complete(future: Future[object], fetch: Callable[[], object]) -> None:
    try:
        result = fetch()
    except BaseException as exc:  # noqa: BLE001 - handed to the waiting reader as is
        _fail(future, exc)
    else:
        try:
            future.set_result(result)
        except Exception:  # noqa: BLE001 - InvalidStateError: cancelled meanwhile, nobody waits
            pass


def _fail(future: Future[object], exc: BaseException) -> bool:
    try:
        future.set_exception(exc)
    except Exception:  # noqa: BLE001 - already resolved
        return False
    return True
