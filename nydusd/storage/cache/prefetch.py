"""Background prefetch: worker threads that fill blob caches ahead of on-demand reads
(== nydus-storage ``cache/worker``); started and stopped by the cache manager.

Owns: ``Prefetcher`` (a queue of chunk runs served by ``threads`` workers) and ``TokenBucket``
(``bandwidth_limit`` in bytes per second). The filesystem maps the image's prefetch-table
files (or, with ``prefetch_all``, every file) to chunks and submits them through the manager;
runs of chunks adjacent in their blob are merged up to ``batch_size`` bytes per backend request,
also across separately submitted files (``submit(..., merge_limit=)`` raises the limit for one
submission, e.g.
``BULK_MERGE_SIZE`` for whole-blob prefetch; long stretches are cut into even runs). At most
one run per CPU streams at a time, process-wide (``_BACKGROUND_STREAMS``): on a fast network
streamed prefetch is CPU-bound.

Priority rules (on-demand reads always go first):
- a worker takes its bandwidth tokens *before* claiming any chunk, so throttling never delays a
  reader waiting for that chunk;
- before each request a worker steps aside while on-demand fetches are running (bounded wait);
- a streamed request stops pulling between two pieces while on-demand fetches run, unless a
  reader waits for one of its chunks (``BlobCacheManager.prefetch_yield``): TCP flow control then
  gives the link to the readers;
- a prefetch fetch holds no lock an on-demand read needs; a reader that wants a chunk being
  prefetched joins that fetch through the cache's singleflight table, and retries on its own if
  the prefetch fails.

Must not import rafs, fs, daemon or any transport; caches are reached through the
``cache_of(blob_index)`` callable given by the cache manager.

Threading: ``submit``, ``wait_idle`` and ``stop`` may be called from any thread. One condition
variable guards the queue and the pending count; workers hold it only to take a request.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from nydusd.config import DEFAULT_BATCH_SIZE, PrefetchConfig
from nydusd.errors import NydusError
from nydusd.log import get_logger
from nydusd.metrics import BlobcacheMetrics

if TYPE_CHECKING:
    from nydusd.storage.cache.base import BlobCache
    from nydusd.storage.chunk import ChunkInfo

log = get_logger(__name__)

DEFAULT_THREADS = 8
#: merge limit worth using for whole-blob prefetch (``prefetch_all``): requests are streamed in
#: pieces, so a large request costs no more memory or first-chunk latency than a small one, while
#: registries charge several milliseconds per request whatever its size
BULK_MERGE_SIZE = 32 << 20
#: background requests in flight at once, process-wide: streamed prefetch is CPU-bound on a
#: fast network (decode + page-cache copy), and more streams than CPUs only contend for them,
#: the GIL and the cache file's write lock.
_BACKGROUND_STREAMS = threading.BoundedSemaphore(max(2, os.cpu_count() or 2))
#: longest a worker defers to running on-demand fetches before issuing its next request anyway
ONDEMAND_YIELD_SECONDS = 0.5


class TokenBucket:
    """Byte-rate limiter: ``consume(n)`` blocks until ``n`` bytes fit ``rate`` bytes/second.

    The bucket holds up to one second of tokens; a request larger than that runs the balance
    negative and the *next* caller waits it off, so the long-run rate stays at ``rate``.
    Thread-safe; the lock is never held while sleeping.
    """

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._tokens = float(rate)
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    def consume(self, n: int, stop: threading.Event | None = None) -> bool:
        """Take ``n`` tokens, sleeping as needed. Returns False if ``stop`` was set meanwhile."""
        if self.rate <= 0:
            return True
        with self._lock:
            now = time.monotonic()
            self._tokens = min(float(self.rate), self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            wait = max(0.0, -self._tokens) / self.rate
            self._tokens -= n
        if wait <= 0:
            return True
        if stop is None:
            time.sleep(wait)
            return True
        return not stop.wait(wait)


class Prefetcher:
    """Worker pool prefetching chunk runs into blob caches (see module docstring)."""

    def __init__(self, cache_of: Callable[[int], BlobCache], *, threads: int = DEFAULT_THREADS,
                 batch_size: int = DEFAULT_BATCH_SIZE, bandwidth_limit: int = 0,
                 metrics: BlobcacheMetrics | None = None,
                 wait_ondemand_idle: Callable[[float], bool] | None = None) -> None:
        self.cache_of = cache_of
        self.threads = max(1, threads)
        self.batch_size = max(0, batch_size)
        self.bucket = TokenBucket(bandwidth_limit)
        self.metrics = metrics or BlobcacheMetrics()
        self._wait_ondemand_idle = wait_ondemand_idle
        self._cond = threading.Condition()
        # (blob_index, run, merge limit)
        self._queue: deque[tuple[int, list[ChunkInfo], int]] = deque()
        self._bulk: set[int] = set()  # id() of queued runs submitted as bulk
        self._pending = 0  # queued + running requests
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        self.errors = 0

    @classmethod
    def from_config(cls, cfg: PrefetchConfig | None, cache_of: Callable[[int], BlobCache],
                    **kw: Any) -> Prefetcher:
        """From a ``PrefetchConfig`` (``threads``, ``batch_size``, ``bandwidth_limit``); None: the
        defaults."""
        cfg = cfg or PrefetchConfig()
        return cls(cache_of, threads=cfg.threads or DEFAULT_THREADS, batch_size=cfg.batch_size,
                   bandwidth_limit=cfg.bandwidth_limit, **kw)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the workers (idempotent)."""
        with self._cond:
            if self._workers or self._stop.is_set():
                return
            for n in range(self.threads):
                worker = threading.Thread(target=self._run, name=f"nydus-prefetch-{n}", daemon=True)
                self._workers.append(worker)
            self.metrics.set_prefetch_workers(self.threads)
        for worker in self._workers:
            worker.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Drop queued work, stop the workers and join them (running requests finish first)."""
        self._stop.set()
        with self._cond:
            self._pending -= len(self._queue)
            self._queue.clear()
            self._bulk.clear()
            self._cond.notify_all()
        for worker in self._workers:
            worker.join(timeout)
        alive = [w.name for w in self._workers if w.is_alive()]
        if alive:
            log.warning("prefetch_workers_stuck", workers=alive)
        self.metrics.set_prefetch_workers(0)

    @property
    def running(self) -> bool:
        return bool(self._workers) and not self._stop.is_set()

    # ------------------------------------------------------------------ work
    def submit(self, chunks: Iterable[ChunkInfo], *, merge_limit: int | None = None,
               bulk: bool = False) -> int:
        """Queue ``chunks`` (any blobs, any order, duplicates allowed). Returns requests queued.

        ``merge_limit``: largest request for these chunks (default ``batch_size``).
        ``bulk``: speculative whole-image prefetch (``prefetch_all``): its streams stay paused
        a while after on-demand fetches, not only while they run (``BlobCache.prefetch_chunks``)."""
        limit = self.batch_size if merge_limit is None else merge_limit
        runs = [(blob_index, run, limit) for blob_index, run in self._split(chunks, limit)]
        if not runs or self._stop.is_set():
            return 0
        self.metrics.prefetch_started()
        with self._cond:
            if bulk:
                self._bulk.update(id(r[1]) for r in runs)
            self._queue.extend(runs)
            self._pending += len(runs)
            self._cond.notify_all()
        return len(runs)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every queued request is done. True if idle, False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending <= 0, timeout)

    def _split(self, chunks: Iterable[ChunkInfo], limit: int) -> list[tuple[int, list[ChunkInfo]]]:
        """Per blob: deduplicate, sort by blob offset, cut into adjacent runs <= ``limit``. A
        contiguous stretch longer than ``limit`` is cut into that many runs of even size (not
        greedily, which leaves a short tail run and one worker doing twice the work). The runs are
        returned in the order of need: by the first position in ``chunks`` of any of their chunks
        (a replayed access order is fetched in that order, in merged requests)."""
        per_blob: dict[int, dict[int, ChunkInfo]] = {}
        rank: dict[tuple[int, int], int] = {}
        for pos, chunk in enumerate(chunks):
            by_offset = per_blob.setdefault(chunk.blob_index, {})
            if chunk.compressed_offset not in by_offset:
                by_offset[chunk.compressed_offset] = chunk
                rank[chunk.blob_index, chunk.compressed_offset] = pos
        runs: list[tuple[int, list[ChunkInfo]]] = []
        for blob_index, by_offset in per_blob.items():
            stretch: list[ChunkInfo] = []
            for chunk in sorted(by_offset.values(), key=lambda c: c.compressed_offset):
                last = stretch[-1] if stretch else None
                if last and chunk.compressed_offset != last.compressed_offset + last.compressed_size:
                    runs.extend((blob_index, run) for run in _cut(stretch, limit))
                    stretch = []
                stretch.append(chunk)
            if stretch:
                runs.extend((blob_index, run) for run in _cut(stretch, limit))
        runs.sort(key=lambda r: min(rank[r[0], c.compressed_offset] for c in r[1]))
        return runs

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._stop.is_set())
                if self._stop.is_set():
                    return
                blob_index, run, taken, bulk = self._take()
            try:
                self._serve(blob_index, run, bulk)
            finally:
                with self._cond:
                    self._pending -= taken
                    if self._pending <= 0:
                        self.metrics.prefetch_finished()
                    self._cond.notify_all()

    def _take(self) -> tuple[int, list[ChunkInfo], int, bool]:
        """Pop the next run and merge queued runs that continue it in the same blob (callers such
        as the daemon submit file by file; adjacent small files become one request). Called with
        the condition held. Returns the run and how many queued requests it absorbed."""
        blob_index, run, limit = self._queue.popleft()
        bulk = id(run) in self._bulk
        self._bulk.discard(id(run))
        taken = 1
        while self._queue:
            next_blob, next_run, next_limit = self._queue[0]
            end = run[-1].compressed_offset + run[-1].compressed_size
            span = next_run[-1].compressed_offset + next_run[-1].compressed_size - run[0].compressed_offset
            if (next_blob != blob_index or next_run[0].compressed_offset != end
                    or span > min(limit, next_limit)):
                break
            self._queue.popleft()
            bulk = bulk and id(next_run) in self._bulk
            self._bulk.discard(id(next_run))
            run = run + next_run
            taken += 1
        return blob_index, run, taken, bulk

    def _serve(self, blob_index: int, run: list[ChunkInfo], bulk: bool = False) -> None:
        start = time.monotonic()
        try:
            cache = self.cache_of(blob_index)
            missing = cache.missing(run)
            if not missing:
                return
            self._yield_to_ondemand()
            # Tokens first, claims second: a throttled worker holds no chunk a reader may need.
            if not self.bucket.consume(sum(c.compressed_size for c in missing), self._stop):
                return
            # one request per run: runs were cut to their merge limit when queued or taken
            span = run[-1].compressed_offset + run[-1].compressed_size - run[0].compressed_offset
            limit = max(span, self.batch_size)
            with _BACKGROUND_STREAMS:
                chunks, nbytes = cache.prefetch_chunks(missing, merge_limit=limit, bulk=bulk)
        except NydusError as exc:
            self.errors += 1
            log.warning("prefetch_failed", blob_index=blob_index, chunks=len(run), cause=str(exc))
            return
        except Exception:
            self.errors += 1
            log.exception("prefetch_crashed", blob_index=blob_index, chunks=len(run))
            return
        if chunks:
            self.metrics.record_prefetch(requests=1, chunks=chunks, nbytes=nbytes,
                                         elapsed_s=time.monotonic() - start)

    def _yield_to_ondemand(self) -> None:
        if self._wait_ondemand_idle is None:
            return
        deadline = time.monotonic() + ONDEMAND_YIELD_SECONDS
        while not self._stop.is_set() and time.monotonic() < deadline:
            if self._wait_ondemand_idle(0.02):
                return


def _cut(stretch: list[ChunkInfo], limit: int) -> list[list[ChunkInfo]]:
    """Cut chunks adjacent in their blob into runs of at most ``limit`` bytes (a chunk larger than
    ``limit`` is a run of its own) of about even size: ``ceil(total / limit)`` runs whose starts
    sit near multiples of ``total / runs``, rather than full runs and a short tail."""
    base = stretch[0].compressed_offset
    total = stretch[-1].compressed_offset + stretch[-1].compressed_size - base
    count = -(-total // limit) if limit > 0 else 1
    runs: list[list[ChunkInfo]] = []
    run: list[ChunkInfo] = []
    for chunk in stretch:
        start = chunk.compressed_offset - base
        if run and (chunk.compressed_offset + chunk.compressed_size - run[0].compressed_offset > limit
                    or start * count >= (len(runs) + 1) * total):
            runs.append(run)
            run = []
        run.append(chunk)
    if run:
        runs.append(run)
    return runs
