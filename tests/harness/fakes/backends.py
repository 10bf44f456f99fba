"""In-process backend doubles for the pure test tier (never imported by product code).

``MemoryBackend`` serves blobs from a dict through the real ``BlobBackend`` base (so retries,
length checks and metrics are the product's own); it records every request and can be slowed
(``delay``) or held (``gate``). ``FlakyBackend`` adds injected faults: ``fail_times`` failed
attempts, ``short_reads`` truncated answers, ``corrupt`` answers with one flipped byte.

Thread-safe: counters and fault budgets are guarded by one lock.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import ClassVar

from nydusd.errors import BackendError, BlobNotFound
from nydusd.storage.backend.base import BlobBackend, RetryPolicy

FAST_RETRY = RetryPolicy(retry_limit=3, prefetch_retry_limit=1, base_delay=0.001, max_delay=0.01)


class MemoryBackend(BlobBackend):
    """Blobs held in memory. ``requests`` lists ``(blob_id, offset, size, prefetch)`` per attempt."""

    type: ClassVar[str] = "localfs"

    def __init__(self, blobs: dict[str, bytes] | None = None, *, delay: float = 0.0,
                 retry: RetryPolicy | None = None) -> None:
        super().__init__(retry or FAST_RETRY)
        self.blobs: dict[str, bytes] = dict(blobs or {})
        self.delay = delay
        #: when not None, every read blocks until this event is set
        self.gate: threading.Event | None = None
        self.requests: list[tuple[str, int, int, bool]] = []
        self._lock = threading.Lock()
        self.closed = False

    @classmethod
    def from_dir(cls, path: str | Path, **kw: object) -> MemoryBackend:
        """Load every file of ``path`` as a blob named after the file."""
        blobs = {p.name: p.read_bytes() for p in Path(path).iterdir() if p.is_file()}
        return cls(blobs, **kw)  # type: ignore[arg-type]

    def add(self, blob_id: str, data: bytes) -> None:
        with self._lock:
            self.blobs[blob_id] = data

    def try_blob_size(self, blob_id: str) -> int:
        try:
            return len(self.blobs[blob_id])
        except KeyError:
            raise BlobNotFound("no such blob", blob_id=blob_id) from None

    def try_read(self, blob_id: str, offset: int, size: int, *, prefetch: bool = False) -> bytes:
        with self._lock:
            self.requests.append((blob_id, offset, size, prefetch))
        gate = self.gate
        if gate is not None:
            gate.wait(30)
        if self.delay:
            time.sleep(self.delay)
        try:
            data = self.blobs[blob_id]
        except KeyError:
            raise BlobNotFound("no such blob", blob_id=blob_id) from None
        return data[offset:offset + size]

    # ------------------------------------------------------------------ observations
    @property
    def read_count(self) -> int:
        with self._lock:
            return len(self.requests)

    @property
    def bytes_read(self) -> int:
        with self._lock:
            return sum(r[2] for r in self.requests)

    def reset_stats(self) -> None:
        with self._lock:
            self.requests.clear()

    def close(self) -> None:
        self.closed = True
        super().close()


class FlakyBackend(MemoryBackend):
    """A MemoryBackend with fault budgets consumed one per attempt, in this order:
    ``fail_times`` (raise BackendError, ``transient`` as given), ``short_reads`` (return half),
    ``corrupt`` (flip the byte at ``corrupt_at`` of the answer, default its middle)."""

    def __init__(self, blobs: dict[str, bytes] | None = None, *, fail_times: int = 0,
                 short_reads: int = 0, corrupt: int = 0, corrupt_at: int | None = None,
                 transient: bool = True, **kw: object) -> None:
        super().__init__(blobs, **kw)  # type: ignore[arg-type]
        self.fail_times = fail_times
        self.short_reads = short_reads
        self.corrupt = corrupt
        self.corrupt_at = corrupt_at
        self.transient = transient

    def _take(self, name: str) -> bool:
        with self._lock:
            left = getattr(self, name)
            if left > 0:
                setattr(self, name, left - 1)
                return True
            return False

    def try_read(self, blob_id: str, offset: int, size: int, *, prefetch: bool = False) -> bytes:
        data = super().try_read(blob_id, offset, size, prefetch=prefetch)
        if self._take("fail_times"):
            raise BackendError("injected failure", transient=self.transient, blob_id=blob_id)
        if data and self._take("short_reads"):
            return data[:len(data) // 2]
        if data and self._take("corrupt"):
            at = len(data) // 2 if self.corrupt_at is None else self.corrupt_at
            flipped = bytearray(data)
            flipped[at] ^= 0xFF
            return bytes(flipped)
        return data


def write_blobs(blobs: dict[str, bytes], directory: str | Path) -> Path:
    """Write blobs as files named by blob id (what a localfs backend or ``from_dir`` reads)."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    for blob_id, data in blobs.items():
        (path / blob_id).write_bytes(data)
        os.chmod(path / blob_id, 0o644)
    return path
