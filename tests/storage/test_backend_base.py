"""The retry / exact-length / metrics policy of ``BlobBackend`` and the ``localfs`` backend.

The policy is exercised through a tiny in-process subclass whose failures are scripted; the real
transports are covered by the contract suite in ``test_backend_contract.py``.
"""

from __future__ import annotations

import os
import threading
import typing
from pathlib import Path
from typing import Any

import pytest

from nydusd.config import BACKEND_MODELS, BACKEND_TYPES, BackendConfig, LocalFsConfig, RegistryConfig
from nydusd.errors import AuthError, BackendError, BlobNotFound, ConfigError, Unsupported
from nydusd.storage.backend import backend_class, create_backend
from nydusd.storage.backend.base import BlobBackend, RetryPolicy
from nydusd.storage.backend.localfs import LocalFsBackend

FAST = RetryPolicy(retry_limit=3, base_delay=0.001, max_delay=0.002)


class Scripted(BlobBackend):
    """Serves one in-memory blob; ``script`` lists what each attempt does before succeeding."""

    type = "scripted"

    def __init__(self, data: bytes, script: list[Any], retry: RetryPolicy = FAST) -> None:
        super().__init__(retry)
        self.data = data
        self.script = list(script)
        self.attempts = 0
        self.lock = threading.Lock()

    def try_blob_size(self, blob_id: str) -> int:
        if blob_id != "b":
            raise BlobNotFound("no such blob", blob_id=blob_id)
        return len(self.data)

    def try_read(self, blob_id: str, offset: int, size: int, *, prefetch: bool = False) -> bytes:
        with self.lock:
            self.attempts += 1
            step = self.script.pop(0) if self.script else None
        if blob_id != "b":
            raise BlobNotFound("no such blob", blob_id=blob_id)
        if isinstance(step, BaseException):
            raise step
        chunk = self.data[offset:offset + size]
        if step == "short":
            return chunk[: len(chunk) // 2]
        if step == "long":
            return chunk + b"x"
        return chunk


DATA = bytes(range(256)) * 64  # 16 KiB


def test_transient_failures_are_retried_until_success(logs: Any) -> None:
    b = Scripted(DATA, [BackendError("503", transient=True), ConnectionResetError("reset"), "short"])
    with logs.expect("backend_read_retried"):  # the third retry is logged at warning level
        assert b.read("b", 100, 5000) == DATA[100:5100]
    assert b.attempts == 4


def test_retry_budget_exhausted_raises_with_context(logs: Any) -> None:
    b = Scripted(DATA, [BackendError("503", transient=True)] * 10)
    with logs.expect("backend_retries_exhausted", count=1), logs.expect("backend_read_retried"), \
            pytest.raises(BackendError) as ei:
        b.read("b", 10, 20)
    err = ei.value
    assert b.attempts == 4
    assert (err.blob_id, err.offset, err.size, err.attempts) == ("b", 10, 20, 4)
    assert "503" in str(err) and "blob_id=b" in str(err)
    assert b.metrics()["read_errors"] == 1


def test_prefetch_gets_a_smaller_budget(logs: Any) -> None:
    b = Scripted(DATA, [BackendError("503", transient=True)] * 10)
    with logs.expect("backend_retries_exhausted"), pytest.raises(BackendError):
        b.read("b", 0, 10, prefetch=True)
    assert b.attempts == 2


def test_permanent_errors_are_not_retried() -> None:
    b = Scripted(DATA, [AuthError("denied")])
    with pytest.raises(AuthError) as ei:
        b.read("b", 0, 10)
    assert b.attempts == 1 and ei.value.blob_id == "b"
    with pytest.raises(BlobNotFound) as nf:
        b.read("missing", 0, 10)
    assert nf.value.errno == 5  # EIO: the file exists, its data does not


def test_short_reads_only_at_the_end_of_the_blob() -> None:
    b = Scripted(DATA, [])
    assert b.read("b", len(DATA) - 10, 100) == DATA[-10:]
    assert b.read("b", len(DATA), 100) == b""
    with pytest.raises(BackendError, match="beyond the end"):
        b.read("b", len(DATA) + 1, 10)
    # more bytes than asked is a transient protocol error, never passed on
    b2 = Scripted(DATA, ["long"])
    assert b2.read("b", 0, 10) == DATA[:10]


def test_zero_and_negative_ranges() -> None:
    b = Scripted(DATA, [])
    assert b.read("b", 5, 0) == b"" and b.attempts == 0
    with pytest.raises(BackendError):
        b.read("b", -1, 4)


def test_metrics_follow_spec_shape() -> None:
    b = Scripted(DATA, [])
    b.read("b", 0, 512)
    b.read("b", 0, 4096)
    m = b.metrics()
    assert m["read_count"] == 2 and m["read_errors"] == 0 and m["read_amount_total"] == 4608
    assert m["read_count_block_size_dist"][0] == 1 and m["read_count_block_size_dist"][2] == 1
    assert len(m["read_latency_sizes_dist"]) == 8 and all(len(r) == 8 for r in m["read_latency_sizes_dist"])
    assert sum(map(sum, m["read_latency_sizes_dist"])) == 2


def test_backoff_has_jitter_and_cap() -> None:
    p = RetryPolicy(retry_limit=10, base_delay=0.1, max_delay=1.0)
    delays = [p.delay(5) for _ in range(50)]
    assert all(0.5 <= d <= 1.0 for d in delays) and len(set(delays)) > 1
    assert p.attempts(False) == 11 and p.attempts(True) == 2


def test_retry_policy_from_config() -> None:
    cfg = RegistryConfig(host="h", repo="r", retry_limit=2, timeout=3, connect_timeout=1)
    p = RetryPolicy.from_config(cfg)
    assert p.retry_limit == 2 and p.max_elapsed >= 12


# ---------------------------------------------------------------------------- localfs
def _blobs(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(300_000)
    (tmp_path / "aa11").write_bytes(data)
    return tmp_path, data


def test_localfs_reads_dir_and_alt_dirs(tmp_path: Path) -> None:
    d, data = _blobs(tmp_path / "main" if (tmp_path / "main").mkdir() is None else tmp_path)
    alt = tmp_path / "alt"
    alt.mkdir()
    (alt / "bb22").write_bytes(b"alt-blob")
    with LocalFsBackend(LocalFsConfig(dir=str(d), alt_dirs=(str(alt),))) as b:
        assert b.blob_size("aa11") == len(data)
        assert b.read("aa11", 12345, 200_000) == data[12345:212345]
        assert b.read("bb22", 0, 100) == b"alt-blob"
        with pytest.raises(BlobNotFound):
            b.read("cc33", 0, 1)
        with pytest.raises(BlobNotFound):
            b.read("../main/aa11", 0, 1)


def test_localfs_blob_file_mode(tmp_path: Path) -> None:
    f = tmp_path / "single"
    f.write_bytes(b"0123456789")
    with LocalFsBackend(LocalFsConfig(blob_file=str(f))) as b:
        assert b.read("whatever-id", 3, 4) == b"3456"


def test_localfs_needs_dir_or_file() -> None:
    with pytest.raises(ConfigError):
        LocalFsBackend(LocalFsConfig(dir="", blob_file=""))


def test_create_backend_by_type(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"abc")
    cfg = BackendConfig(type="localfs", localfs=LocalFsConfig(dir=str(tmp_path)))
    with create_backend(cfg) as b:
        assert b.type == "localfs" and b.read("x", 0, 3) == b"abc"
        assert b.metrics()["backend_type"] == "localfs"
    with pytest.raises(Unsupported):
        backend_class("ftp")
    with pytest.raises(ConfigError):
        create_backend(BackendConfig(type="localfs", localfs=None))


def test_every_config_backend_type_has_its_class() -> None:
    # One list of backend types, nydusd.config's (read off BackendConfig's sub-config fields): each
    # names the module serving it, whose class takes that type's sub-config model.
    assert BACKEND_TYPES == ("localfs", "localdisk", "oss", "s3", "registry", "http-proxy")
    for type_, model in BACKEND_MODELS.items():
        cls = backend_class(type_)
        assert cls.type == type_ and cls.__module__.endswith("." + type_.replace("-", "_"))
        assert typing.get_type_hints(cls.__init__)["cfg"] is model


# ---------------------------------------------------------------------------- remote config checks
@pytest.mark.parametrize(("type_", "sub", "field"), [
    ("registry", {"host": "", "repo": "a/b"}, "backend.registry.host"),
    ("registry", {"host": "h:1", "repo": ""}, "backend.registry.repo"),
    ("s3", {"endpoint": "", "bucket_name": "b", "region": ""}, "backend.s3.region"),
    ("s3", {"endpoint": "", "bucket_name": "", "region": "r"}, "backend.s3.bucket_name"),
    ("oss", {"endpoint": "", "bucket_name": "b"}, "backend.oss.endpoint"),
    ("oss", {"endpoint": "e:1", "bucket_name": ""}, "backend.oss.bucket_name"),
    ("http-proxy", {"addr": "ftp://x"}, "backend.http-proxy.addr"),
    ("http-proxy", {"addr": "/nonexistent/socket"}, "backend.http-proxy.addr"),
])
def test_remote_backends_reject_incomplete_configs(type_: str, sub: dict[str, Any], field: str) -> None:
    # The config layer already refuses most of these; the backends do not rely on it (they may be
    # built from hand-made sub-configs), so they are checked without pydantic's validation.
    from nydusd import config

    model = {"registry": config.RegistryConfig, "s3": config.S3Config, "oss": config.OssConfig,
             "http-proxy": config.HttpProxyConfig}[type_]
    with pytest.raises(ConfigError) as ei:
        backend_class(type_)(model.model_construct(**sub))  # type: ignore[call-arg]
    assert ei.value.field == field


def test_proxy_url_must_be_http(tmp_path: Path) -> None:
    from nydusd.config import RegistryConfig

    with pytest.raises(ConfigError) as ei:
        backend_class("registry")(RegistryConfig(host="h:1", repo="r", proxy={"url": "socks5://p:1"}))  # type: ignore[call-arg]
    assert ei.value.field == "backend.proxy.url"


# ---------------------------------------------------------------------------- HTTP connection reuse
@pytest.mark.parametrize("unix", [False, True])
def test_http_backends_reuse_connections(tmp_path: Path, unix: bool) -> None:
    from nydusd.config import BackendConfig
    from tests.harness.servers.content_server import ContentServer

    data = os.urandom(2_000_000)
    sock = tmp_path / "c.sock" if unix else None
    server = ContentServer({"blob": data}, prefix="" if unix else "/b", unix_socket=sock)
    try:
        sub = {"addr": str(sock) if sock else server.url, "path": "/b"}
        with create_backend(BackendConfig.model_validate({"type": "http-proxy", "http-proxy": sub})) as b:
            for i in range(40):
                off = i * 40_000
                assert b.read("blob", off, 40_000) == data[off:off + 40_000]
        # keep-alive: one connection carried every request (a regression here costs a TCP
        # handshake, and with TLS a handshake, per chunk)
        assert len(server.paths) == 40 and server.connections == 1
    finally:
        server.stop()


def test_localfs_put_replacing_an_open_blob_serves_the_new_bytes(tmp_path: Path) -> None:
    store = tmp_path / "blobs"
    store.mkdir()
    (store / "b").write_bytes(b"old content")
    backend = LocalFsBackend(LocalFsConfig(dir=str(store)))
    try:
        assert backend.read("b", 0, 3) == b"old"  # opens and keeps a descriptor
        new = tmp_path / "new"
        new.write_bytes(b"NEW CONTENT!")
        backend.put_blob("b", str(new))
        assert backend.blob_size("b") == 12
        assert backend.read("b", 0, 12) == b"NEW CONTENT!"
    finally:
        backend.close()
