"""The blob backend interface and the policy every backend shares (design R6).

Owns: ``BlobBackend`` (ABC), ``RetryPolicy``. A subclass implements one attempt of each operation --
``try_blob_size(blob_id)`` and ``try_read(blob_id, offset, size)`` (may return short) -- and
``is_transient(exc)``; the concrete ``blob_size``/``read`` here own retry with exponential backoff
and jitter, the exact-length check (a read may come back short only where the blob ends), the
on-demand vs prefetch retry budget, error context (blob id, range, cause, attempts) and metrics.
``RangeReader`` (from ``open_range``) consumes a long range front to back into caller buffers; a
backend that can stream (``streams_ranges``, ``try_open_range``) sends one request and the reader
resumes it at the current position after a transient failure; other backends read the whole range
with ``read`` on first use.

Must not import rafs, fs, daemon, cache or any HTTP library: transports live in the subclasses.

Threading: a backend instance is shared by every FUSE worker and prefetch thread; ``read`` and
``blob_size`` may be called concurrently. The base class keeps its state (size cache, metrics)
under small locks; subclasses must be thread-safe in ``try_*``.
"""

from __future__ import annotations

import os
import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar

from nydusd.config import RemoteConfig
from nydusd.errors import BackendError, BlobNotFound, NydusError, Unsupported
from nydusd.log import get_logger
from nydusd.metrics import BackendMetrics

log = get_logger(__name__)

T = TypeVar("T")
#: the longest server-requested (Retry-After) pause honoured before a retry, in seconds
MAX_RETRY_AFTER = 10.0


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a backend retries a transient failure.

    ``retry_limit`` extra attempts for on-demand reads (the config's ``retry_limit``); prefetch
    reads get at most ``prefetch_retry_limit`` (a failed prefetch is harmless: the on-demand path
    fetches again). Delays grow as ``base_delay * 2**n`` up to ``max_delay`` with "equal jitter"
    (half fixed, half random) so that many workers do not retry in lock-step. ``max_elapsed``
    bounds the whole call: no new attempt starts after it.
    """

    retry_limit: int = 0
    prefetch_retry_limit: int = 1
    base_delay: float = 0.05
    max_delay: float = 2.0
    max_elapsed: float = 60.0

    def attempts(self, prefetch: bool) -> int:
        limit = max(0, self.retry_limit)
        if prefetch:
            limit = min(limit, max(0, self.prefetch_retry_limit))
        return 1 + limit

    def delay(self, attempt: int) -> float:
        """Sleep before retry number ``attempt`` (0-based)."""
        full = min(self.max_delay, self.base_delay * (2.0 ** attempt))
        return full / 2 + random.uniform(0, full / 2)

    @classmethod
    def from_config(cls, cfg: RemoteConfig) -> RetryPolicy:
        """Derive the policy from a remote backend config (``retry_limit``, ``timeout``,
        ``connect_timeout``): the whole call may take one timeout per attempt plus the backoff."""
        limit = cfg.retry_limit
        # a timeout of 0 counts as the default 5 s here
        per_try = float(cfg.timeout or 5) + float(cfg.connect_timeout or 5)
        return cls(retry_limit=limit, max_elapsed=per_try * (1 + limit) + 2.0 * limit)


class RangeStream(Protocol):
    """What ``try_open_range`` returns: one range of a blob on the wire, read front to back."""

    def readinto(self, view: memoryview) -> None:
        """Fill ``view`` with the next ``len(view)`` bytes or raise a transient BackendError."""

    def close(self) -> None:
        """Release the connection (a partly read one is dropped)."""


def _as_backend_error(exc: BaseException) -> BackendError:
    """Wrap an unexpected OSError (socket, file) as a BackendError, keeping its transience."""
    if isinstance(exc, BackendError):
        return exc
    transient = isinstance(exc, (ConnectionError, TimeoutError, InterruptedError))
    return BackendError(f"{type(exc).__name__}: {exc}", transient=transient)


class BlobBackend(ABC):
    """A read-only store of blobs addressed by blob id (hex digest, no ``sha256:`` prefix)."""

    #: the config's ``backend.type`` this class serves
    type: ClassVar[str] = ""

    def __init__(self, retry: RetryPolicy | None = None) -> None:
        self.retry = retry or RetryPolicy()
        self._metrics = BackendMetrics(self.type)
        self._sizes: dict[str, int] = {}
        self._sizes_lock = threading.Lock()

    # ----------------------------------------------------------------- subclass hooks
    @abstractmethod
    def try_blob_size(self, blob_id: str) -> int:
        """One attempt to learn the size of a blob. Raises BlobNotFound, BackendError."""

    @abstractmethod
    def try_read(self, blob_id: str, offset: int, size: int, *, prefetch: bool = False) -> bytes:
        """One attempt to read ``size`` bytes at ``offset``; may return fewer bytes.

        Raises BlobNotFound, AuthError or BackendError (``transient`` set when a retry may help).
        """

    def is_transient(self, exc: BaseException) -> bool:
        """Whether retrying after ``exc`` may succeed (connection errors, 5xx, 429, short bodies)."""
        if isinstance(exc, BackendError):
            return exc.transient
        return isinstance(exc, (ConnectionError, TimeoutError, InterruptedError))

    #: whether ``try_open_range`` streams a range (else ``open_range`` falls back to ``read``)
    streams_ranges: ClassVar[bool] = False

    def try_open_range(self, blob_id: str, offset: int, size: int, *,
                       prefetch: bool = False) -> RangeStream | None:
        """One attempt to start streaming ``size`` bytes at ``offset``: an object with
        ``readinto(view)`` (fills ``view`` or raises a transient BackendError) and ``close()``; None
        when the range starts at or past the end of the blob. Only for ``streams_ranges`` backends."""
        raise Unsupported(f"the {self.type} backend cannot stream ranges", blob_id=blob_id)

    def try_put(self, blob_id: str, path: str) -> None:
        """One attempt to store the file at ``path`` as blob ``blob_id`` (writable backends:
        localfs, oss, s3 -- what nydusify uploads to). Raises Unsupported here."""
        raise Unsupported(f"the {self.type} backend cannot store blobs", blob_id=blob_id)

    def check_blobs(self, blob_ids: list[str]) -> None:
        """Called when an image is mounted: raise BlobNotFound now for a blob that can never be
        read. Only local backends can tell cheaply; remote ones answer per read (no-op here)."""
        return

    def close(self) -> None:
        """Release connections and threads. Idempotent. Subclasses extend it (and call super)."""
        with self._sizes_lock:
            self._sizes.clear()

    # ----------------------------------------------------------------- public API
    def blob_size(self, blob_id: str) -> int:
        """Size of a blob in bytes (cached: blobs are immutable).

        Raises BlobNotFound if the blob is missing, AuthError, BackendError after the retries.
        """
        with self._sizes_lock:
            known = self._sizes.get(blob_id)
        if known is not None:
            return known
        size = self._with_retry(lambda: self.try_blob_size(blob_id), blob_id=blob_id,
                                op="blob_size", prefetch=False)
        with self._sizes_lock:
            self._sizes[blob_id] = size
        return size

    def read(self, blob_id: str, offset: int, size: int, *, prefetch: bool = False) -> bytes:
        """Read exactly ``size`` bytes at ``offset`` of a blob, retrying transient failures.

        Returns fewer bytes only when the range runs past the end of the blob (and ``b""`` for a
        read starting exactly at the end). Raises BlobNotFound if the blob is missing, AuthError
        when credentials are refused, BackendError otherwise (a read starting past the end of the
        blob, or retries exhausted); every error carries blob_id, offset, size and the cause.
        """
        if offset < 0 or size < 0:
            raise BackendError("negative read range", blob_id=blob_id, offset=offset, size=size)
        if size == 0:
            return b""
        start = time.monotonic()
        try:
            data = self._with_retry(lambda: self._read_checked(blob_id, offset, size, prefetch),
                                    blob_id=blob_id, op="read", prefetch=prefetch,
                                    offset=offset, size=size)
        except BackendError:
            self._metrics.record_read(size, time.monotonic() - start, error=True)
            raise
        self._metrics.record_read(len(data), time.monotonic() - start)
        return data

    def open_range(self, blob_id: str, offset: int, size: int, *, prefetch: bool = False) -> RangeReader:
        """A reader of ``[offset, offset+size)`` to be consumed in order with ``readinto`` (one
        backend request for the whole range where the backend streams). Close it (or use ``with``).
        """
        if offset < 0 or size <= 0:
            raise BackendError("empty or negative read range", blob_id=blob_id, offset=offset, size=size)
        return RangeReader(self, blob_id, offset, size, prefetch)

    def blob_exists(self, blob_id: str) -> bool:
        """Whether the backend holds the blob. Raises AuthError, BackendError (after retries)."""
        try:
            self.blob_size(blob_id)
        except BlobNotFound:
            return False
        return True

    def put_blob(self, blob_id: str, path: str) -> None:
        """Store the file at ``path`` as blob ``blob_id``, retrying transient failures: one
        ``try_put`` up to ``multipart_threshold()`` bytes, ``put_multipart`` above it.

        Raises Unsupported for read-only backends, AuthError, BackendError.
        """
        threshold = self.multipart_threshold()
        try:
            total = os.path.getsize(path)
        except OSError:
            total = 0  # the single PUT reports the unreadable file
        if threshold is not None and total > threshold:
            self.put_multipart(blob_id, path, total)
        else:
            self._with_retry(lambda: self.try_put(blob_id, path), blob_id=blob_id, op="put",
                             prefetch=False)
        with self._sizes_lock:
            self._sizes.pop(blob_id, None)

    def multipart_threshold(self) -> int | None:
        """Largest blob ``put_blob`` sends in one request; None: no multipart upload."""
        return None

    def put_multipart(self, blob_id: str, path: str, total: int) -> None:
        """Upload a ``total``-byte file in parts (backends with a ``multipart_threshold``)."""
        raise Unsupported(f"{self.type} backend has no multipart upload", blob_id=blob_id)

    def metrics(self) -> dict[str, Any]:
        """Backend metrics, field names exactly as ``/api/v1/metrics/backend`` (spec §8.3)."""
        return self._metrics.snapshot()

    def __enter__(self) -> BlobBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- policy
    def _read_checked(self, blob_id: str, offset: int, size: int, prefetch: bool) -> bytes:
        data = self.try_read(blob_id, offset, size, prefetch=prefetch)
        got = len(data)
        if got == size:
            return data
        if got > size:
            raise BackendError("backend returned more bytes than requested", transient=True, got=got)
        # A short answer is fine only where the blob ends; anything else is a truncated body.
        total = self.blob_size(blob_id)
        if offset > total:
            raise BackendError("read starts beyond the end of the blob", transient=False,
                               blob_size=total)
        if offset + got == total:
            return data
        raise BackendError("short read", transient=True, got=got, blob_size=total)

    def _with_retry(self, call: Callable[[], T], *, blob_id: str, op: str, prefetch: bool,
                    offset: int | None = None, size: int | None = None) -> T:
        policy = self.retry
        attempts = policy.attempts(prefetch)
        deadline = time.monotonic() + policy.max_elapsed
        attempt = 0
        while True:
            try:
                return call()
            except (NydusError, OSError) as raw:
                if isinstance(raw, NydusError) and not isinstance(raw, BackendError):
                    raise  # not a backend failure (Unsupported, ConfigError ...): no retry, as is
                exc = _as_backend_error(raw) if not isinstance(raw, NydusError) else raw
                transient = self.is_transient(raw)
                attempt += 1
                delay = policy.delay(attempt - 1)
                # A server that says when to come back (429/503 Retry-After) is believed, within
                # reason; the overall deadline still applies.
                retry_after = getattr(exc, "retry_after", None)
                if isinstance(retry_after, (int, float)):
                    delay = max(delay, min(float(retry_after), MAX_RETRY_AFTER))
                if not transient or attempt >= attempts or time.monotonic() + delay > deadline:
                    raise self._final_error(exc, raw, op=op, blob_id=blob_id, offset=offset,
                                            size=size, attempts=attempt, transient=transient) from raw
                self._log_retry(attempt, op=op, blob_id=blob_id, offset=offset, size=size,
                                cause=str(exc), delay=round(delay, 3))
                time.sleep(delay)

    def _log_retry(self, attempt: int, **ctx: Any) -> None:
        # The level rises with the attempt number: one blip is routine, a storm is worth a warning.
        if attempt <= 1:
            log.debug("backend_read_retried", backend=self.type, attempt=attempt, **ctx)
        elif attempt == 2:
            log.info("backend_read_retried", backend=self.type, attempt=attempt, **ctx)
        else:
            log.warning("backend_read_retried", backend=self.type, attempt=attempt, **ctx)

    def _final_error(self, exc: NydusError, raw: BaseException, *, op: str, blob_id: str,
                     offset: int | None, size: int | None, attempts: int,
                     transient: bool) -> BackendError:
        cls = type(exc) if isinstance(exc, BackendError) else BackendError
        base_msg = exc.message if isinstance(exc, NydusError) and exc.message else str(exc)
        ctx = {k: v for k, v in exc.context.items()
               if k not in ("blob_id", "offset", "size", "attempts", "backend", "cause")}
        err = cls(f"{self.type} backend {op} failed: {base_msg}", transient=transient,
                  backend=self.type, blob_id=blob_id, offset=offset, size=size,
                  attempts=attempts, **ctx)
        if transient:
            # Retries exhausted on a failure that should have gone away: worth an operator's eye.
            log.error("backend_retries_exhausted", backend=self.type, op=op, blob_id=blob_id,
                      offset=offset, size=size, attempts=attempts, cause=base_msg)
        return err


def clamp_range(offset: int, size: int, total: int) -> int:
    """How many bytes of ``[offset, offset+size)`` lie inside a blob of ``total`` bytes."""
    return max(0, min(size, total - offset))


class RangeReader:
    """A blob range consumed front to back (see ``BlobBackend.open_range``). ``readinto(view)``
    fills ``view`` with the next ``len(view)`` bytes, retrying transient failures by reopening the
    range at the current position (the backend's retry policy, per call). Accounts one backend
    request (of the bytes consumed) in the metrics when closed. Not thread-safe."""

    def __init__(self, backend: BlobBackend, blob_id: str, offset: int, size: int, prefetch: bool) -> None:
        self.backend = backend
        self.blob_id = blob_id
        self.pos = offset
        self.end = offset + size
        self.prefetch = prefetch
        self._stream: RangeStream | None = None
        self._whole: memoryview | None = None  # non-streaming backends: the range, read at once
        self._start = time.monotonic()
        self._done = 0
        self._failed = False
        self._closed = False

    def readinto(self, view: memoryview) -> None:
        n = len(view)
        if self.pos + n > self.end:
            raise BackendError("read past the end of the opened range", blob_id=self.blob_id,
                               offset=self.pos, size=n)
        try:
            if not self.backend.streams_ranges:
                self._read_whole(view)
            else:
                self.backend._with_retry(lambda: self._fill(view), blob_id=self.blob_id, op="read",
                                         prefetch=self.prefetch, offset=self.pos, size=n)
        except BaseException:
            self._failed = True
            raise
        self.pos += n
        self._done += n

    def _read_whole(self, view: memoryview) -> None:
        if self._whole is None:
            data = self.backend._with_retry(
                lambda: self.backend._read_checked(self.blob_id, self.pos, self.end - self.pos,
                                                   self.prefetch),
                blob_id=self.blob_id, op="read", prefetch=self.prefetch, offset=self.pos,
                size=self.end - self.pos)
            self._whole = memoryview(data)
            self._base = self.pos
        got = self._whole[self.pos - self._base:][:len(view)]
        if len(got) != len(view):
            raise BackendError("read starts beyond the end of the blob", blob_id=self.blob_id,
                               offset=self.pos, size=len(view))
        view[:] = got

    def _fill(self, view: memoryview) -> None:
        if self._stream is None:
            stream = self.backend.try_open_range(self.blob_id, self.pos, self.end - self.pos,
                                                 prefetch=self.prefetch)
            if stream is None:
                raise BackendError("read starts beyond the end of the blob", transient=False)
            self._stream = stream
        try:
            self._stream.readinto(view)
        except BaseException:
            self._drop()
            raise

    def _drop(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass

    def close(self) -> None:
        """Release the connection (returned to the pool only when fully read). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._drop()
        self._whole = None
        self.backend._metrics.record_read(self._done, time.monotonic() - self._start,
                                          error=self._failed)

    def __enter__(self) -> RangeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
