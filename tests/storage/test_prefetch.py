"""Background prefetch (pure tier): workers fill the cache, merge runs, respect the bandwidth
limit, never make on-demand reads wait behind them, and stop cleanly."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from nydusd.config import CacheConfig, FileCacheConfig, PrefetchConfig
from nydusd.storage.cache import create_cache
from nydusd.storage.cache.prefetch import TokenBucket
from nydusd.storage.device import BlobDevice
from tests.harness.fakes.backends import FlakyBackend, MemoryBackend
from tests.harness.fakes.blobs import TestBlob, build_blob

CHUNK = 0x10000


class SlowPrefetchBackend(MemoryBackend):
    """Prefetch reads take ``prefetch_delay`` seconds; on-demand reads are immediate."""

    def __init__(self, blobs: dict[str, bytes], prefetch_delay: float) -> None:
        super().__init__(blobs)
        self.prefetch_delay = prefetch_delay

    def try_read(self, blob_id: str, offset: int, size: int, *, prefetch: bool = False) -> bytes:
        if prefetch:
            time.sleep(self.prefetch_delay)
        return super().try_read(blob_id, offset, size, prefetch=prefetch)


@pytest.fixture
def blob() -> TestBlob:
    return build_blob([os.urandom(16 * CHUNK), os.urandom(4 * CHUNK)], chunk_size=CHUNK)


def make_device(blob: TestBlob, backend: MemoryBackend, work_dir: Path, **prefetch: object) -> BlobDevice:
    cfg = CacheConfig(type="blobcache", filecache=FileCacheConfig(work_dir=str(work_dir)))
    # no on-demand amplification: prefetch merging must come from the prefetch batch_size alone
    return BlobDevice([blob.info], create_cache(cfg, backend, batch_size=0),
                      prefetch_config=PrefetchConfig(enable=True, **prefetch))  # type: ignore[arg-type]


def prefetch_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("nydus-prefetch")]


def test_prefetch_fills_the_cache_with_merged_requests(tmp_path: Path, blob: TestBlob) -> None:
    backend = MemoryBackend({blob.blob_id: blob.data})
    device = make_device(blob, backend, tmp_path, threads=3, batch_size=4 * CHUNK)
    try:
        all_chunks = [c for f in blob.files for c in f]
        assert device.prefetch(all_chunks + all_chunks[:3]) == 5  # 20 chunks in runs of 4
        assert device.wait_prefetch(10)
        assert all(device.is_ready(c) for c in all_chunks)
        assert sorted(r[2] for r in backend.requests) == [4 * CHUNK] * 5
        assert all(r[3] for r in backend.requests)  # issued as prefetch reads
        snap = device.metrics()
        assert snap["prefetch_data_amount"] == len(blob.data)
        assert snap["prefetch_requests_count"] == 5 and snap["prefetch_unmerged_chunks"] == 20
        assert snap["prefetch_workers"] == 3 and snap["data_all_ready"] is True
        assert snap["prefetch_end_time_secs"] >= snap["prefetch_begin_time_secs"] > 0
        backend.reset_stats()
        for f, content in zip(blob.files, blob.contents, strict=True):
            assert device.read(f, 0, len(content)) == content
        assert backend.read_count == 0
    finally:
        device.close()
    assert prefetch_threads() == []


def test_files_submitted_one_by_one_merge_into_one_request(tmp_path: Path) -> None:
    contents = [os.urandom(1000 + i) for i in range(40)]      # small files, adjacent in the blob
    blob = build_blob(contents, chunk_size=CHUNK)
    backend = MemoryBackend({blob.blob_id: blob.data})
    device = make_device(blob, backend, tmp_path, threads=1, batch_size=CHUNK)
    try:
        backend.gate = threading.Event()
        device.prefetch(blob.files[0])       # the worker takes this one and waits at the gate
        time.sleep(0.1)
        for chunks in blob.files[1:]:
            device.prefetch(chunks)           # these queue up behind it
        backend.gate.set()
        assert device.wait_prefetch(10)
        assert [r[2] for r in backend.requests] == [1000, len(blob.data) - 1000]
        assert device.metrics()["prefetch_unmerged_chunks"] == 40
    finally:
        device.close()


def test_ondemand_read_is_not_blocked_by_busy_prefetch(tmp_path: Path, blob: TestBlob) -> None:
    backend = SlowPrefetchBackend({blob.blob_id: blob.data}, prefetch_delay=1.0)
    device = make_device(blob, backend, tmp_path, threads=2, batch_size=CHUNK)
    try:
        device.prefetch(blob.files[0])          # 16 slow requests keep both workers busy
        time.sleep(0.1)
        start = time.monotonic()
        assert device.read(blob.files[1], CHUNK, 100) == blob.contents[1][CHUNK:CHUNK + 100]
        assert time.monotonic() - start < 0.8   # a prefetch request alone takes 1 s
    finally:
        t0 = time.monotonic()
        device.close()                          # drops the queue, joins after running requests
        assert time.monotonic() - t0 < 3
    assert prefetch_threads() == []


def test_ondemand_read_joins_an_inflight_prefetch_fetch(tmp_path: Path, blob: TestBlob) -> None:
    backend = MemoryBackend({blob.blob_id: blob.data})
    backend.gate = threading.Event()
    device = make_device(blob, backend, tmp_path, threads=1, batch_size=CHUNK)
    try:
        device.prefetch(blob.files[0][:1])
        time.sleep(0.2)                          # the worker is inside the backend read
        threading.Timer(0.2, backend.gate.set).start()
        assert device.read(blob.files[0], 10, 10) == blob.contents[0][10:20]
        assert backend.read_count == 1 and backend.requests[0][3] is True
    finally:
        backend.gate.set()
        device.close()


def test_failed_prefetch_does_not_fail_the_reader_that_joined_it(tmp_path: Path, blob: TestBlob,
                                                                logs) -> None:  # type: ignore[no-untyped-def]
    backend = FlakyBackend({blob.blob_id: blob.data}, fail_times=1, transient=False)
    backend.gate = threading.Event()
    device = make_device(blob, backend, tmp_path, threads=1, batch_size=CHUNK)
    try:
        with logs.expect("prefetch_failed", count=1):
            device.prefetch(blob.files[0][:1])
            time.sleep(0.2)
            threading.Timer(0.2, backend.gate.set).start()
            assert device.read(blob.files[0], 0, 10) == blob.contents[0][:10]
            device.wait_prefetch(5)
        assert [r[3] for r in backend.requests] == [True, False]
    finally:
        backend.gate.set()
        device.close()


def test_prefetch_steps_aside_while_ondemand_fetches_run(tmp_path: Path, blob: TestBlob) -> None:
    backend = MemoryBackend({blob.blob_id: blob.data})
    device = make_device(blob, backend, tmp_path, threads=1)
    try:
        with device.cache_manager.ondemand():
            device.prefetch(blob.files[1])
            time.sleep(0.25)
            assert backend.read_count == 0
        assert device.wait_prefetch(5)
        assert backend.read_count == 1
    finally:
        device.close()


def test_bandwidth_limit_is_respected(tmp_path: Path) -> None:
    blob = build_blob([os.urandom(40 * CHUNK)], chunk_size=CHUNK)     # 2.5 MiB
    rate = 1 << 20
    backend = MemoryBackend({blob.blob_id: blob.data})
    device = make_device(blob, backend, tmp_path, threads=4, batch_size=2 * CHUNK, bandwidth_limit=rate)
    try:
        start = time.monotonic()
        device.prefetch(blob.files[0])
        assert device.wait_prefetch(20)
        elapsed = time.monotonic() - start
    finally:
        device.close()
    # one second of burst, then 1 MiB/s: 2.5 MiB needs ~1.5 s
    assert 1.1 <= elapsed <= 5.0, elapsed
    assert backend.bytes_read == len(blob.data)


def test_unlimited_prefetch_is_fast_and_stop_joins_idle_workers(tmp_path: Path) -> None:
    blob = build_blob([os.urandom(40 * CHUNK)], chunk_size=CHUNK)
    backend = MemoryBackend({blob.blob_id: blob.data})
    device = make_device(blob, backend, tmp_path, threads=4)
    start = time.monotonic()
    device.prefetch(blob.files[0])
    assert device.wait_prefetch(10)
    assert time.monotonic() - start < 1.0
    assert len(prefetch_threads()) == 4
    device.stop_prefetch()
    assert prefetch_threads() == []
    device.close()


def test_stop_drops_queued_work(tmp_path: Path, blob: TestBlob) -> None:
    backend = MemoryBackend({blob.blob_id: blob.data})
    backend.gate = threading.Event()
    device = make_device(blob, backend, tmp_path, threads=1, batch_size=CHUNK)
    device.prefetch(blob.files[0])
    time.sleep(0.1)
    threading.Timer(0.2, backend.gate.set).start()
    device.stop_prefetch()
    assert prefetch_threads() == []
    assert backend.read_count == 1          # only the request already running was served
    device.close()


def test_token_bucket_rate() -> None:
    bucket = TokenBucket(300_000)
    start = time.monotonic()
    for _ in range(31):
        assert bucket.consume(20_000)
    elapsed = time.monotonic() - start
    # 620 KB at 300 KB/s with 300 KB of burst; the last 20 KB are owed, not waited for
    assert 0.95 <= elapsed <= 3.0, elapsed
    stop = threading.Event()
    stop.set()
    bucket.consume(1_000_000)
    assert bucket.consume(10, stop) is False     # a stop request interrupts the wait
    assert TokenBucket(0).consume(1 << 40) is True


def payload_device(blob: TestBlob, backend: MemoryBackend, work_dir: Path) -> BlobDevice:
    cfg = CacheConfig(type="blobcache", compressed=True, filecache=FileCacheConfig(work_dir=str(work_dir)))
    return BlobDevice([blob.info], create_cache(cfg, backend, batch_size=0),
                      prefetch_config=PrefetchConfig(threads=2, batch_size=CHUNK))


def test_prefetch_into_a_payload_cache_stores_without_decoding(tmp_path: Path, logs) -> None:  # type: ignore[no-untyped-def]
    blob = build_blob([b"nydus!" * 40000], chunk_size=CHUNK)          # zstd-compressed chunks
    assert all(c.is_compressed for c in blob.files[0])
    backend = FlakyBackend({blob.blob_id: blob.data}, corrupt=1, corrupt_at=0)
    device = payload_device(blob, backend, tmp_path)
    try:
        device.prefetch(blob.files[0][:1])
        assert device.wait_prefetch(5)
        assert device.is_ready(blob.files[0][0])     # stored as fetched: the bad frame went unnoticed
        with logs.expect("cached_chunk_corrupted", count=1):
            assert device.read(blob.files[0], 0, CHUNK) == blob.contents[0][:CHUNK]
        assert [r[3] for r in backend.requests] == [True, False]   # the reader refetched it
    finally:
        device.close()


def test_reader_joining_a_payload_prefetch_loads_the_stored_chunk(tmp_path: Path) -> None:
    blob = build_blob([b"nydus!" * 40000], chunk_size=CHUNK)
    backend = MemoryBackend({blob.blob_id: blob.data})
    backend.gate = threading.Event()
    device = payload_device(blob, backend, tmp_path)
    try:
        device.prefetch(blob.files[0][:1])
        time.sleep(0.2)
        threading.Timer(0.2, backend.gate.set).start()
        assert device.read(blob.files[0], 5, 100) == blob.contents[0][5:105]
        assert backend.read_count == 1
    finally:
        backend.gate.set()
        device.close()
