"""Blob caches (pure tier): singleflight, merged fetches, verification and refetch, persistence
of the file cache across restarts, the chunk_map file format, config handling."""

from __future__ import annotations

import os
import struct
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nydusd.compress import Compressor
from nydusd.config import CacheConfig, FileCacheConfig
from nydusd.errors import BackendError, ConfigError, IntegrityError, Unsupported
from nydusd.storage.cache import create_cache
from nydusd.storage.cache.chunkmap import HEADER_SIZE, MAGIC1, MAGIC2, MAGIC_ALL_READY
from nydusd.storage.device import BlobDevice
from tests.harness.fakes.backends import FlakyBackend, MemoryBackend
from tests.harness.fakes.blobs import TestBlob, build_blob, mixed_content

CHUNK = 0x10000


def file_cache(work_dir: Path, **kw: object) -> CacheConfig:
    return CacheConfig(type="blobcache", filecache=FileCacheConfig(work_dir=str(work_dir)), **kw)


@pytest.fixture
def blob() -> TestBlob:
    return build_blob([mixed_content(6 * CHUNK + 500, seed=21), os.urandom(4 * CHUNK)], chunk_size=CHUNK)


@pytest.fixture
def raw_blob() -> TestBlob:
    """Incompressible data: every chunk is stored raw, so compressed sizes are exactly CHUNK."""
    return build_blob([os.urandom(8 * CHUNK)], chunk_size=CHUNK)


def device_for(blob: TestBlob, backend: MemoryBackend, cfg: CacheConfig, **kw: object) -> BlobDevice:
    return BlobDevice([blob.info], create_cache(cfg, backend, **kw))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ singleflight
@pytest.mark.parametrize("kind", ["dummy", "file"])
def test_concurrent_readers_of_one_missing_chunk_share_one_fetch(kind: str, tmp_path: Path,
                                                                 blob: TestBlob) -> None:
    backend = MemoryBackend({blob.blob_id: blob.data})
    backend.gate = threading.Event()
    cfg = CacheConfig() if kind == "dummy" else file_cache(tmp_path)
    device = device_for(blob, backend, cfg, batch_size=0)
    results: list[bytes] = []
    chunks = blob.files[0]

    def reader() -> None:
        results.append(device.read(chunks, CHUNK + 10, 1000))

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.3)  # every reader is now waiting on the one fetch held at the gate
    backend.gate.set()
    for t in threads:
        t.join()
    device.close()
    assert results == [blob.contents[0][CHUNK + 10:CHUNK + 1010]] * 8
    assert backend.read_count == 1


# ------------------------------------------------------------------------------ merging
def test_adjacent_misses_merge_into_one_ranged_read(tmp_path: Path, raw_blob: TestBlob) -> None:
    backend = MemoryBackend({raw_blob.blob_id: raw_blob.data})
    device = device_for(raw_blob, backend, file_cache(tmp_path), batch_size=3 * CHUNK)
    chunks = raw_blob.files[0]
    content = raw_blob.contents[0]
    try:
        # cache chunk 0 (a one-chunk list: nothing to amplify), then 3..5 (3 amplified by 4, 5)
        assert device.read(chunks[:1], 0, 10) == content[:10]
        assert device.read(chunks, 3 * CHUNK, 1) == content[3 * CHUNK:3 * CHUNK + 1]
        backend.reset_stats()
        # chunks 0..7 requested; 0 cached, 1..2 missing, 3..5 cached (amplified), 6..7 missing
        assert device.read(chunks, 0, 8 * CHUNK) == content
        reqs = sorted((off, size) for _, off, size, _ in backend.requests)
        cached = {0} | {3, 4, 5}
        assert all(off // CHUNK not in cached for off, _ in reqs)
        assert reqs == [(CHUNK, 2 * CHUNK), (6 * CHUNK, 2 * CHUNK)]
    finally:
        device.close()


def test_merging_respects_the_batch_size(tmp_path: Path, raw_blob: TestBlob) -> None:
    backend = MemoryBackend({raw_blob.blob_id: raw_blob.data})
    device = device_for(raw_blob, backend, CacheConfig(), batch_size=3 * CHUNK)
    try:
        assert device.read(raw_blob.files[0], 0, 8 * CHUNK) == raw_blob.contents[0]
        assert [size for _, _, size, _ in backend.requests] == [3 * CHUNK, 3 * CHUNK, 2 * CHUNK]
    finally:
        device.close()


# ------------------------------------------------------------------------------ verification
def test_digest_mismatch_is_refetched_once(tmp_path: Path, blob: TestBlob, logs) -> None:  # type: ignore[no-untyped-def]
    backend = FlakyBackend({blob.blob_id: blob.data}, corrupt=1, corrupt_at=10)
    device = device_for(blob, backend, file_cache(tmp_path), digest_validate=True, batch_size=0)
    try:
        with logs.expect("chunk_refetched", count=1):
            assert device.read(blob.files[0], 0, 100) == blob.contents[0][:100]
        assert backend.read_count == 2
    finally:
        device.close()


def test_second_mismatch_fails_with_integrity_error_and_caches_nothing(tmp_path: Path, blob: TestBlob,
                                                                       logs) -> None:  # type: ignore[no-untyped-def]
    backend = FlakyBackend({blob.blob_id: blob.data}, corrupt=2, corrupt_at=10)
    device = device_for(blob, backend, file_cache(tmp_path), digest_validate=True, batch_size=0)
    try:
        with logs.expect("chunk_refetched", count=1), logs.expect("chunk_corrupted", count=1), \
                pytest.raises(IntegrityError) as exc:
            device.read(blob.files[0], 0, 100)
        assert exc.value.errno == 5
        assert not device.is_ready(blob.files[0][0])
        # the backend is healthy again: the next read fetches and serves the right bytes
        assert device.read(blob.files[0], 0, 100) == blob.contents[0][:100]
    finally:
        device.close()


def test_corrupt_compressed_payload_without_digest_validation_is_refetched(tmp_path: Path,
                                                                          logs) -> None:  # type: ignore[no-untyped-def]
    blob = build_blob([b"nydus" * 40000], chunk_size=CHUNK, compressor=Compressor.LZ4_BLOCK)
    assert all(c.is_compressed for c in blob.files[0])
    backend = FlakyBackend({blob.blob_id: blob.data}, corrupt=1, corrupt_at=0)
    device = device_for(blob, backend, CacheConfig(), batch_size=0)
    try:
        with logs.expect("chunk_refetched", count=1):
            assert device.read(blob.files[0], 0, 200000) == blob.contents[0]
    finally:
        device.close()


@pytest.mark.parametrize("compressed", [False, True])
def test_flipped_byte_in_cache_file_is_caught_with_validate(tmp_path: Path, blob: TestBlob, compressed: bool,
                                                            logs) -> None:  # type: ignore[no-untyped-def]
    backend = MemoryBackend({blob.blob_id: blob.data})
    content = blob.contents[0]
    chunk = blob.files[0][2]
    device = device_for(blob, backend, file_cache(tmp_path, compressed=compressed))
    assert device.read(blob.files[0], 0, len(content)) == content
    device.close()
    data_file = tmp_path / (blob.blob_id + (".blob.raw" if compressed else ".blob.data"))
    # flip one byte inside chunk 2 (a raw byte in the uncompressed layout / the payload otherwise)
    pos = (chunk.compressed_offset + chunk.compressed_size // 2 if compressed
           else chunk.uncompressed_offset + 123)
    with open(data_file, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)
        f.seek(pos)
        f.write(bytes([byte[0] ^ 0x55]))

    if not compressed:
        # Without validation the cache trusts its ready bits: the flip is served (this is why
        # `validate` exists, and proves the flip landed in the chunk the test reads).
        trusting = device_for(blob, backend, file_cache(tmp_path))
        assert trusting.read(blob.files[0], 2 * CHUNK, CHUNK) != content[2 * CHUNK:3 * CHUNK]
        trusting.close()

    backend.reset_stats()
    checked = device_for(blob, backend, file_cache(tmp_path, compressed=compressed, validate=True))
    try:
        with logs.expect("cached_chunk_corrupted", count=1):
            assert checked.read(blob.files[0], 0, len(content)) == content
        assert backend.requests == [(blob.blob_id, chunk.compressed_offset, chunk.compressed_size, False)]
        backend.reset_stats()
        assert checked.read(blob.files[0], 0, len(content)) == content  # repaired in place
        assert backend.read_count == 0
    finally:
        checked.close()


def test_digest_validate_also_checks_chunks_read_back_from_the_cache(tmp_path: Path, blob: TestBlob,
                                                                    logs) -> None:  # type: ignore[no-untyped-def]
    """``digest_validate`` (rafs ``validate``) alone verifies cached chunks too, as upstream (where it
    turns the cache's ``cache_validate`` on): a flipped byte in the cache file is refetched."""
    backend = MemoryBackend({blob.blob_id: blob.data})
    content = blob.contents[0]
    chunk = blob.files[0][2]
    device = device_for(blob, backend, file_cache(tmp_path), digest_validate=True)
    assert device.read(blob.files[0], 0, len(content)) == content
    device.close()
    with open(tmp_path / (blob.blob_id + ".blob.data"), "r+b") as f:
        f.seek(chunk.uncompressed_offset + 77)
        byte = f.read(1)
        f.seek(chunk.uncompressed_offset + 77)
        f.write(bytes([byte[0] ^ 0x55]))
    backend.reset_stats()
    checked = device_for(blob, backend, file_cache(tmp_path), digest_validate=True)
    try:
        with logs.expect("cached_chunk_corrupted", count=1):
            assert checked.read(blob.files[0], 0, len(content)) == content
        assert backend.requests == [(blob.blob_id, chunk.compressed_offset, chunk.compressed_size, False)]
    finally:
        checked.close()


def test_cache_dir_and_files_are_private(tmp_path: Path, blob: TestBlob) -> None:
    """Cache files hold image content: the work_dir nydusd creates is 0700, its files 0600, and a
    file an older daemon left 0644 is made private when it is opened again."""
    work = tmp_path / "work"
    backend = MemoryBackend({blob.blob_id: blob.data})
    device = device_for(blob, backend, file_cache(work))
    assert device.read(blob.files[0], 0, 100) == blob.contents[0][:100]
    device.close()
    assert (work.stat().st_mode & 0o777) == 0o700
    files = sorted(work.iterdir())
    assert len(files) == 2 and all(f.stat().st_mode & 0o777 == 0o600 for f in files), files
    for f in files:
        f.chmod(0o644)
    device = device_for(blob, backend, file_cache(work))
    assert device.read(blob.files[0], 0, 100) == blob.contents[0][:100]
    device.close()
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in files)


# ------------------------------------------------------------------------------ persistence
@pytest.mark.parametrize("compressed", [False, True])
def test_restart_on_same_work_dir_reads_nothing_from_the_backend(tmp_path: Path, blob: TestBlob,
                                                                 compressed: bool) -> None:
    backend = MemoryBackend({blob.blob_id: blob.data})
    cfg = file_cache(tmp_path, compressed=compressed)
    first = device_for(blob, backend, cfg)
    for chunks, content in zip(blob.files, blob.contents, strict=True):
        assert first.read(chunks, 0, len(content)) == content
    snap = first.metrics()
    assert any(t.name == "nydus-cache-flush" for t in threading.enumerate())
    first.close()
    assert not any(t.name == "nydus-cache-flush" for t in threading.enumerate())  # joined at close
    assert backend.bytes_read == len(blob.data)
    assert snap["data_all_ready"] is True and snap["entries_count"] == blob.info.chunk_count

    backend.reset_stats()
    second = device_for(blob, backend, cfg)
    try:
        for chunks, content in zip(blob.files, blob.contents, strict=True):
            assert second.read(chunks, 0, len(content)) == content
        assert backend.bytes_read == 0
        snap = second.metrics()
        assert snap["whole_hits"] == snap["total"] == 2 and snap["partial_hits"] == 0
        data_name = blob.blob_id + (".blob.raw" if compressed else ".blob.data")
        assert snap["underlying_files"] == [data_name]
        assert (tmp_path / data_name).is_file() and (tmp_path / (data_name + ".chunk_map")).is_file()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([data_name, data_name + ".chunk_map"])
        assert snap["store_path"] == str(tmp_path)
    finally:
        second.close()


def test_chunk_map_file_has_upstream_layout(tmp_path: Path, raw_blob: TestBlob) -> None:
    backend = MemoryBackend({raw_blob.blob_id: raw_blob.data})
    device = device_for(raw_blob, backend, file_cache(tmp_path), batch_size=0)
    map_file = tmp_path / (raw_blob.blob_id + ".blob.data.chunk_map")
    try:
        device.read(raw_blob.files[0], 0, 1)               # chunk 0
        device.read(raw_blob.files[0], 3 * CHUNK, 1)       # chunk 3
        device.flush()
        raw = map_file.read_bytes()
        assert len(raw) == HEADER_SIZE + 1
        assert struct.unpack_from("<IIII", raw) == (MAGIC1, 1, MAGIC2, 0)
        assert raw[HEADER_SIZE] == 0b1001_0000
        assert not any(raw[16:HEADER_SIZE])
        device.read(raw_blob.files[0], 0, 8 * CHUNK)
        device.flush()
        raw = map_file.read_bytes()
        assert struct.unpack_from("<IIII", raw)[3] == MAGIC_ALL_READY and raw[HEADER_SIZE] == 0xFF
        data = (tmp_path / (raw_blob.blob_id + ".blob.data")).read_bytes()
        assert data[:8 * CHUNK] == raw_blob.contents[0]
    finally:
        device.close()


def test_chunks_are_marked_on_disk_only_after_a_successful_sync(tmp_path: Path, raw_blob: TestBlob,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 logs) -> None:  # type: ignore[no-untyped-def]
    from nydusd.storage.cache import blobcache

    def failing_sync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(blobcache.os, "fdatasync", failing_sync)
    backend = MemoryBackend({raw_blob.blob_id: raw_blob.data})
    device = device_for(raw_blob, backend, file_cache(tmp_path))
    content = raw_blob.contents[0]
    with logs.expect("cache_sync_failed"):
        assert device.read(raw_blob.files[0], 0, len(content)) == content
        # served from the page cache in this process, without refetching
        assert device.read(raw_blob.files[0], 0, len(content)) == content
        assert backend.read_count == 1
        device.close()
    raw = (tmp_path / (raw_blob.blob_id + ".blob.data.chunk_map")).read_bytes()
    assert not any(raw[HEADER_SIZE:])
    monkeypatch.undo()
    backend.reset_stats()
    device = device_for(raw_blob, backend, file_cache(tmp_path))
    try:
        assert device.read(raw_blob.files[0], 0, len(content)) == content
        assert backend.bytes_read == len(raw_blob.data)
    finally:
        device.close()


def test_switching_compressed_mode_never_trusts_the_other_files_bits(tmp_path: Path, blob: TestBlob) -> None:
    """Each mode keeps its own data file *and* chunk map: after plain mode cached the first half and
    raw mode the second, each mode refetches exactly what its own file lacks (a shared map, as
    upstream has, would vouch for never-written bytes)."""
    backend = MemoryBackend({blob.blob_id: blob.data})
    chunks, content = blob.files[0], blob.contents[0]
    first = {c.compressed_offset for c in chunks[:3]}
    second = {c.compressed_offset for c in chunks[3:]}
    fetched = []
    for compressed, start, end in ((False, 0, 3 * CHUNK), (True, 3 * CHUNK, len(content)),
                                   (False, 0, len(content)), (True, 0, len(content))):
        backend.reset_stats()
        device = device_for(blob, backend, file_cache(tmp_path, compressed=compressed), batch_size=0)
        try:
            assert device.read(chunks, start, end - start) == content[start:end]
        finally:
            device.close()
        fetched.append({off for _, off, _, _ in backend.requests})
    assert fetched == [first, second, second, first]


def test_lost_data_file_resets_the_chunk_map(tmp_path: Path, blob: TestBlob, logs) -> None:  # type: ignore[no-untyped-def]
    backend = MemoryBackend({blob.blob_id: blob.data})
    device = device_for(blob, backend, file_cache(tmp_path))
    device.read(blob.files[0], 0, CHUNK)
    device.close()
    (tmp_path / (blob.blob_id + ".blob.data")).unlink()
    backend.reset_stats()
    device = device_for(blob, backend, file_cache(tmp_path))
    try:
        with logs.expect("cache_data_missing", count=1):
            assert device.read(blob.files[0], 0, CHUNK) == blob.contents[0][:CHUNK]
        assert backend.read_count == 1
    finally:
        device.close()


@pytest.mark.parametrize("damage", ["size", "header"])
def test_damaged_chunk_map_is_recreated(tmp_path: Path, blob: TestBlob, damage: str, logs) -> None:  # type: ignore[no-untyped-def]
    backend = MemoryBackend({blob.blob_id: blob.data})
    device = device_for(blob, backend, file_cache(tmp_path))
    device.read(blob.files[0], 0, 4 * CHUNK)
    device.close()
    map_file = tmp_path / (blob.blob_id + ".blob.data.chunk_map")
    raw = bytearray(map_file.read_bytes())
    if damage == "size":
        raw += b"\xff" * 10
    else:
        raw[0:4] = b"JUNK"
    map_file.write_bytes(bytes(raw))
    backend.reset_stats()
    device = device_for(blob, backend, file_cache(tmp_path))
    try:
        with logs.expect("chunk_map_reset", count=1):
            assert device.read(blob.files[0], 0, 4 * CHUNK) == blob.contents[0][:4 * CHUNK]
        assert backend.read_count >= 1
    finally:
        device.close()


def test_zeroed_chunk_map_from_an_interrupted_create_is_accepted(tmp_path: Path, blob: TestBlob) -> None:
    (tmp_path / (blob.blob_id + ".blob.data")).write_bytes(b"")
    map_file = tmp_path / (blob.blob_id + ".blob.data.chunk_map")
    map_file.write_bytes(bytes(HEADER_SIZE + (blob.info.chunk_count + 7) // 8))
    backend = MemoryBackend({blob.blob_id: blob.data})
    device = device_for(blob, backend, file_cache(tmp_path))
    try:
        assert device.read(blob.files[1], 0, CHUNK) == blob.contents[1][:CHUNK]
        assert struct.unpack_from("<I", map_file.read_bytes())[0] == MAGIC1
    finally:
        device.close()


# ------------------------------------------------------------------------------ backend failures
@pytest.mark.allow_logs
def test_backend_failure_reaches_every_waiter_and_is_not_cached(tmp_path: Path, blob: TestBlob) -> None:
    backend = FlakyBackend({blob.blob_id: blob.data}, fail_times=1, transient=False)
    backend.gate = threading.Event()
    device = device_for(blob, backend, file_cache(tmp_path), batch_size=0)
    outcomes: list[str] = []

    def reader() -> None:
        try:
            device.read(blob.files[0], 5, 10)
            outcomes.append("ok")
        except BackendError:
            outcomes.append("error")

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    backend.gate.set()
    for t in threads:
        t.join()
    try:
        assert outcomes == ["error"] * 4
        assert device.read(blob.files[0], 5, 10) == blob.contents[0][5:15]
    finally:
        device.close()


def test_short_and_failed_backend_answers_are_retried_by_the_backend(tmp_path: Path, blob: TestBlob) -> None:
    backend = FlakyBackend({blob.blob_id: blob.data}, fail_times=1, short_reads=1)
    device = device_for(blob, backend, file_cache(tmp_path), digest_validate=True)
    try:
        assert device.read(blob.files[0], 0, 3 * CHUNK) == blob.contents[0][:3 * CHUNK]
        assert backend.read_count == 3
    finally:
        device.close()


def test_missing_blob_is_eio(tmp_path: Path, blob: TestBlob) -> None:
    device = device_for(blob, MemoryBackend(), CacheConfig())
    with pytest.raises(BackendError) as exc:
        device.read(blob.files[0], 0, 10)
    assert exc.value.errno == 5
    device.close()


# ------------------------------------------------------------------------------ config
def test_create_cache_from_config(tmp_path: Path) -> None:
    backend = MemoryBackend()
    assert create_cache(CacheConfig(), backend).type == "dummycache"
    assert create_cache(CacheConfig(type="dummycache"), backend).type == "dummycache"
    work = tmp_path / "a" / "b"
    cfg = CacheConfig(type="filecache", filecache=FileCacheConfig(work_dir=str(work)))
    manager = create_cache(cfg, backend)
    assert manager.type == "blobcache" and work.is_dir()
    with pytest.raises(Unsupported):
        create_cache(CacheConfig(type="fscache"), backend)
    with pytest.raises(Unsupported):
        create_cache(CacheConfig(type="blobcache", filecache=FileCacheConfig(
            work_dir=str(work), enable_encryption=True)), backend)
    with pytest.raises(ConfigError):
        create_cache(CacheConfig(type="memcache"), backend)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError):
        create_cache(file_cache(blocker / "sub"), backend)


def test_blob_id_that_escapes_work_dir_is_refused(tmp_path: Path, blob: TestBlob) -> None:
    from dataclasses import replace

    from nydusd.errors import InvalidArgument
    bad = replace(blob.info, blob_id="../evil")
    device = BlobDevice([bad], create_cache(file_cache(tmp_path / "w"), MemoryBackend()))
    with pytest.raises(InvalidArgument):
        device.read(blob.files[0], 0, 1)
    device.close()
    assert not (tmp_path / "evil.blob.data").exists()


@pytest.mark.parametrize("validate", [False, True])
def test_warm_partial_read_preads_only_what_is_asked(tmp_path: Path, raw_blob: TestBlob, validate: bool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from nydusd.storage.cache import blobcache

    backend = MemoryBackend({raw_blob.blob_id: raw_blob.data})
    device = device_for(raw_blob, backend, file_cache(tmp_path, validate=validate))
    content = raw_blob.contents[0]
    sizes: list[int] = []
    real_pread = os.pread

    def pread(fd: int, n: int, offset: int) -> bytes:
        sizes.append(n)
        return real_pread(fd, n, offset)

    try:
        assert device.read(raw_blob.files[0], 0, len(content)) == content
        monkeypatch.setattr(blobcache.os, "pread", pread)
        assert device.read(raw_blob.files[0], CHUNK + 100, 8192) == content[CHUNK + 100:CHUNK + 8292]
        assert device.read(raw_blob.files[0], 2 * CHUNK - 10, 20) == content[2 * CHUNK - 10:2 * CHUNK + 10]
        # with validation each chunk is read whole and verified; without, just the bytes asked for
        # (two chunks laid out in a row in the cache file: one pread across the boundary)
        assert sizes == ([CHUNK, CHUNK, CHUNK] if validate else [8192, 20])
        snap = device.metrics()
        assert snap["whole_hits"] == 2 and snap["total"] == 3
    finally:
        device.close()


_PROPERTY_BLOB = build_blob([os.urandom(3000) + b"z" * 9000 + os.urandom(200)], chunk_size=4096)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cached=st.sets(st.integers(0, 2)), offset=st.integers(0, 12300), size=st.integers(1, 13000),
       batch=st.sampled_from([0, 1, 4096, 6000, 1 << 20]))
def test_reads_fetch_exactly_the_missing_chunks_in_merged_ranges(tmp_path_factory: pytest.TempPathFactory,
                                                                 cached: set[int], offset: int, size: int,
                                                                 batch: int) -> None:
    """Property: whatever is cached beforehand and whatever range is read, the bytes are right,
    only missing chunks are fetched, each at most once, in contiguous requests within the limit
    (or one chunk when a chunk alone exceeds it)."""
    blob = _PROPERTY_BLOB
    chunks, content = blob.files[0], blob.contents[0]
    backend = MemoryBackend({blob.blob_id: blob.data})
    device = device_for(blob, backend, file_cache(tmp_path_factory.mktemp("p")), batch_size=batch)
    try:
        for i in cached:
            device.read(chunks[i:i + 1], 0, 1)
        backend.reset_stats()
        assert device.read(chunks, offset, size) == content[offset:offset + size]
        end = min(len(content), offset + size)
        span = chunks[offset // 4096:(end - 1) // 4096 + 1] if offset < end else []
        wanted = {c.compressed_offset for c in span}
        fetched: list[int] = []
        for _, off, n, _ in backend.requests:
            inside = [c for c in chunks if off <= c.compressed_offset < off + n]
            assert sum(c.compressed_size for c in {c.compressed_offset: c for c in inside}.values()) == n
            assert n <= batch or len({c.compressed_offset for c in inside}) == 1
            fetched += [c.compressed_offset for c in {c.compressed_offset: c for c in inside}.values()]
        assert len(fetched) == len(set(fetched))
        was_cached = {chunks[i].compressed_offset for i in cached}
        assert not set(fetched) & was_cached
        assert wanted - was_cached <= set(fetched)
    finally:
        device.close()


def test_dummy_cache_keeps_the_last_chunks_so_a_late_request_does_not_refetch(blob: TestBlob) -> None:
    """The kernel sends a chunk's 128 KiB requests in parallel; one arriving just after the chunk's
    flight ended must find the chunk (the dummy cache keeps the last RECENT_CHUNKS in memory)."""
    from nydusd.storage.cache.dummy import RECENT_CHUNKS

    backend = MemoryBackend({blob.blob_id: blob.data})
    device = device_for(blob, backend, CacheConfig(), batch_size=0)
    content = blob.contents[0]
    try:
        assert device.read(blob.files[0], 0, 1000) == content[:1000]
        assert device.read(blob.files[0], 5000, 1000) == content[5000:6000]
        assert backend.read_count == 1
        for i in range(1, RECENT_CHUNKS + 1):  # the first chunk drops out
            assert device.read(blob.files[0], i * CHUNK, 10) == content[i * CHUNK:i * CHUNK + 10]
        assert backend.read_count == 1 + RECENT_CHUNKS
        assert device.read(blob.files[0], 0, 10) == content[:10]
        assert backend.read_count == 2 + RECENT_CHUNKS
    finally:
        device.close()
