"""nydusd.metrics: bucket boundaries and the exact JSON field names of spec §8."""

from __future__ import annotations

import json
import threading

from nydusd.metrics import (
    BackendMetrics,
    BlobcacheMetrics,
    FsIoStats,
    StatsFop,
    backend_latency_bucket,
    fs_latency_bucket,
    size_bucket,
)


def test_size_buckets_follow_the_spec_boundaries() -> None:
    cases = {0: 0, 1023: 0, 1024: 1, 4095: 1, 4096: 2, 16383: 2, 16384: 3, 65535: 3, 65536: 4,
             131071: 4, 131072: 5, 524287: 5, 524288: 6, 1048575: 6, 1048576: 7, 1 << 30: 7}
    assert {n: size_bucket(n) for n in cases} == cases


def test_latency_buckets_are_inclusive_upper_bounds() -> None:
    assert [fs_latency_bucket(us) for us in (0, 200, 201, 1000, 20_000, 50_001, 2_000_000, 2_000_001)] \
        == [0, 0, 1, 1, 2, 4, 6, 7]
    assert [backend_latency_bucket(ms) for ms in (0, 1, 2, 20, 50, 100, 500, 1000, 2000, 2001)] \
        == [0, 0, 1, 1, 2, 3, 4, 5, 6, 7]


def test_fs_iostats_snapshot_counts_reads_opens_and_errors() -> None:
    stats = FsIoStats("/mnt", files_account=True, access_pattern=True, latest_read_files=True)
    for ino in (5, 6, 7, 9):
        stats.file_opened(ino)
        stats.fop_done(StatsFop.OPEN, ino=ino, latency_us=10)
    stats.fop_done(StatsFop.READ, ino=5, size=6, latency_us=300)
    stats.fop_done(StatsFop.READ, ino=6, size=8192, latency_us=10)
    stats.fop_done(StatsFop.READ, ino=7, size=1, latency_us=10)
    stats.fop_done(StatsFop.READ, ino=9, success=False, latency_us=3_000_000)
    stats.fop_done(StatsFop.RELEASE, ino=5)
    snap = stats.snapshot()
    assert list(snap) == ["files_account_enabled", "access_pattern_enabled",
                          "record_latest_read_files_enabled", "measure_latency", "id", "nr_opens",
                          "data_read", "block_count_read", "fop_hits", "fop_errors",
                          "fop_cumulative_latency_total", "read_latency_dist"]
    assert snap["id"] == "/mnt" and snap["measure_latency"] is True
    assert snap["nr_opens"] == 3
    assert snap["data_read"] == 6 + 8192 + 1
    assert snap["block_count_read"] == [2, 0, 1, 0, 0, 0, 0, 0]
    assert snap["fop_hits"][StatsFop.READ] == 3 and snap["fop_errors"][StatsFop.READ] == 1
    assert snap["fop_cumulative_latency_total"][StatsFop.READ] == 300 + 10 + 10 + 3_000_000
    assert sum(snap["read_latency_dist"]) == 9 and snap["read_latency_dist"][7] == 1
    files = stats.files_snapshot()
    assert set(files) == {"5", "6", "7", "9"}
    assert files["6"] == {"total_fops": 2, "data_read": 8192, "block_count_read": [0, 0, 1, 0, 0, 0, 0, 0],
                          "fop_hits": [0, 0, 1, 0, 1] + [0] * 10, "fop_errors": [0] * 15}
    assert files["9"]["fop_errors"][StatsFop.READ] == 1
    assert stats.take_latest_read_files() == [[5, 7]]
    assert stats.take_latest_read_files() == []
    pattern = stats.pattern_snapshot()
    assert [p["ino"] for p in pattern] == [5, 6, 7]
    assert set(pattern[0]) == {"ino", "nr_read", "first_access_time_secs", "first_access_time_nanos"}
    json.dumps(snap)


def test_per_file_counters_exist_only_when_enabled() -> None:
    stats = FsIoStats("/")
    stats.file_opened(3)
    stats.fop_done(StatsFop.READ, ino=3, size=10)
    assert stats.files_snapshot() == {} and stats.pattern_snapshot() == []
    assert stats.take_latest_read_files() == []


def test_backend_metrics_histograms() -> None:
    m = BackendMetrics("s3")
    m.record_read(4096, 0.0005)
    m.record_read(2 << 20, 0.030)
    m.record_read(100, 0.003, error=True)
    snap = m.snapshot()
    assert snap["backend_type"] == "oss"
    assert (snap["read_count"], snap["read_errors"], snap["read_amount_total"]) == (3, 1, 4096 + (2 << 20))
    assert snap["read_cumulative_latency_millis_total"] == 33
    assert snap["read_count_block_size_dist"] == [1, 0, 1, 0, 0, 0, 0, 1]
    assert snap["read_latency_sizes_dist"][7][2] == 1 and snap["read_latency_sizes_dist"][2][0] == 1
    assert snap["read_cumulative_latency_millis_dist"][7] == 30


def test_blobcache_metrics_fields_and_concurrency() -> None:
    m = BlobcacheMetrics("/snap", "/var/cache")
    m.add_underlying_file("/var/cache/b.blob.data")

    def hammer() -> None:
        for _ in range(1000):
            m.record_read(2, 2)
            m.record_read(2, 1)
            m.record_read(2, 0)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    m.prefetch_started()
    m.record_prefetch(requests=1, chunks=3, nbytes=300, elapsed_s=0.25)
    m.prefetch_finished()
    snap = m.snapshot()
    assert (snap["total"], snap["whole_hits"], snap["partial_hits"]) == (12000, 4000, 4000)
    assert snap["underlying_files"] == ["/var/cache/b.blob.data"]
    assert snap["prefetch_cumulative_time_millis"] == 250 and snap["prefetch_unmerged_chunks"] == 3
    assert snap["prefetch_end_time_secs"] >= snap["prefetch_begin_time_secs"] > 0
    for key in ("store_path", "entries_count", "prefetch_data_amount", "prefetch_requests_count",
                "prefetch_workers", "prefetch_begin_time_millis", "prefetch_end_time_millis",
                "buffered_backend_size", "data_all_ready"):
        assert key in snap


def test_fs_read_counters_are_exact_after_concurrent_lock_free_reads() -> None:
    """``read_done`` (the FUSE read hot path) adds to per-thread cells without a lock; the API
    snapshot still adds up exactly, next to reads accounted the locked way."""
    stats = FsIoStats("/mnt")
    sizes = (100, 4096, 131072)

    def worker(n: int) -> None:
        for i in range(2000):
            stats.read_done(7, sizes[(n + i) % 3], 1_500_000 if i % 10 == 0 else 5_000)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    stats.fop_done(StatsFop.READ, ino=7, size=10, latency_us=3)          # the locked path too
    for t in threads:
        t.join()
    snap = stats.snapshot()
    assert snap["fop_hits"][StatsFop.READ] == 16001
    per_size = {100: 0, 4096: 0, 131072: 0}
    for n in range(8):
        for i in range(2000):
            per_size[sizes[(n + i) % 3]] += 1
    assert snap["data_read"] == sum(s * c for s, c in per_size.items()) + 10
    assert snap["block_count_read"][size_bucket(100)] == per_size[100] + 1
    assert snap["block_count_read"][size_bucket(4096)] == per_size[4096]
    assert snap["block_count_read"][size_bucket(131072)] == per_size[131072]
    assert snap["read_latency_dist"][fs_latency_bucket(1500)] == 1600
    assert snap["read_latency_dist"][fs_latency_bucket(5)] == 14401
    assert snap["fop_cumulative_latency_total"][StatsFop.READ] == 1600 * 1500 + 14400 * 5 + 3
    # with per-file accounting on, the same call takes the locked path and feeds the file's counters
    files = FsIoStats("/mnt", files_account=True)
    files.file_opened(7)
    files.read_done(7, 4096, 1000)
    assert files.files_snapshot()["7"]["data_read"] == 4096
    assert files.snapshot()["fop_hits"][StatsFop.READ] == 1
