"""The cache manager: the per-blob caches of one backend + cache config, their metrics, the
on-demand activity gate and the prefetch workers (== nydus-storage ``cache`` manager + ``worker``).

Owns: ``BlobCacheManager`` -- one ``BlobCache`` per blob (``get``), the blob-cache metrics
(``counters``, read through ``metrics()``, spec §8.4), the gate that lets prefetch step aside
while on-demand fetches run (``ondemand``, ``wait_ondemand_idle``, ``prefetch_yield``,
``wait_ondemand_quiet``) and the ``Prefetcher`` (``start_prefetch``/``prefetch``/
``wait_prefetch``/``stop_prefetch``), started on the first prefetch and stopped by ``close``.
Subclasses (``blobcache``, ``dummy``) create the per-blob caches (``_open``).

Must not import rafs, fs, daemon or any transport.

Threading: every method may be called from any thread. ``_lock`` guards the cache table and the
prefetcher slot; ``_idle`` (a condition) the count of running on-demand fetches. Neither is held
across I/O or while joining workers.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from nydusd.config import DEFAULT_BATCH_SIZE, PrefetchConfig
from nydusd.errors import BackendError, CorruptMetadata
from nydusd.metrics import BlobcacheMetrics
from nydusd.storage.cache.base import BlobCache, CacheBackend
from nydusd.storage.cache.prefetch import Prefetcher
from nydusd.storage.chunk import BlobInfo, ChunkInfo
from nydusd.storage.waits import BackendWaits

#: longest a streamed prefetch pauses between two pieces for running on-demand fetches
PREFETCH_YIELD_SECONDS = 0.5
#: a *bulk* prefetch (``prefetch_all``) also stays paused this long after the last on-demand fetch
#: ended (a starting container misses in bursts separated by short computations; data a paused
#: stream's socket still takes in is link time the reads do not get) ...
BULK_QUIET_SECONDS = 0.5
#: ... and pauses up to this long at a time
BULK_YIELD_SECONDS = 2.0
#: seconds each prefetch worker is waited for when an aborted manager stops prefetching
ABORT_JOIN = 0.1


class BlobCacheManager(ABC):
    """Owns the per-blob caches of one backend + cache config, and their metrics.

    Not owned: the backend (its creator closes it).
    """

    #: the config's ``cache.type`` this manager serves
    type: str = ""

    def __init__(self, backend: CacheBackend, *, id: str = "", work_dir: str = "",
                 verify_fetched: bool = False, verify_cached: bool = False,
                 batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        self.backend = backend
        self.work_dir = work_dir
        self.verify_fetched = verify_fetched
        self.verify_cached = verify_cached
        self.batch_size = batch_size
        self.counters = BlobcacheMetrics(id, work_dir)
        self._lock = threading.Lock()
        self._caches: dict[str, BlobCache] = {}
        self._closed = False
        self._aborted = False
        self._prefetcher: Prefetcher | None = None
        self._active = 0
        self._idle = threading.Condition()
        #: admission and cancellation of on-demand fetches (the daemon names it after the mountpoint)
        self.waits = BackendWaits(id)
        self.prefetch_pauses = 0  # times a streamed prefetch paused for on-demand fetches
        # monotonic time the last on-demand fetch ended; a mount counts as one (a bulk prefetch
        # leaves the container being started on it a quiet period to issue its first reads in)
        self._ondemand_ended = time.monotonic()

    @abstractmethod
    def _open(self, blob: BlobInfo) -> BlobCache:
        """Create the cache of one blob."""

    def get(self, blob: BlobInfo) -> BlobCache:
        """The cache of ``blob`` (created on first use). Raises BackendError after ``close`` or
        when the cache's local files cannot be opened."""
        with self._lock:
            if self._closed:
                raise BackendError("blob cache is closed", blob_id=blob.blob_id)
            cache = self._caches.get(blob.blob_id)
            if cache is None:
                cache = self._caches[blob.blob_id] = self._open(blob)
            return cache

    def ondemand(self) -> _OnDemand:
        """Context manager marking an on-demand fetch in progress (prefetch steps aside)."""
        return _OnDemand(self)

    def wait_ondemand_idle(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds while on-demand fetches are running. True if idle."""
        with self._idle:
            return self._idle.wait_for(lambda: self._active == 0, timeout)

    def prefetch_yield(self, wanted: Callable[[], bool], *, bulk: bool = False) -> None:
        """A streamed prefetch between two slices: wait while on-demand fetches run (at most
        ``PREFETCH_YIELD_SECONDS``), unless ``wanted()`` says a reader waits for this prefetch.
        A ``bulk`` prefetch also waits out ``BULK_QUIET_SECONDS`` after the last on-demand fetch,
        up to ``BULK_YIELD_SECONDS``."""
        quiet = BULK_QUIET_SECONDS if bulk else 0.0
        deadline = time.monotonic() + (BULK_YIELD_SECONDS if bulk else PREFETCH_YIELD_SECONDS)
        with self._idle:
            while (self._active or time.monotonic() - self._ondemand_ended < quiet) and not wanted():
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self.prefetch_pauses += 1
                self._idle.wait(min(left, 0.02))

    def wait_ondemand_quiet(self, stop: threading.Event, quiet: float | None = None) -> None:
        """Block until no on-demand fetch has run for ``quiet`` seconds (default
        ``BULK_QUIET_SECONDS``; a fresh mount counts as one) or ``stop`` is set: the moment for
        speculative work such as walking a whole image for ``prefetch_all``."""
        quiet = BULK_QUIET_SECONDS if quiet is None else quiet
        while not stop.is_set():
            with self._idle:
                left = quiet - (time.monotonic() - self._ondemand_ended)
                if not self._active and left <= 0:
                    return
            stop.wait(max(0.02, left))

    def metrics(self) -> dict[str, Any]:
        """Blob cache metrics, field names as ``/api/v1/metrics/blobcache`` (spec §8.4)."""
        caches = self._open_caches()
        self.counters.set_data_all_ready(bool(caches) and all(c.all_ready() for c in caches))
        return self.counters.snapshot()

    def backend_metrics(self) -> dict[str, Any]:
        return self.backend.metrics()

    def flush(self) -> None:  # noqa: B027 - optional hook; caches without local state have nothing to sync
        """Make cached data durable now (no-op for caches without local state)."""

    def _open_caches(self) -> list[BlobCache]:
        with self._lock:
            return list(self._caches.values())

    # ------------------------------------------------------------------ prefetch workers
    def start_prefetch(self, cfg: PrefetchConfig | None, blobs: Sequence[BlobInfo]) -> Prefetcher | None:
        """Start the prefetch workers (idempotent) from ``cfg`` (a ``PrefetchConfig``) for the
        blob table ``blobs`` (chunks name their blob by index in it). None once closed."""
        with self._lock:
            if self._closed:
                return None
            if self._prefetcher is None:
                table = list(blobs)

                def cache_of(blob_index: int) -> BlobCache:
                    if not 0 <= blob_index < len(table):
                        raise CorruptMetadata("chunk refers to a blob the image does not list",
                                              blob_index=blob_index, blobs=len(table))
                    return self.get(table[blob_index])

                self._prefetcher = Prefetcher.from_config(
                    cfg, cache_of, metrics=self.counters, wait_ondemand_idle=self.wait_ondemand_idle)
                self._prefetcher.start()
            return self._prefetcher

    def prefetch(self, chunks: Iterable[ChunkInfo], *, merge_limit: int | None = None,
                 bulk: bool = False) -> int:
        """Queue chunks on the started workers (see ``Prefetcher.submit``). Returns the requests
        queued: 0 when the workers are not started or were stopped."""
        prefetcher = self._prefetcher
        return 0 if prefetcher is None else prefetcher.submit(chunks, merge_limit=merge_limit, bulk=bulk)

    def wait_prefetch(self, timeout: float | None = None) -> bool:
        """Block until queued prefetch work is done. True if idle (or never started)."""
        prefetcher = self._prefetcher
        return True if prefetcher is None else prefetcher.wait_idle(timeout)

    def stop_prefetch(self) -> None:
        """Stop and join the prefetch workers (idempotent). After ``abort`` each worker is given
        only ``ABORT_JOIN`` seconds: one stuck on a dead backend finishes (and fails against the
        closed cache) on its own instead of holding up the umount for the backend timeout."""
        with self._lock:
            prefetcher, self._prefetcher = self._prefetcher, None
            aborted = self._aborted
        if prefetcher is not None:
            prefetcher.stop(timeout=ABORT_JOIN if aborted else 10.0)

    # ------------------------------------------------------------------ lifecycle
    def abort(self, reason: str) -> None:
        """Fail every read waiting on the backend now and refuse new prefetch work, without
        waiting for anything (the first step of an umount, before ``close``)."""
        with self._lock:
            self._aborted = True
        self.waits.cancel(reason)

    def close(self) -> None:
        """Stop the prefetch workers, then close every blob cache. Idempotent; the backend stays
        open. (Readers still waiting on the backend are failed by ``abort``, called first.)"""
        self.stop_prefetch()
        with self._lock:
            self._closed = True
            caches = list(self._caches.values())
            self._caches.clear()
        for cache in caches:
            cache.close()


class _OnDemand:
    def __init__(self, manager: BlobCacheManager) -> None:
        self.manager = manager

    def __enter__(self) -> None:
        with self.manager._idle:
            self.manager._active += 1

    def __exit__(self, *exc: object) -> None:
        with self.manager._idle:
            self.manager._active -= 1
            self.manager._ondemand_ended = time.monotonic()
            if self.manager._active == 0:
                self.manager._idle.notify_all()
