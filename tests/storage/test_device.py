"""BlobDevice: file ranges across chunks through the dummy and file caches (pure tier)."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest

from nydusd.compress import Compressor
from nydusd.config import CacheConfig, FileCacheConfig
from nydusd.digest import DigestAlgorithm
from nydusd.errors import CorruptMetadata
from nydusd.storage.cache import create_cache
from nydusd.storage.chunk import ChunkInfo
from nydusd.storage.device import BlobDevice
from tests.harness.fakes.backends import MemoryBackend
from tests.harness.fakes.blobs import TestBlob, build_blob, mixed_content

CHUNK = 0x10000


def file_cache(work_dir: Path, **kw: object) -> CacheConfig:
    return CacheConfig(type="blobcache", filecache=FileCacheConfig(work_dir=str(work_dir)), **kw)


@pytest.fixture(params=["dummy", "blobcache", "blobcache-compressed"])
def cache_cfg(request: pytest.FixtureRequest, tmp_path: Path) -> CacheConfig:
    if request.param == "dummy":
        return CacheConfig()
    return file_cache(tmp_path / "cache", compressed=request.param.endswith("compressed"))


def make_device(blob: TestBlob, cfg: CacheConfig, **kw: object) -> tuple[BlobDevice, MemoryBackend]:
    backend = MemoryBackend({blob.blob_id: blob.data})
    manager = create_cache(cfg, backend, **kw)  # type: ignore[arg-type]
    return BlobDevice([blob.info], manager), backend


@pytest.mark.parametrize("compressor", [Compressor.ZSTD, Compressor.LZ4_BLOCK, Compressor.NONE])
def test_reads_across_chunk_boundaries_match_the_file(compressor: Compressor, cache_cfg: CacheConfig) -> None:
    contents = [mixed_content(5 * CHUNK + 1234, seed=1), os.urandom(3 * CHUNK), b"small file", b""]
    blob = build_blob(contents, chunk_size=CHUNK, compressor=compressor)
    flags = {c.is_compressed for f in blob.files for c in f}
    assert flags == ({True, False} if compressor is not Compressor.NONE else {False})
    device, _ = make_device(blob, cache_cfg, digest_validate=True)
    rng = random.Random(7)
    try:
        for chunks, content in zip(blob.files, blob.contents, strict=True):
            assert device.read(chunks, 0, len(content) + 100) == content
            for _ in range(30):
                off = rng.randrange(0, len(content) + 10)
                size = rng.choice([1, 100, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 10 * CHUNK])
                assert device.read(chunks, off, size) == content[off:off + size]
            # exact boundaries
            for off in range(CHUNK, len(content), CHUNK):
                assert device.read(chunks, off - 1, 2) == content[off - 1:off + 1]
    finally:
        device.close()


def test_deduplicated_chunks_are_stored_and_fetched_once(tmp_path: Path) -> None:
    block = mixed_content(CHUNK, seed=3)
    other = os.urandom(CHUNK)
    # file 0 repeats one chunk four times; file 1 shares it with file 0
    contents = [block * 4, other + block]
    blob = build_blob(contents, chunk_size=CHUNK)
    assert blob.info.chunk_count == 2
    assert len({c.compressed_offset for c in blob.files[0]}) == 1
    device, backend = make_device(blob, file_cache(tmp_path))
    try:
        assert device.read(blob.files[0], 0, 4 * CHUNK) == contents[0]
        assert backend.read_count == 1
        assert device.read(blob.files[1], 0, 2 * CHUNK) == contents[1]
        assert backend.bytes_read == len(blob.data)
    finally:
        device.close()


def test_sha256_digester_and_short_last_chunk(tmp_path: Path) -> None:
    contents = [mixed_content(2 * CHUNK + 17, seed=5)]
    blob = build_blob(contents, chunk_size=CHUNK, digester=DigestAlgorithm.SHA256)
    device, _ = make_device(blob, file_cache(tmp_path, validate=True), digest_validate=True)
    try:
        assert device.read(blob.files[0], 2 * CHUNK, 100) == contents[0][2 * CHUNK:]
        assert device.read(blob.files[0], 2 * CHUNK + 17, 100) == b""
        assert device.read(blob.files[0], 10 * CHUNK, 100) == b""
        assert device.read(blob.files[0], 0, 0) == b""
    finally:
        device.close()


def test_amplification_pulls_following_chunks_into_one_request(tmp_path: Path) -> None:
    content = os.urandom(8 * CHUNK)  # raw chunks: compressed size == CHUNK
    blob = build_blob([content], chunk_size=CHUNK)
    backend = MemoryBackend({blob.blob_id: blob.data})
    manager = create_cache(file_cache(tmp_path), backend, batch_size=4 * CHUNK)
    device = BlobDevice([blob.info], manager)
    try:
        assert device.read(blob.files[0], 10, 100) == content[10:110]
        assert backend.requests == [(blob.blob_id, 0, 4 * CHUNK, False)]
        assert device.read(blob.files[0], 3 * CHUNK, 100) == content[3 * CHUNK:3 * CHUNK + 100]
        assert backend.read_count == 1  # chunk 3 came with the first request
        assert device.read(blob.files[0], 4 * CHUNK, 10) == content[4 * CHUNK:4 * CHUNK + 10]
        assert backend.requests[1] == (blob.blob_id, 4 * CHUNK, 4 * CHUNK, False)
    finally:
        device.close()


def test_no_amplification_with_batch_size_zero(tmp_path: Path) -> None:
    content = os.urandom(4 * CHUNK)
    blob = build_blob([content], chunk_size=CHUNK)
    backend = MemoryBackend({blob.blob_id: blob.data})
    device = BlobDevice([blob.info], create_cache(file_cache(tmp_path), backend, batch_size=0))
    try:
        assert device.read(blob.files[0], 0, 10) == content[:10]
        assert backend.requests == [(blob.blob_id, 0, CHUNK, False)]
    finally:
        device.close()


def test_multi_blob_file_reads_each_blob_from_its_backend_object(tmp_path: Path) -> None:
    a = build_blob([mixed_content(2 * CHUNK, seed=11)], chunk_size=CHUNK, blob_index=0)
    b = build_blob([mixed_content(2 * CHUNK, seed=12)], chunk_size=CHUNK, blob_index=1,
                   compressor=Compressor.LZ4_BLOCK)
    # a file made of chunk 0 of blob a, then chunk 1 of blob b (dedup across layers)
    chunks = [a.files[0][0], ChunkInfo(**{**{n: getattr(b.files[0][1], n) for n in ChunkInfo.__slots__},
                                          "file_offset": CHUNK})]
    expected = a.contents[0][:CHUNK] + b.contents[0][CHUNK:]
    backend = MemoryBackend({a.blob_id: a.data, b.blob_id: b.data})
    device = BlobDevice([a.info, b.info], create_cache(file_cache(tmp_path), backend))
    try:
        assert device.read(chunks, 0, 2 * CHUNK) == expected
        assert device.read(chunks, CHUNK - 5, 10) == expected[CHUNK - 5:CHUNK + 5]
        assert {r[0] for r in backend.requests} == {a.blob_id, b.blob_id}
    finally:
        device.close()


def test_chunk_of_unknown_blob_is_corrupt_metadata(tmp_path: Path) -> None:
    blob = build_blob([b"x" * 100], chunk_size=CHUNK, blob_index=3)
    device = BlobDevice([], create_cache(CacheConfig(), MemoryBackend()), chunk_size=CHUNK)
    with pytest.raises(CorruptMetadata) as exc:
        device.read(blob.files[0], 0, 10)
    assert exc.value.errno == 5
    device.close()


def test_concurrent_random_reads_are_always_correct(tmp_path: Path) -> None:
    contents = [mixed_content(6 * CHUNK + 99, seed=s) for s in range(4)]
    blob = build_blob(contents, chunk_size=CHUNK)
    backend = MemoryBackend({blob.blob_id: blob.data}, delay=0.001)
    device = BlobDevice([blob.info], create_cache(file_cache(tmp_path), backend, batch_size=2 * CHUNK))
    errors: list[str] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(60):
            f = rng.randrange(len(contents))
            off = rng.randrange(len(contents[f]))
            size = rng.randrange(1, 3 * CHUNK)
            if device.read(blob.files[f], off, size) != contents[f][off:off + size]:
                errors.append(f"file {f} off {off} size {size}")

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    device.close()
    assert errors == []
    # every unique chunk was fetched exactly once in total
    fetched = sum(r[2] for r in backend.requests)
    assert fetched == len(blob.data)


def test_chunk_buffer_serves_sequential_pieces_of_a_chunk_from_one_fetch(tmp_path: Path) -> None:
    """A cache that hands out only whole verified chunks (compressed cache file) reads each chunk
    once for a stream of FUSE-sized pieces: the piece at the chunk's first byte fills the chunk
    buffer and the following pieces are served from it. Random pieces do not fill it; a plain
    cache file never needs it (the warm path reads just the piece)."""
    content = mixed_content(4 * CHUNK - 100, seed=3)
    blob = build_blob([content], chunk_size=CHUNK)
    for compressed in (True, False):
        device, _ = make_device(blob, file_cache(tmp_path / str(compressed), compressed=compressed))
        try:
            chunks = blob.files[0]
            assert device.read(chunks, 0, len(content)) == content   # warm the cache
            cache = device.cache(0)
            calls: list[int] = []
            real = cache.read_chunks

            def counting(wanted, *, calls=calls, real=real, **kw):  # type: ignore[no-untyped-def]
                wanted = list(wanted)
                calls.extend(c.index for c in wanted)
                return real(wanted, **kw)

            cache.read_chunks = counting  # type: ignore[method-assign]
            file = device.open_file(chunks, len(content))
            piece = CHUNK // 4
            out = b"".join(bytes(file.read(off, piece)) for off in range(0, len(content), piece))
            assert out == content
            if not compressed:
                assert calls == []                    # plain cache file: straight preads
                continue
            assert calls == [c.index for c in chunks]  # one whole-chunk read per chunk
            # a piece spanning two chunks and a whole chunk bypass the buffer
            assert bytes(file.read(CHUNK - 10, 20)) == content[CHUNK - 10:CHUNK + 10]
            assert bytes(file.read(0, CHUNK)) == content[:CHUNK]
            assert len(calls) == len(chunks) + 3
            device.buffer.clear()
            assert bytes(file.read(5000, 4096)) == content[5000:9096]
            assert bytes(file.read(6000, 4096)) == content[6000:10096]
            assert len(calls) == len(chunks) + 5        # random pieces do not fill the buffer
            assert bytes(file.read(len(content) - 10, 100)) == content[-10:]   # clipped at EOF
            assert file.read(len(content), 100) == b""
        finally:
            device.close()


def test_read_nowait_serves_only_page_cached_warm_bytes(tmp_path: Path) -> None:
    """The lock-held FUSE fast path: bytes of a ready chunk that are in the page cache come back
    at once (counted as one cached read); a chunk not cached yet, cache-file pages not in memory
    (RWF_NOWAIT would block), a request across chunks, a compressed cache and a closed cache all
    answer None and count nothing -- the caller then takes the normal read."""
    content = mixed_content(4 * CHUNK, seed=9)
    blob = build_blob([content], chunk_size=CHUNK)
    device, _ = make_device(blob, file_cache(tmp_path / "plain"), batch_size=0)
    try:
        file = device.open_file(blob.files[0], len(content))
        assert file.read_nowait(100, 4096) is None            # no cache handle yet
        assert bytes(file.read(0, 10)) == content[:10]         # opens the cache, fetches chunk 0
        assert file.read_nowait(CHUNK + 100, 4096) is None     # chunk 1 not cached
        device.flush()                                         # durable: its pages can be dropped
        cache = device.cache(0)
        data_path = cache.data_path  # type: ignore[attr-defined]
        fd = os.open(data_path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        before = device.metrics()
        assert file.read_nowait(8192, 4096) is None            # would wait for the disk
        assert device.metrics()["total"] == before["total"]
        assert bytes(file.read(8192, 4096)) == content[8192:12288]   # the normal path reads it in
        got = file.read_nowait(8192, 4096)
        assert got is not None and bytes(got) == content[8192:12288]
        snap = device.metrics()
        assert snap["total"] == before["total"] + 2
        assert snap["whole_hits"] == before["whole_hits"] + 2
        assert file.read_nowait(CHUNK - 10, 20) is None        # across two chunks
        assert file.read_nowait(len(content), 10) is None      # at EOF
        device.close()
        assert file.read_nowait(8192, 4096) is None            # closed
    finally:
        device.close()
    device, _ = make_device(blob, file_cache(tmp_path / "raw", compressed=True))
    try:
        file = device.open_file(blob.files[0], len(content))
        assert bytes(file.read(0, CHUNK)) == content[:CHUNK]
        assert file.read_nowait(100, 4096) is None             # compressed: whole chunks only
    finally:
        device.close()


def test_cache_metrics_exact_after_concurrent_fast_and_normal_reads(tmp_path: Path) -> None:
    """Reads counted without locks (per-thread cells) still add up exactly: 8 threads mixing
    the fast path and the normal path, then total == whole_hits == reads made."""
    content = mixed_content(8 * CHUNK, seed=4)
    blob = build_blob([content], chunk_size=CHUNK)
    device, _ = make_device(blob, file_cache(tmp_path))
    try:
        file = device.open_file(blob.files[0], len(content))
        assert bytes(file.read(0, len(content))) == content
        base = device.metrics()
        counts = [0] * 8
        errors: list[str] = []

        def reader(n: int) -> None:
            rng = random.Random(n)
            for _ in range(300):
                off = rng.randrange(0, len(content) - 4096)
                off -= off % 4096 if (off % CHUNK) + 4096 > CHUNK else 0
                got = file.read_nowait(off, 4096) if rng.random() < 0.5 else None
                if got is None:
                    got = file.read(off, 4096)
                if bytes(got) != content[off:off + len(got)]:
                    errors.append(f"wrong bytes at {off}")
                counts[n] += 1

        threads = [threading.Thread(target=reader, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        snap = device.metrics()
        assert snap["total"] - base["total"] == sum(counts) == 2400
        assert snap["whole_hits"] - base["whole_hits"] == 2400 and snap["partial_hits"] == 0
    finally:
        device.close()
