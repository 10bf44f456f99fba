"""Closing a file cache while reads and writes are running (an umount under load).

Review finding: ``FileCache.close`` closed the data file and unmapped the chunk map under running
readers (``ValueError: mmap closed or invalid``) and writers (``EBADF`` -- or, had the descriptor
number been reused by the next mount's cache file, a stale write into another blob's cache). Now
close waits for running users, then every entry point answers ``BackendError("cache closed")``.
Real file caches on tmp dirs; the backend is the in-memory fake (delay/gate to hold fetches).
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import pytest

from nydusd.config import CacheConfig, FileCacheConfig
from nydusd.errors import BackendError
from nydusd.storage.cache import blobcache, create_cache
from nydusd.storage.cache.blobcache import FileCache
from nydusd.storage.chunk import ChunkInfo
from nydusd.storage.device import BlobDevice
from tests.harness.fakes.backends import MemoryBackend
from tests.harness.fakes.blobs import TestBlob, build_blob

CHUNK = 0x10000


def file_cache(work_dir: Path, **kw: object) -> CacheConfig:
    return CacheConfig(type="blobcache", filecache=FileCacheConfig(work_dir=str(work_dir)), **kw)


@pytest.fixture
def blob() -> TestBlob:
    return build_blob([os.urandom(32 * CHUNK)], chunk_size=CHUNK)


def open_device(blob: TestBlob, backend: MemoryBackend, work_dir: Path, **kw: object) -> BlobDevice:
    return BlobDevice([blob.info], create_cache(file_cache(work_dir, **kw), backend, batch_size=0))  # type: ignore[arg-type]


@pytest.mark.parametrize("compressed", [False, True])
def test_close_under_concurrent_reads_and_persists(tmp_path: Path, blob: TestBlob, compressed: bool) -> None:
    """Readers (cold: fetch + persist, warm: cached reads) run while the device is closed. Every
    read either returns the right bytes or fails with BackendError; nothing else escapes, no
    reader hangs, and afterwards every entry point answers BackendError."""
    chunks, content = blob.files[0], blob.contents[0]
    for round_ in range(6):
        backend = MemoryBackend({blob.blob_id: blob.data}, delay=0.002)
        device = open_device(blob, backend, tmp_path / f"c{round_}", compressed=compressed)
        cache = device.cache(0)
        assert isinstance(cache, FileCache)
        stray: list[BaseException] = []
        good = [0]
        stop = threading.Event()

        def reader(seed: int, device: BlobDevice = device, stray: list[BaseException] = stray,
                   good: list[int] = good, stop: threading.Event = stop) -> None:
            rnd = random.Random(seed)
            while not stop.is_set():
                offset = rnd.randrange(len(content) - 5000)
                try:
                    data = device.read(chunks, offset, rnd.choice((4096, CHUNK, 3 * CHUNK)))
                except BackendError:
                    continue
                except BaseException as exc:  # noqa: BLE001 - exactly what must not happen
                    stray.append(exc)
                    return
                if data != content[offset:offset + len(data)]:
                    stray.append(AssertionError(f"wrong bytes at {offset}"))
                    return
                good[0] += 1

        threads = [threading.Thread(target=reader, args=(round_ * 10 + i,)) for i in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.02 + 0.03 * round_)
        device.close()
        time.sleep(0.05)  # readers keep hammering the closed device
        stop.set()
        for t in threads:
            t.join(10)
        assert not any(t.is_alive() for t in threads), "a reader hangs on an orphaned fetch"
        assert not stray, stray
        assert good[0] > 0
        assert cache._fd == -1  # noqa: SLF001 - the descriptor really was closed
        assert_closed(device, cache, chunks)


def assert_closed(device: BlobDevice, cache: FileCache, chunks: list[ChunkInfo]) -> None:
    for call in (lambda: device.read(chunks, 0, 100), lambda: cache.is_ready(chunks[0]),
                 lambda: cache.read_chunks(chunks[:2]), lambda: cache.prefetch_chunks(chunks),
                 lambda: cache.read_cached(chunks[:1], 0, 10)):
        with pytest.raises(BackendError):
            call()


def test_fetch_that_outlives_close_fails_cleanly_and_writes_nothing(tmp_path: Path, blob: TestBlob,
                                                                    logs) -> None:  # type: ignore[no-untyped-def]
    """A reader waiting on the backend when the cache closes: its persist must not write through
    the closed descriptor (no ``cache_write_failed``/EBADF), the reader gets BackendError."""
    backend = MemoryBackend({blob.blob_id: blob.data})
    backend.gate = threading.Event()
    device = open_device(blob, backend, tmp_path)
    cache = device.cache(0)
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            device.read(blob.files[0], 0, 100)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.1)  # the reader now waits in the backend, holding no cache resources
    started = time.monotonic()
    device.close()
    assert time.monotonic() - started < 1.0  # nothing of the cache's was in use: no waiting
    backend.gate.set()
    t.join(10)
    assert len(errors) == 1 and isinstance(errors[0], BackendError)
    assert "cache closed" in str(errors[0])
    assert isinstance(cache, FileCache) and cache._map is not None  # noqa: SLF001
    assert cache._map.ready_count == 0  # noqa: SLF001 - nothing was marked ready after close
    data = (tmp_path / f"{blob.blob_id}.blob.data").read_bytes()
    assert not any(data[:CHUNK]), "a write landed after close"


@pytest.fixture
def gated_writes(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Hold every cache write until ``release`` is set; ``writing`` tells a write has started."""
    writing, release = threading.Event(), threading.Event()
    real = blobcache._write_runs  # noqa: SLF001

    def held(fd: int, pieces):  # type: ignore[no-untyped-def]
        writing.set()
        assert release.wait(10)
        real(fd, pieces)

    monkeypatch.setattr(blobcache, "_write_runs", held)
    return writing, release


def test_close_waits_for_a_running_write(tmp_path: Path, blob: TestBlob,
                                         gated_writes: tuple[threading.Event, threading.Event]) -> None:
    writing, release = gated_writes
    backend = MemoryBackend({blob.blob_id: blob.data})
    device = open_device(blob, backend, tmp_path)
    out: list[bytes] = []
    t = threading.Thread(target=lambda: out.append(device.read(blob.files[0], 0, CHUNK)))
    t.start()
    assert writing.wait(10)
    threading.Timer(0.3, release.set).start()
    started = time.monotonic()
    device.close()  # waits for the write, then flushes and closes
    assert time.monotonic() - started >= 0.25
    t.join(10)
    assert out == [blob.contents[0][:CHUNK]]
    data = (tmp_path / f"{blob.blob_id}.blob.data").read_bytes()
    assert data[:CHUNK] == blob.contents[0][:CHUNK]


Gates = tuple[threading.Event, threading.Event]


def test_close_left_to_the_last_user_after_the_bounded_wait(tmp_path: Path, blob: TestBlob, logs,  # type: ignore[no-untyped-def]
                                                            gated_writes: Gates,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    writing, release = gated_writes
    monkeypatch.setattr(blobcache, "CLOSE_WAIT", 0.1)
    backend = MemoryBackend({blob.blob_id: blob.data})
    device = open_device(blob, backend, tmp_path)
    cache = device.cache(0)
    assert isinstance(cache, FileCache)
    out: list[bytes] = []
    t = threading.Thread(target=lambda: out.append(device.read(blob.files[0], 0, CHUNK)))
    t.start()
    assert writing.wait(10)
    fd = cache._fd  # noqa: SLF001
    with logs.expect("cache_close_deferred"):
        device.close()  # returns after the bounded wait; the descriptor stays open for the writer
    os.fstat(fd)
    with pytest.raises(BackendError, match="cache closed"):
        cache.is_ready(blob.files[0][1])
    release.set()
    t.join(10)
    assert out == [blob.contents[0][:CHUNK]]
    assert cache._fd == -1  # noqa: SLF001 - the writer, last out, closed the files
    data = (tmp_path / f"{blob.blob_id}.blob.data").read_bytes()
    assert data[:CHUNK] == blob.contents[0][:CHUNK]
