"""The cache over the REAL registry backend (docker-registry on 127.0.0.1): concurrent cold reads,
restart with zero backend traffic, and a fault storm (through the fault shim) that may fail reads
with EIO but never serves or caches wrong bytes."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nydusd.compress import Compressor
from nydusd.config import CacheConfig, FileCacheConfig, RegistryConfig
from nydusd.errors import BackendError
from nydusd.storage.backend.base import RetryPolicy
from nydusd.storage.backend.registry import RegistryBackend
from nydusd.storage.cache import create_cache
from nydusd.storage.device import BlobDevice
from tests.harness.fakes.blobs import TestBlob, build_blob, mixed_content
from tests.harness.servers.fault_shim import FaultShim
from tests.harness.servers.registry import RegistryServer

CHUNK = 0x10000
REPO = "cache/test"


@pytest.fixture(scope="module")
def pushed(registry_server: RegistryServer) -> TestBlob:
    blob = build_blob([mixed_content(40 * CHUNK + 333, seed=s) for s in range(3)], chunk_size=CHUNK,
                      compressor=Compressor.ZSTD)
    registry_server.push_blob(REPO, blob.data)
    return blob


def backend_for(host: str, **kw: object) -> RegistryBackend:
    return RegistryBackend(RegistryConfig(scheme="http", host=host, repo=REPO, timeout=5, **kw))


@pytest.fixture
def devices(tmp_path: Path) -> Iterator[list[tuple[BlobDevice, RegistryBackend]]]:
    opened: list[tuple[BlobDevice, RegistryBackend]] = []
    yield opened
    for device, backend in opened:
        device.close()
        backend.close()


def open_device(blob: TestBlob, backend: RegistryBackend, work_dir: Path, opened: list, **cache: object
                ) -> BlobDevice:
    cfg = CacheConfig(type="blobcache", filecache=FileCacheConfig(work_dir=str(work_dir)), **cache)
    device = BlobDevice([blob.info], create_cache(cfg, backend, digest_validate=True, batch_size=4 * CHUNK))
    opened.append((device, backend))
    return device


def random_reads(device: BlobDevice, blob: TestBlob, seed: int, count: int, errors: list[str],
                 failures: list[BackendError] | None = None) -> None:
    rng = random.Random(seed)
    for _ in range(count):
        f = rng.randrange(len(blob.files))
        off = rng.randrange(len(blob.contents[f]))
        size = rng.randrange(1, 5 * CHUNK)
        try:
            got = device.read(blob.files[f], off, size)
        except BackendError as exc:
            if failures is None:
                raise
            assert exc.errno == 5
            failures.append(exc)
            continue
        if got != blob.contents[f][off:off + size]:
            errors.append(f"file {f} offset {off} size {size}")


def test_concurrent_cold_reads_then_restart_reads_nothing(registry_server: RegistryServer, pushed: TestBlob,
                                                          tmp_path: Path, devices: list) -> None:
    backend = backend_for(registry_server.host)
    device = open_device(pushed, backend, tmp_path, devices)
    errors: list[str] = []
    threads = [threading.Thread(target=random_reads, args=(device, pushed, s, 40, errors)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for chunks, content in zip(pushed.files, pushed.contents, strict=True):
        assert device.read(chunks, 0, len(content)) == content
    assert errors == []
    stats = backend.metrics()
    assert stats["backend_type"] == "registry" and stats["read_errors"] == 0
    assert stats["read_amount_total"] == len(pushed.data)   # every chunk crossed the network once
    device.close()                                            # makes the chunk maps durable

    again = backend_for(registry_server.host)
    device = open_device(pushed, again, tmp_path, devices)
    for chunks, content in zip(pushed.files, pushed.contents, strict=True):
        assert device.read(chunks, 0, len(content)) == content
    assert again.metrics()["read_count"] == 0


@pytest.mark.allow_logs
def test_fault_storm_fails_reads_with_eio_but_never_serves_wrong_bytes(
        registry_server: RegistryServer, pushed: TestBlob, tmp_path: Path, devices: list) -> None:
    shim = FaultShim(registry_server.port, slow_seconds=2.5)
    try:
        backend = backend_for(shim.netloc, retry_limit=2)
        backend.retry = RetryPolicy(retry_limit=2, base_delay=0.005, max_delay=0.02)
        device = open_device(pushed, backend, tmp_path, devices)
        shim.randomize(0.4, seed=99, kinds=("500", "503", "429", "reset", "truncate"))
        errors: list[str] = []
        failures: list[BackendError] = []
        threads = [threading.Thread(target=random_reads, args=(device, pushed, s, 25, errors, failures))
                   for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert sum(shim.applied.values()) > 20
        device.close()
    finally:
        shim.stop()
    # Whatever the storm left in the cache is right: re-read everything from the cache files with
    # validation, fetching the rest straight from the registry.
    clean = backend_for(registry_server.host)
    device = open_device(pushed, clean, tmp_path, devices, validate=True)
    for chunks, content in zip(pushed.files, pushed.contents, strict=True):
        assert device.read(chunks, 0, len(content)) == content
    assert clean.metrics()["read_amount_total"] < len(pushed.data)  # the storm's survivors were reused
