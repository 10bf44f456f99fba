"""One contract suite for every blob backend, run against real servers (design R14).

Parametrized over: localfs, registry without auth / htpasswd / token auth (docker-registry),
registry through a Dragonfly stand-in proxy (tinyproxy), s3 (moto server with signature checks)
and oss (the OSS-protocol test server, which verifies oss2's signatures). Every case serves the
same blobs; every read is compared byte for byte with the data that was stored.
"""

from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nydusd.config import BackendConfig
from nydusd.errors import BackendError, BlobNotFound, Unsupported
from nydusd.storage.backend import BlobBackend, create_backend
from tests.harness.servers.content_server import ContentServer

CASES = ["localfs", "registry", "registry-htpasswd", "registry-token", "registry-proxy", "s3", "oss",
         "http-proxy", "http-proxy-unix"]


def _blobs() -> dict[str, bytes]:
    rng = random.Random(20240611)
    datas = [b"", b"x", rng.randbytes(4096), rng.randbytes(1_500_007), bytes(70_000)]
    return {hashlib.sha256(d).hexdigest(): d for d in datas}


BLOBS = _blobs()
MISSING = hashlib.sha256(b"never stored").hexdigest()


def _cfg(type_: str, sub: dict[str, Any]) -> BackendConfig:
    return BackendConfig.model_validate({"type": type_, type_: sub})


def _localfs(tmp: Path) -> BackendConfig:
    for blob_id, data in BLOBS.items():
        (tmp / blob_id).write_bytes(data)
    return _cfg("localfs", {"dir": str(tmp)})


def _registry(server: Any, repo: str, **extra: Any) -> BackendConfig:
    for data in BLOBS.values():
        server.push_blob(repo, data)
    return _cfg("registry", server.backend_config(repo, **extra))


@pytest.fixture(params=CASES)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobBackend]:
    case = request.param
    get = request.getfixturevalue
    if case == "localfs":
        cfg = _localfs(tmp_path)
    elif case == "registry":
        cfg = _registry(get("registry_server"), "contract/plain")
    elif case == "registry-htpasswd":
        cfg = _registry(get("registry_htpasswd"), "contract/basic")
    elif case == "registry-token":
        cfg = _registry(get("registry_token"), "contract/token")
    elif case == "registry-proxy":
        proxy = get("tinyproxy")
        cfg = _registry(get("registry_htpasswd"), "contract/proxied",
                        proxy={"url": proxy.url, "fallback": False, "check_interval": 1})
    elif case == "s3":
        s3 = get("moto_s3")
        s3.create_bucket("contract")
        for blob_id, data in BLOBS.items():
            s3.put_object("contract", f"blobs/{blob_id}", data)
        cfg = _cfg("s3", s3.backend_config("contract", "blobs/"))
    elif case == "oss":
        oss = get("oss_server")
        for blob_id, data in BLOBS.items():
            oss.put_object("contract", f"nydus/{blob_id}", data)
        cfg = _cfg("oss", oss.backend_config("contract", "nydus/"))
    else:
        sock = tmp_path / "content.sock" if case == "http-proxy-unix" else None
        # over a unix socket the config's path is ignored (upstream): blobs live at /<id>
        content = ContentServer(BLOBS, prefix="" if sock else "/content/blobs", unix_socket=sock)
        request.addfinalizer(content.stop)
        addr = str(sock) if sock else content.url
        cfg = _cfg("http-proxy", {"addr": addr, "path": "/content/blobs", "retry_limit": 2})
    b = create_backend(cfg)
    try:
        yield b
        reads = b.metrics()["read_count"]
    finally:
        b.close()
    if case == "registry-proxy" and reads:
        # the reads really went through the proxy
        assert get("tinyproxy").requests_seen("/blobs/sha256:") > 0


def test_type_and_blob_size(backend: BlobBackend) -> None:
    assert backend.type in ("localfs", "registry", "s3", "oss", "http-proxy")
    for blob_id, data in BLOBS.items():
        assert backend.blob_size(blob_id) == len(data)


def test_full_reads_are_exact(backend: BlobBackend) -> None:
    for blob_id, data in BLOBS.items():
        got = backend.read(blob_id, 0, len(data))
        assert len(got) == len(data) and got == data


def test_ranged_reads_are_exact(backend: BlobBackend) -> None:
    blob_id, data = max(BLOBS.items(), key=lambda kv: len(kv[1]))
    rng = random.Random(7)
    for _ in range(25):
        off = rng.randrange(0, len(data))
        size = rng.choice([1, 511, 4096, 65536, 1 << 20, rng.randrange(1, 200_000)])
        assert backend.read(blob_id, off, size) == data[off:off + size]


def test_edge_reads(backend: BlobBackend) -> None:
    blob_id, data = max(BLOBS.items(), key=lambda kv: len(kv[1]))
    n = len(data)
    assert backend.read(blob_id, 0, 1) == data[:1]
    assert backend.read(blob_id, n - 1, 1) == data[-1:]
    assert backend.read(blob_id, n - 100, 1000) == data[-100:]  # crosses the end: short
    assert backend.read(blob_id, n, 10) == b""  # starts at the end
    assert backend.read(blob_id, 5, 0) == b""
    with pytest.raises(BackendError, match="beyond the end"):
        backend.read(blob_id, n + 10, 10)
    tiny = hashlib.sha256(b"x").hexdigest()
    assert backend.read(tiny, 0, 100) == b"x"
    empty = hashlib.sha256(b"").hexdigest()
    assert backend.read(empty, 0, 10) == b""


def test_missing_blob_is_blob_not_found(backend: BlobBackend) -> None:
    with pytest.raises(BlobNotFound) as ei:
        backend.read(MISSING, 0, 10)
    err = ei.value
    assert err.errno == 5 and err.blob_id == MISSING and err.offset == 0 and err.size == 10
    assert MISSING in str(err)
    with pytest.raises(BlobNotFound):
        backend.blob_size(MISSING)


def test_concurrent_reads(backend: BlobBackend) -> None:
    blob_id, data = max(BLOBS.items(), key=lambda kv: len(kv[1]))
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(8):
                off = rng.randrange(0, len(data) - 1)
                size = rng.randrange(1, 300_000)
                assert backend.read(blob_id, off, size) == data[off:off + size]
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_metrics_count_reads(backend: BlobBackend) -> None:
    blob_id, data = max(BLOBS.items(), key=lambda kv: len(kv[1]))
    before = backend.metrics()
    backend.read(blob_id, 0, 4096)
    backend.read(blob_id, 10, 1 << 20)
    with pytest.raises(BlobNotFound):
        backend.read(MISSING, 0, 1)
    m = backend.metrics()
    assert m["backend_type"] == ("oss" if backend.type == "s3" else backend.type)
    assert m["read_count"] - before["read_count"] == 3
    assert m["read_errors"] - before["read_errors"] == 1
    assert m["read_amount_total"] - before["read_amount_total"] == 4096 + (1 << 20)
    assert m["read_count_block_size_dist"][7] - before["read_count_block_size_dist"][7] == 1


def test_put_blob_where_writable(backend: BlobBackend, tmp_path: Path) -> None:
    data = random.Random(99).randbytes(300_001)
    blob_id = hashlib.sha256(data).hexdigest()
    src = tmp_path / "upload.blob"
    src.write_bytes(data)
    if backend.type not in ("localfs", "s3", "oss"):
        with pytest.raises(Unsupported):
            backend.put_blob(blob_id, str(src))
        return
    assert not backend.blob_exists(blob_id)
    backend.put_blob(blob_id, str(src))
    assert backend.blob_exists(blob_id) and backend.blob_size(blob_id) == len(data)
    assert backend.read(blob_id, 0, len(data)) == data
    assert backend.read(blob_id, 123, 4567) == data[123:4690]
