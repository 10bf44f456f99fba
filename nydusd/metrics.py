"""Metrics counters with the exact upstream JSON field names (spec interfaces.md §8).

Owns: ``FsIoStats`` (per mounted filesystem, ``/api/v1/metrics``, ``/metrics/files``,
``/metrics/pattern``), ``BackendMetrics`` (``/api/v1/metrics/backend``) and ``BlobcacheMetrics``
(``/api/v1/metrics/blobcache``), plus the bucket functions shared by them. Each class has
``snapshot() -> dict`` returning plain JSON-ready data (ints, bools, lists, strings).

Must not import anything from the project beyond the leaf set (it is a leaf module itself).

Threading contract: every counter object is shared by FUSE worker threads, prefetch workers and the
API thread; each object guards its fields with its own ``threading.Lock`` (held only for the few
integer updates, never across I/O). ``snapshot()`` returns a consistent copy. The counters of the
read hot path (``FsIoStats.read_done``, ``BlobcacheMetrics.record_read``) take no lock: each
thread adds to its own cells (``ThreadCounters``) and a snapshot sums them, so the API figures are
exact once the reads they count have returned.
"""

from __future__ import annotations

import enum
import threading
import time
from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from typing import Any

#: read-size buckets (8): <1K, 1K-4K, 4K-16K, 16K-64K, 64K-128K, 128K-512K, 512K-1M, >=1M
BLOCK_READ_SIZES_MAX = 8
_SIZE_LIMITS = (1 << 10, 4 << 10, 16 << 10, 64 << 10, 128 << 10, 512 << 10, 1 << 20)
#: filesystem latency buckets (8, microseconds): <=200us, <=1ms, <=20ms, <=50ms, <=500ms, <=1s, <=2s, >2s
READ_LATENCY_RANGE_MAX = 8
_FS_LATENCY_LIMITS_US = (200, 1_000, 20_000, 50_000, 500_000, 1_000_000, 2_000_000)
#: backend latency buckets (8, milliseconds): <=1, <=20, <=50, <=100, <=500, <=1000, <=2000, >2000
_BACKEND_LATENCY_LIMITS_MS = (1, 20, 50, 100, 500, 1000, 2000)


class StatsFop(enum.IntEnum):
    """Index of a filesystem operation in the ``fop_*`` arrays (spec §8)."""

    GETATTR = 0
    READLINK = 1
    OPEN = 2
    RELEASE = 3
    READ = 4
    STATFS = 5
    GETXATTR = 6
    LISTXATTR = 7
    OPENDIR = 8
    LOOKUP = 9
    READDIR = 10
    READDIRPLUS = 11
    ACCESS = 12
    FORGET = 13
    BATCH_FORGET = 14


FOP_MAX = len(StatsFop)


def _bucket(value: float, limits: tuple[int, ...], inclusive: bool) -> int:
    for i, limit in enumerate(limits):
        if value < limit or (inclusive and value == limit):
            return i
    return len(limits)


class ThreadCounters:
    """``width`` integer counters updated without a lock: ``cell()`` is the calling thread's own
    list (only that thread writes it; under the GIL its ``+=`` cannot be torn), ``totals()`` sums
    every thread's list. Cells of finished threads are kept, so no count is ever lost."""

    def __init__(self, width: int) -> None:
        self.width = width
        self._tls = threading.local()
        self._cells: list[list[int]] = []
        self._lock = threading.Lock()   # guards the list of cells (first use per thread, totals)

    def cell(self) -> list[int]:
        cell: list[int] | None = self._tls.__dict__.get("cell")
        if cell is None:
            cell = self._tls.cell = [0] * self.width
            with self._lock:
                self._cells.append(cell)
        return cell

    def totals(self) -> list[int]:
        with self._lock:
            cells = list(self._cells)
        out = [0] * self.width
        for cell in cells:
            for i, v in enumerate(cell):
                out[i] += v
        return out


#: first cell of the latency buckets in ``FsIoStats``' per-thread read cells
_LATENCY_CELL = 3 + BLOCK_READ_SIZES_MAX


def size_bucket(size: int) -> int:
    """Index of ``size`` bytes in the 8 read-size buckets."""
    return _bucket(size, _SIZE_LIMITS, inclusive=False)


def fs_latency_bucket(micros: float) -> int:
    """Index of a filesystem operation latency (microseconds) in the 8 FS latency buckets."""
    return _bucket(micros, _FS_LATENCY_LIMITS_US, inclusive=True)


def backend_latency_bucket(millis: float) -> int:
    """Index of a backend request latency (milliseconds) in the 8 backend latency buckets."""
    return _bucket(millis, _BACKEND_LATENCY_LIMITS_MS, inclusive=True)


class _InodeIoStats:
    """Per-file counters (``/api/v1/metrics/files``); guarded by the owning FsIoStats lock."""

    __slots__ = ("total_fops", "data_read", "block_count_read", "fop_hits", "fop_errors")

    def __init__(self) -> None:
        self.total_fops = 0
        self.data_read = 0
        self.block_count_read = [0] * BLOCK_READ_SIZES_MAX
        self.fop_hits = [0] * FOP_MAX
        self.fop_errors = [0] * FOP_MAX

    def snapshot(self) -> dict[str, Any]:
        return {"total_fops": self.total_fops, "data_read": self.data_read,
                "block_count_read": list(self.block_count_read), "fop_hits": list(self.fop_hits),
                "fop_errors": list(self.fop_errors)}


class FsIoStats:
    """Filesystem I/O counters of one mount (spec §8.1, §8.2, pattern).

    The daemon calls ``fop_done`` once per finished operation (``size`` = bytes returned for READ),
    ``file_opened`` when a per-file counter should exist (lookup/open, only matters with
    ``files_account_enabled``).
    """

    def __init__(self, id: str, *, files_account: bool = False, access_pattern: bool = False,
                 latest_read_files: bool = False) -> None:
        self.id = id
        self.files_account_enabled = files_account
        self.access_pattern_enabled = access_pattern
        self.record_latest_read_files_enabled = latest_read_files
        self._lock = threading.Lock()
        self.nr_opens = 0
        self.data_read = 0
        self.block_count_read = [0] * BLOCK_READ_SIZES_MAX
        self.fop_hits = [0] * FOP_MAX
        self.fop_errors = [0] * FOP_MAX
        self.fop_cumulative_latency_total = [0] * FOP_MAX
        self.read_latency_dist = [0] * READ_LATENCY_RANGE_MAX
        # READ without per-file accounting: per-thread cells (``read_done``), laid out as
        # [hits, data_read, cumulative latency us, 8 size buckets, 8 latency buckets]
        self._reads = ThreadCounters(3 + BLOCK_READ_SIZES_MAX + READ_LATENCY_RANGE_MAX)
        self._per_file_reads = files_account or access_pattern or latest_read_files
        self._files: dict[int, _InodeIoStats] = {}
        # ino -> [nr_read, first_access_time_secs, first_access_time_nanos]
        self._patterns: dict[int, list[int]] = {}
        self._recent_reads: set[int] = set()

    def file_opened(self, ino: int) -> None:
        """Create the per-file counter of ``ino`` (no-op unless per-file accounting is on)."""
        if not self.files_account_enabled:
            return
        with self._lock:
            self._files.setdefault(ino, _InodeIoStats())

    def file_forgotten(self, ino: int) -> None:
        """Drop the per-file counter of an inode the kernel forgot."""
        with self._lock:
            self._files.pop(ino, None)

    def fop_done(self, fop: StatsFop, *, ino: int | None = None, success: bool = True,
                 size: int = 0, latency_us: float = 0.0) -> None:
        """Account one finished operation: hit/error, READ bytes and size bucket, open count, latency."""
        with self._lock:
            self._update_global(fop, success, size)
            self.fop_cumulative_latency_total[fop] += int(latency_us)
            self.read_latency_dist[fs_latency_bucket(latency_us)] += 1
            if ino is None:
                return
            self._update_file(ino, fop, success, size)

    def read_done(self, ino: int, size: int, latency_ns: int) -> None:
        """Account one successful READ of ``size`` bytes (the hot path: no lock unless per-file
        accounting, access patterns or the latest-read-files record are on)."""
        if self._per_file_reads:
            self.fop_done(StatsFop.READ, ino=ino, size=size, latency_us=latency_ns / 1000)
            return
        cell = self._reads.cell()
        cell[0] += 1
        cell[1] += size
        cell[2] += latency_ns // 1000
        cell[3 + bisect_right(_SIZE_LIMITS, size)] += 1
        cell[_LATENCY_CELL + bisect_left(_FS_LATENCY_LIMITS_US, latency_ns / 1000)] += 1

    def _update_global(self, fop: StatsFop, success: bool, size: int) -> None:
        if not success:
            self.fop_errors[fop] += 1
            return
        self.fop_hits[fop] += 1
        if fop is StatsFop.READ:
            self.data_read += size
            self.block_count_read[size_bucket(size)] += 1
        elif fop is StatsFop.OPEN:
            self.nr_opens += 1
        elif fop is StatsFop.RELEASE:
            self.nr_opens = max(0, self.nr_opens - 1)

    def _update_file(self, ino: int, fop: StatsFop, success: bool, size: int) -> None:
        counter = self._files.get(ino) if self.files_account_enabled else None
        if counter is not None:
            counter.total_fops += 1
            if success:
                counter.fop_hits[fop] += 1
                if fop is StatsFop.READ:
                    counter.data_read += size
                    counter.block_count_read[size_bucket(size)] += 1
            else:
                counter.fop_errors[fop] += 1
        if fop is not StatsFop.READ or not success:
            return
        if self.access_pattern_enabled:
            pattern = self._patterns.get(ino)
            if pattern is None:
                now = time.time_ns()
                pattern = self._patterns[ino] = [0, now // 1_000_000_000, now % 1_000_000_000]
            pattern[0] += 1
        if self.record_latest_read_files_enabled:
            self._recent_reads.add(ino)

    def snapshot(self) -> dict[str, Any]:
        """The ``/api/v1/metrics`` object."""
        reads = self._reads.totals()
        sizes = reads[3:3 + BLOCK_READ_SIZES_MAX]
        latencies = reads[3 + BLOCK_READ_SIZES_MAX:]
        with self._lock:
            fop_hits = list(self.fop_hits)
            fop_hits[StatsFop.READ] += reads[0]
            latency_total = list(self.fop_cumulative_latency_total)
            latency_total[StatsFop.READ] += reads[2]
            return {
                "files_account_enabled": self.files_account_enabled,
                "access_pattern_enabled": self.access_pattern_enabled,
                "record_latest_read_files_enabled": self.record_latest_read_files_enabled,
                "measure_latency": True,
                "id": self.id,
                "nr_opens": self.nr_opens,
                "data_read": self.data_read + reads[1],
                "block_count_read": [a + b for a, b in zip(self.block_count_read, sizes, strict=True)],
                "fop_hits": fop_hits,
                "fop_errors": list(self.fop_errors),
                "fop_cumulative_latency_total": latency_total,
                "read_latency_dist": [a + b for a, b in zip(self.read_latency_dist, latencies, strict=True)],
            }

    def files_snapshot(self) -> dict[str, dict[str, Any]]:
        """The ``/api/v1/metrics/files`` object: inode number (string) -> per-file counters."""
        with self._lock:
            return {str(ino): c.snapshot() for ino, c in sorted(self._files.items())}

    def take_latest_read_files(self) -> list[list[int]]:
        """``/metrics/files?latest=true``: runs ``[ino]`` / ``[first, last]`` of inodes read since the
        previous call; clears the record."""
        with self._lock:
            inodes = sorted(self._recent_reads)
            self._recent_reads.clear()
        return _runs(inodes)

    def pattern_snapshot(self) -> list[dict[str, int]]:
        """The ``/api/v1/metrics/pattern`` array (only inodes with reads)."""
        with self._lock:
            return [{"ino": ino, "nr_read": p[0], "first_access_time_secs": p[1],
                     "first_access_time_nanos": p[2]} for ino, p in sorted(self._patterns.items())]


def _runs(sorted_inodes: Iterable[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for ino in sorted_inodes:
        if runs and runs[-1][-1] + 1 == ino:
            run = runs[-1]
            if len(run) == 1:
                run.append(ino)
            else:
                run[1] = ino
        else:
            runs.append([ino])
    return runs


class BackendMetrics:
    """Counters of one backend (spec §8.3). ``record_read`` is called once per backend request."""

    def __init__(self, backend_type: str, id: str = "") -> None:
        self.id = id
        # s3 reports itself as "oss", as upstream does
        self.backend_type = "oss" if backend_type == "s3" else backend_type
        self._lock = threading.Lock()
        self.read_count = 0
        self.read_errors = 0
        self.read_amount_total = 0
        self.read_cumulative_latency_millis_total = 0
        self.read_cumulative_latency_millis_dist = [0] * BLOCK_READ_SIZES_MAX
        self.read_count_block_size_dist = [0] * BLOCK_READ_SIZES_MAX
        self.read_latency_sizes_dist = [[0] * READ_LATENCY_RANGE_MAX for _ in range(BLOCK_READ_SIZES_MAX)]

    def record_read(self, size: int, elapsed_s: float, *, error: bool = False) -> None:
        """Account one request of ``size`` bytes that took ``elapsed_s`` seconds (failed: ``error``)."""
        millis = int(elapsed_s * 1000)
        size_idx = size_bucket(size)
        with self._lock:
            self.read_count += 1
            if error:
                self.read_errors += 1
            else:
                self.read_amount_total += size
            self.read_cumulative_latency_millis_total += millis
            self.read_cumulative_latency_millis_dist[size_idx] += millis
            self.read_count_block_size_dist[size_idx] += 1
            self.read_latency_sizes_dist[size_idx][backend_latency_bucket(millis)] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "backend_type": self.backend_type,
                "read_count": self.read_count,
                "read_errors": self.read_errors,
                "read_amount_total": self.read_amount_total,
                "read_cumulative_latency_millis_total": self.read_cumulative_latency_millis_total,
                "read_cumulative_latency_millis_dist": list(self.read_cumulative_latency_millis_dist),
                "read_count_block_size_dist": list(self.read_count_block_size_dist),
                "read_latency_sizes_dist": [list(row) for row in self.read_latency_sizes_dist],
            }


class BlobcacheMetrics:
    """Counters of one blob cache manager (spec §8.4).

    Hit accounting per ``read`` request: ``total`` +1; all chunks cached -> ``whole_hits`` +1; some
    cached -> ``partial_hits`` +1.
    """

    def __init__(self, id: str = "", store_path: str = "") -> None:
        self.id = id
        self.store_path = store_path
        self._lock = threading.Lock()
        self.underlying_files: set[str] = set()
        #: [total, whole_hits, partial_hits] per thread (``record_read`` is on the read hot path)
        self._reads = ThreadCounters(3)
        self.entries_count = 0
        self.prefetch_data_amount = 0
        self.prefetch_requests_count = 0
        self.prefetch_workers = 0
        self.prefetch_unmerged_chunks = 0
        self.prefetch_cumulative_time_millis = 0
        self._prefetch_begin_ms = 0
        self._prefetch_end_ms = 0
        self.buffered_backend_size = 0
        self.data_all_ready = False

    def add_underlying_file(self, path: str) -> None:
        with self._lock:
            self.underlying_files.add(path)

    def remove_underlying_file(self, path: str) -> None:
        with self._lock:
            self.underlying_files.discard(path)

    def record_read(self, chunks: int, cached: int) -> None:
        """One read request touching ``chunks`` chunks of which ``cached`` were ready."""
        cell = self._reads.cell()
        cell[0] += 1
        if chunks and cached == chunks:
            cell[1] += 1
        elif cached:
            cell[2] += 1

    @property
    def total(self) -> int:
        return self._reads.totals()[0]

    @property
    def whole_hits(self) -> int:
        return self._reads.totals()[1]

    @property
    def partial_hits(self) -> int:
        return self._reads.totals()[2]

    def add_entries(self, n: int) -> None:
        with self._lock:
            self.entries_count += n

    def set_prefetch_workers(self, n: int) -> None:
        with self._lock:
            self.prefetch_workers = n

    def prefetch_started(self) -> None:
        """Mark the beginning of a prefetch round (keeps the first begin time)."""
        with self._lock:
            if not self._prefetch_begin_ms:
                self._prefetch_begin_ms = int(time.time() * 1000)

    def prefetch_finished(self) -> None:
        with self._lock:
            self._prefetch_end_ms = int(time.time() * 1000)

    def record_prefetch(self, *, requests: int, chunks: int, nbytes: int, elapsed_s: float) -> None:
        """One prefetch request done: ``chunks`` chunks, ``nbytes`` bytes fetched in ``elapsed_s``."""
        with self._lock:
            self.prefetch_requests_count += requests
            self.prefetch_unmerged_chunks += chunks
            self.prefetch_data_amount += nbytes
            self.prefetch_cumulative_time_millis += int(elapsed_s * 1000)

    def set_buffered_backend_size(self, n: int) -> None:
        with self._lock:
            self.buffered_backend_size = n

    def set_data_all_ready(self, ready: bool) -> None:
        with self._lock:
            self.data_all_ready = ready

    def snapshot(self) -> dict[str, Any]:
        total, whole_hits, partial_hits = self._reads.totals()
        with self._lock:
            return {
                "id": self.id,
                "underlying_files": sorted(self.underlying_files),
                "store_path": self.store_path,
                "partial_hits": partial_hits,
                "whole_hits": whole_hits,
                "total": total,
                "entries_count": self.entries_count,
                "prefetch_data_amount": self.prefetch_data_amount,
                "prefetch_requests_count": self.prefetch_requests_count,
                "prefetch_workers": self.prefetch_workers,
                "prefetch_unmerged_chunks": self.prefetch_unmerged_chunks,
                "prefetch_cumulative_time_millis": self.prefetch_cumulative_time_millis,
                "prefetch_begin_time_secs": self._prefetch_begin_ms // 1000,
                "prefetch_begin_time_millis": self._prefetch_begin_ms % 1000,
                "prefetch_end_time_secs": self._prefetch_end_ms // 1000,
                "prefetch_end_time_millis": self._prefetch_end_ms % 1000,
                "buffered_backend_size": self.buffered_backend_size,
                "data_all_ready": self.data_all_ready,
            }
