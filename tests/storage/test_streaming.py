"""Streamed bulk reads: ``BlobBackend.open_range`` over the REAL registry (one request, read in
pieces, resumed at the current position after a fault injected by the shim), ``decompress_into``,
and the cache's streamed prefetch (one request per merged run, right bytes, durable chunk-map bits,
syncs held back while a bulk write runs, bounded per-thread buffers)."""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from nydusd.compress import Compressor, compress, decompress_into
from nydusd.config import CacheConfig, FileCacheConfig, PrefetchConfig, RegistryConfig
from nydusd.errors import BackendError, IntegrityError
from nydusd.storage.backend.registry import RegistryBackend
from nydusd.storage.cache import create_cache
from nydusd.storage.cache.base import STREAM_PIECE
from nydusd.storage.cache.blobcache import WRITE_SLICE
from nydusd.storage.cache.chunkmap import HEADER_SIZE
from nydusd.storage.cache.prefetch import BULK_MERGE_SIZE as PREFETCH_BULK
from nydusd.storage.device import BlobDevice
from tests.harness.fakes.backends import FlakyBackend, MemoryBackend
from tests.harness.fakes.blobs import TestBlob, build_blob, mixed_content
from tests.harness.servers.fault_shim import FaultShim
from tests.harness.servers.registry import RegistryServer

MIB = 1 << 20
REPO = "stream/test"
DATA = os.urandom(3 * MIB + 12345)


def backend_for(host: str, retry_limit: int = 0) -> RegistryBackend:
    b = RegistryBackend(RegistryConfig(scheme="http", host=host, repo=REPO, timeout=5,
                                       retry_limit=retry_limit))
    b.retry = type(b.retry)(retry_limit=retry_limit, base_delay=0.005, max_delay=0.02)
    return b


@pytest.fixture(scope="module")
def pushed(registry_server: RegistryServer) -> str:
    return registry_server.push_blob(REPO, DATA)


def read_in_pieces(backend: Any, blob_id: str, offset: int, size: int, piece: int) -> bytes:
    out = bytearray(size)
    view = memoryview(out)
    with backend.open_range(blob_id, offset, size) as stream:
        for pos in range(0, size, piece):
            stream.readinto(view[pos:pos + piece])
    return bytes(out)


# ------------------------------------------------------------------------------ backend streams
def test_open_range_streams_one_request_in_pieces(registry_server: RegistryServer, pushed: str) -> None:
    b = backend_for(registry_server.host)
    try:
        got = read_in_pieces(b, pushed, 4096, 2 * MIB + 7, 65536)
        assert got == DATA[4096:4096 + 2 * MIB + 7]
        assert b.metrics()["read_count"] == 1
        # the fully read connection went back to the pool: the next stream works the same
        assert read_in_pieces(b, pushed, len(DATA) - 1000, 1000, 300) == DATA[-1000:]
        assert b.metrics()["read_count"] == 2
    finally:
        b.close()


def test_half_read_stream_is_dropped_cleanly(registry_server: RegistryServer, pushed: str) -> None:
    b = backend_for(registry_server.host)
    try:
        buf = memoryview(bytearray(1000))
        with b.open_range(pushed, 0, 2 * MIB) as stream:
            stream.readinto(buf)
        assert bytes(buf) == DATA[:1000]
        assert b.read(pushed, 10, 100) == DATA[10:110]
        with b.open_range(pushed, 0, 100) as stream, pytest.raises(BackendError, match="past the end"):
            stream.readinto(memoryview(bytearray(101)))
    finally:
        b.close()


@pytest.mark.parametrize("fault", ["truncate", "reset", "503"])
def test_stream_resumes_at_the_current_position_after_a_fault(fault_shim: FaultShim, pushed: str,
                                                              fault: str, logs: Any) -> None:
    b = backend_for(fault_shim.host, retry_limit=3)
    logs.allowed["backend_read_retried"] = None
    try:
        fault_shim.inject("pass", fault)  # the first piece's request passes, the resumed one fails once
        size = 2 * MIB
        out = bytearray(size)
        view = memoryview(out)
        with b.open_range(pushed, 100, size) as stream:
            stream.readinto(view[:MIB])
            stream._drop()  # the connection breaks here: the next piece must reopen at 100 + 1 MiB
            stream.readinto(view[MIB:])
        assert bytes(out) == DATA[100:100 + size]
        assert fault_shim.applied[fault] == 1
    finally:
        b.close()


def test_stream_fails_clearly_when_the_budget_is_spent(fault_shim: FaultShim, pushed: str,
                                                       logs: Any) -> None:
    b = backend_for(fault_shim.host, retry_limit=1)
    try:
        fault_shim.inject("truncate", "truncate", "truncate")
        with logs.expect("backend_retries_exhausted"), b.open_range(pushed, 0, MIB) as stream, \
                pytest.raises(BackendError) as ei:
            stream.readinto(memoryview(bytearray(MIB)))
        assert ei.value.transient and ei.value.blob_id == pushed and ei.value.offset == 0
        assert b.metrics()["read_errors"] == 1
    finally:
        b.close()


def test_open_range_of_a_non_streaming_backend_reads_the_range_once() -> None:
    b = MemoryBackend({"x": DATA})
    assert read_in_pieces(b, "x", 5, 100_000, 30_000) == DATA[5:100_005]
    assert b.requests == [("x", 5, 100_000, False)]
    with b.open_range("x", len(DATA) - 10, 20) as stream, pytest.raises(BackendError):
        stream.readinto(memoryview(bytearray(20)))


# ----------------------------------------------------------------------------- decompress_into
@pytest.mark.parametrize("algo", [Compressor.ZSTD, Compressor.LZ4_BLOCK, Compressor.GZIP])
def test_decompress_into_writes_exactly_the_chunk(algo: Compressor) -> None:
    plain = mixed_content(300_000, seed=3)
    payload, compressed = compress(plain, algo)
    assert compressed
    out = bytearray(b"\xaa" * (len(plain) + 64))
    view = memoryview(out)
    for src in (payload, memoryview(payload), memoryview(bytearray(payload))):
        decompress_into(src, algo, view[32:32 + len(plain)])
        assert out[32:32 + len(plain)] == plain
        assert out[:32] == b"\xaa" * 32 and out[-32:] == b"\xaa" * 32  # nothing written outside
    for size in (len(plain) - 1, len(plain) + 1):
        with pytest.raises(IntegrityError):
            decompress_into(payload, algo, view[:size])
    assert out[-31:] == b"\xaa" * 31


@pytest.mark.parametrize("algo", [Compressor.ZSTD, Compressor.LZ4_BLOCK])
def test_decompress_into_rejects_garbage(algo: Compressor) -> None:
    out = memoryview(bytearray(65536))
    rng = random.Random(5)
    with pytest.raises(IntegrityError):
        decompress_into(b"\xff" * 100, algo, out)
    payload = bytearray(compress(mixed_content(65536, seed=1), algo)[0])
    for _ in range(50):  # flipped bytes: an error or (zstd without checksum) 65536 other bytes
        bad = bytearray(payload)
        bad[rng.randrange(len(bad))] ^= 0x5A
        try:
            decompress_into(bytes(bad), algo, out)
        except IntegrityError:
            pass


# ----------------------------------------------------------------------------- streamed prefetch
@pytest.fixture(scope="module")
def big(registry_server: RegistryServer) -> TestBlob:
    blob = build_blob([mixed_content(12 * MIB + 4321, seed=7)], chunk_size=MIB,
                      compressor=Compressor.LZ4_BLOCK)
    registry_server.push_blob(REPO, blob.data)
    return blob


def open_device(backend: Any, blob: TestBlob, work_dir: Path, merge: int, **cache: Any) -> BlobDevice:
    cfg = CacheConfig(type="blobcache", filecache=FileCacheConfig(work_dir=str(work_dir)), **cache)
    return BlobDevice([blob.info], create_cache(cfg, backend),
                      prefetch_config=PrefetchConfig(enable=True, threads=2, batch_size=merge))


def ready_bits(blob: TestBlob, work_dir: Path) -> int:
    bitmap = (work_dir / f"{blob.blob_id}.blob.data.chunk_map").read_bytes()[HEADER_SIZE:]
    return sum(bin(b).count("1") for b in bitmap)


@pytest.mark.parametrize("merge", [32 * MIB, 5 * MIB])
def test_streamed_prefetch_fills_the_cache_with_one_request_per_run(
        registry_server: RegistryServer, big: TestBlob, tmp_path: Path, merge: int) -> None:
    backend = backend_for(registry_server.host)
    device = open_device(backend, big, tmp_path, merge)
    try:
        runs = device.prefetch(big.files[0])
        assert device.wait_prefetch(30)
        assert runs == -(-len(big.data) // merge)  # even runs: no short tail run
        assert backend.metrics()["read_count"] == runs
        assert backend.metrics()["read_amount_total"] == len(big.data)
        before = backend.metrics()["read_count"]
        content = big.contents[0]
        for off in (0, 3 * MIB - 5, len(content) - 4096):
            assert device.read(big.files[0], off, 70_000) == content[off:off + 70_000]
        assert device.read(big.files[0], 0, len(content)) == content
        assert backend.metrics()["read_count"] == before  # everything came from the cache
        device.flush()
        assert ready_bits(big, tmp_path) == big.info.chunk_count
    finally:
        device.close()
        backend.close()
    data = (tmp_path / f"{big.blob_id}.blob.data").read_bytes()
    for chunk in big.files[0]:
        plain = big.contents[0][chunk.file_offset:chunk.file_offset + chunk.uncompressed_size]
        assert data[chunk.uncompressed_offset:chunk.uncompressed_offset + chunk.uncompressed_size] == plain


def test_streamed_prefetch_refetches_a_corrupt_chunk(tmp_path: Path, logs: Any) -> None:
    blob = build_blob([mixed_content(6 * MIB, seed=9)], chunk_size=MIB, compressor=Compressor.ZSTD)
    backend = FlakyBackend({blob.blob_id: blob.data}, corrupt=1, corrupt_at=MIB + 77)
    cfg = CacheConfig(type="blobcache", validate=True, filecache=FileCacheConfig(work_dir=str(tmp_path)))
    device = BlobDevice([blob.info], create_cache(cfg, backend),
                        prefetch_config=PrefetchConfig(threads=1, batch_size=64 * MIB))
    try:
        with logs.expect("chunk_refetched"):
            device.prefetch(blob.files[0])
            assert device.wait_prefetch(30)
        assert len(backend.requests) == 2 and backend.requests[1][2] < MIB + 1  # the run + one chunk
        before = backend.read_count
        assert device.read(blob.files[0], 0, 6 * MIB) == blob.contents[0]
        assert backend.read_count == before
    finally:
        device.close()


def test_syncs_are_held_back_while_a_bulk_write_runs(tmp_path: Path) -> None:
    blob = build_blob([mixed_content(4 * 65536, seed=2)], chunk_size=65536)
    backend = MemoryBackend({blob.blob_id: blob.data})
    cfg = CacheConfig(type="blobcache", filecache=FileCacheConfig(work_dir=str(tmp_path)))
    device = BlobDevice([blob.info], create_cache(cfg, backend, batch_size=0))
    try:
        cache = device.cache(0)
        with cache.bulk_write():
            assert device.read(blob.files[0], 0, 100) == blob.contents[0][:100]
            time.sleep(0.15)
            assert ready_bits(blob, tmp_path) == 0  # written, served, but not synced yet
        deadline = time.monotonic() + 5
        while ready_bits(blob, tmp_path) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ready_bits(blob, tmp_path) == 1  # the end of the bulk write released the sync
    finally:
        device.close()


def test_big_runs_are_written_in_slices(tmp_path: Path) -> None:
    """A run far larger than one slice still lands byte-exact (several slices and pieces)."""
    blob = build_blob([mixed_content(3 * STREAM_PIECE + 3 * WRITE_SLICE + 999, seed=4)], chunk_size=MIB,
                      compressor=Compressor.NONE)
    backend = MemoryBackend({blob.blob_id: blob.data})
    device = open_device(backend, blob, tmp_path, 64 * MIB)
    try:
        device.prefetch(blob.files[0])
        assert device.wait_prefetch(30)
        assert len(backend.requests) == 1
        device.flush()
    finally:
        device.close()
    data = (tmp_path / f"{blob.blob_id}.blob.data").read_bytes()
    assert data[:len(blob.contents[0])] == blob.contents[0]


def test_files_prefetched_with_a_bulk_merge_limit_merge_beyond_batch_size(tmp_path: Path) -> None:
    """What the daemon's prefetch_all can ask for: file-by-file submissions merge into requests of
    up to ``merge_limit`` bytes, past the prefetch ``batch_size``; others keep ``batch_size``."""
    contents = [mixed_content(300_000 + i, seed=i) for i in range(12)]
    blob = build_blob(contents, chunk_size=65536)
    backend = MemoryBackend({blob.blob_id: blob.data})
    cfg = CacheConfig(type="blobcache", filecache=FileCacheConfig(work_dir=str(tmp_path)))
    device = BlobDevice([blob.info], create_cache(cfg, backend),
                        prefetch_config=PrefetchConfig(threads=1, batch_size=65536))
    try:
        backend.gate = threading.Event()
        device.prefetch(blob.files[0][:1])  # the worker takes this one and waits at the gate
        time.sleep(0.1)
        for chunks in blob.files:
            device.prefetch(chunks, merge_limit=PREFETCH_BULK)
        backend.gate.set()
        assert device.wait_prefetch(10)
        sizes = [r[2] for r in backend.requests]
        assert len(sizes) == 2 and sizes[0] <= 65536 and sum(sizes) == len(blob.data)
        assert device.read(blob.files[5], 0, len(contents[5])) == contents[5]
    finally:
        device.close()


def test_long_stretches_are_cut_into_even_runs(tmp_path: Path) -> None:
    """10 adjacent chunks with a 4-chunk limit: three runs of 4/3/3, not 4/4/2 (a short tail
    keeps one worker busy for two full runs)."""
    blob = build_blob([os.urandom(10 * 65536)], chunk_size=65536, compressor=Compressor.NONE)
    backend = MemoryBackend({blob.blob_id: blob.data})
    cfg = CacheConfig(type="blobcache", filecache=FileCacheConfig(work_dir=str(tmp_path)))
    device = BlobDevice([blob.info], create_cache(cfg, backend),
                        prefetch_config=PrefetchConfig(threads=1, batch_size=4 * 65536))
    try:
        assert device.prefetch(blob.files[0]) == 3
        assert device.wait_prefetch(10)
        assert sorted(r[2] // 65536 for r in backend.requests) == [3, 3, 4]
    finally:
        device.close()
