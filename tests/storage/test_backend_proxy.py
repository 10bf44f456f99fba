"""Dragonfly proxy behaviour of remote backends (spec §2.4).

tinyproxy stands in for the peer and is killed and restarted mid-test: with ``fallback`` reads
never fail and go back through the proxy once a health check sees it again (observed in
tinyproxy's own request log); without ``fallback`` reads fail with a clear error while it is
down. A small recording peer checks the ``X-Dragonfly-*`` headers, ``use_http`` and the
``X-Dragonfly-Error-Type: proxy`` answers.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from nydusd.config import BackendConfig
from nydusd.errors import BackendError
from nydusd.storage.backend import BlobBackend, create_backend
from nydusd.storage.backend.proxy import DragonflyProxy
from tests.harness.servers.base import QuietHandler, ThreadedServer
from tests.harness.servers.registry import RegistryServer
from tests.harness.servers.tinyproxy import TinyProxy

DATA = os.urandom(400_000)


def _wait_healthy(proxy: DragonflyProxy, timeout: float = 6.0) -> None:
    deadline = time.monotonic() + timeout
    while not proxy.healthy:
        assert time.monotonic() < deadline, "proxy never marked healthy again"
        time.sleep(0.05)


def _registry_backend(reg: RegistryServer, repo: str, proxy: dict[str, Any], **extra: Any) -> BlobBackend:
    sub = reg.backend_config(repo, proxy=proxy, retry_limit=0, **extra)
    return create_backend(BackendConfig.model_validate({"type": "registry", "registry": sub}))


def _proxy_of(b: BlobBackend) -> DragonflyProxy:
    p = getattr(b, "proxy", None)
    assert isinstance(p, DragonflyProxy)
    return p


def test_proxy_killed_and_restarted_with_fallback(registry_htpasswd: RegistryServer, tinyproxy: TinyProxy,
                                                  logs: Any) -> None:
    blob = registry_htpasswd.push_blob("proxy/fallback", DATA)
    b = _registry_backend(registry_htpasswd, "proxy/fallback", {"url": tinyproxy.url, "check_interval": 1})
    try:
        assert b.read(blob, 0, 1000) == DATA[:1000]
        through_proxy = tinyproxy.requests_seen(blob)
        assert through_proxy >= 1
        # (the kill is inside the block: the health checker may be the one that notices)
        with logs.expect("proxy_marked_down"):
            tinyproxy.kill()
            for off in range(0, 300_000, 30_000):
                assert b.read(blob, off, 20_000) == DATA[off:off + 20_000]
        proxy = _proxy_of(b)
        assert not proxy.healthy and proxy.metrics()["direct_requests"] >= 1
        tinyproxy.restart()
        _wait_healthy(proxy)
        assert b.read(blob, 1234, 5678) == DATA[1234:6912]
        # the switch back is visible in tinyproxy's log
        assert tinyproxy.requests_seen(blob) > through_proxy
        assert proxy.metrics()["recovered"] == 1
        assert b.metrics()["read_errors"] == 0
    finally:
        b.close()


def test_proxy_down_without_fallback_fails_clearly(registry_htpasswd: RegistryServer, tinyproxy: TinyProxy,
                                                   logs: Any) -> None:
    blob = registry_htpasswd.push_blob("proxy/nofallback", DATA)
    b = _registry_backend(registry_htpasswd, "proxy/nofallback",
                          {"url": tinyproxy.url, "check_interval": 1, "fallback": False})
    try:
        assert b.read(blob, 0, 10) == DATA[:10]
        with logs.expect("proxy_marked_down"), logs.expect("backend_retries_exhausted"):
            tinyproxy.kill()
            with pytest.raises(BackendError, match="fallback is disabled") as ei:
                b.read(blob, 100, 10)
        assert ei.value.blob_id == blob and tinyproxy.url in str(ei.value)
        tinyproxy.restart()
        _wait_healthy(_proxy_of(b))
        assert b.read(blob, 100, 10) == DATA[100:110]
    finally:
        b.close()


@pytest.mark.parametrize("kind", ["s3", "oss"])
def test_object_storage_through_proxy_with_fallback(kind: str, request: pytest.FixtureRequest,
                                                    tinyproxy: TinyProxy, logs: Any) -> None:
    server = request.getfixturevalue("moto_s3" if kind == "s3" else "oss_server")
    if kind == "s3":
        server.create_bucket("proxied")
    server.put_object("proxied", "p/blob1", DATA)
    sub = server.backend_config("proxied", "p/", proxy={"url": tinyproxy.url, "check_interval": 1})
    b = create_backend(BackendConfig.model_validate({"type": kind, kind: sub}))
    try:
        assert b.read("blob1", 10, 1000) == DATA[10:1010]
        seen = tinyproxy.requests_seen("blob1")
        assert seen >= 1
        with logs.expect("proxy_marked_down"):
            tinyproxy.kill()
            assert b.read("blob1", 2000, 1000) == DATA[2000:3000]
        tinyproxy.restart()
        _wait_healthy(_proxy_of(b))
        assert b.read("blob1", 0, 1) == DATA[:1]
        assert tinyproxy.requests_seen("blob1") > seen
        if kind == "oss":  # the peer headers reach the origin through tinyproxy, signature intact
            gets = [h for m, _, key, h in server.requests if m == "GET" and key == "p/blob1"]
            assert gets[-1]["X-Dragonfly-Priority"] == "6"
            assert "X-Dragonfly-Priority" not in gets[-2]  # the fallback read went direct
    finally:
        b.close()


# ------------------------------------------------------------------------------ recording peer
class _PeerHandler(QuietHandler):
    def do_GET(self) -> None:  # noqa: N802
        self._serve(False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(True)

    def _serve(self, head: bool) -> None:
        peer: Peer = self.server.owner  # type: ignore[attr-defined]
        if self.path == "/server/ping":
            self.send_body(peer.ping_status, b"pong", head=head)
            return
        with peer.lock:
            peer.seen.append((self.command, self.path, dict(self.headers.items())))
        if peer.error_status:
            self.send_body(peer.error_status, b"peer failure", {"X-Dragonfly-Error-Type": "proxy"}, head=head)
            return
        if head:
            self.send_body(200, DATA, head=True)
            return
        a, _, b = self.headers["Range"][6:].partition("-")
        start, end = int(a), min(int(b), len(DATA) - 1)
        self.send_body(206, DATA[start:end + 1], {"Content-Range": f"bytes {start}-{end}/{len(DATA)}"})


class Peer(ThreadedServer):
    """A Dragonfly-peer stand-in that serves DATA for any blob URL and records requests."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self.lock = threading.Lock()
        self.error_status = 0
        self.ping_status = 200
        super().__init__(_PeerHandler)


@pytest.fixture
def peer() -> Iterator[Peer]:
    p = Peer()
    try:
        yield p
    finally:
        p.stop()


def test_dragonfly_headers_and_use_http(peer: Peer) -> None:
    sub = {"scheme": "https", "host": "registry.example.invalid", "repo": "lib/x",
           "proxy": {"url": peer.url, "use_http": True, "check_interval": 60}}
    b = create_backend(BackendConfig.model_validate({"type": "registry", "registry": sub}))
    try:
        assert b.read("ab" * 32, 5, 100) == DATA[5:105]
        assert b.read("ab" * 32, 0, 10, prefetch=True) == DATA[:10]
    finally:
        b.close()
    gets = [s for s in peer.seen if s[0] == "GET"]
    (_, path1, h1), (_, _, h2) = gets
    # use_http: the peer is asked for plain http so that it can see (and share) the bytes
    assert path1 == f"http://registry.example.invalid/v2/lib/x/blobs/sha256:{'ab' * 32}"
    assert h1["X-Dragonfly-Priority"] == "6" and h1["X-Dragonfly-Prefetch"] == "false"
    assert h2["X-Dragonfly-Priority"] == "3" and h2["X-Dragonfly-Prefetch"] == "true"
    assert h1["X-Dragonfly-Use-P2P"] == "true"


def test_proxy_error_answers(peer: Peer, registry_server: RegistryServer, logs: Any) -> None:
    blob = registry_server.push_blob("proxy/errtype", DATA)
    b = _registry_backend(registry_server, "proxy/errtype", {"url": peer.url, "check_interval": 60})
    try:
        peer.error_status = 500  # peer-side failure: fall back to the origin
        with logs.expect("proxy_marked_down"):
            assert b.read(blob, 7, 70) == DATA[7:77]
        _proxy_of(b).check_now()  # the peer's port answers: healthy again
        peer.error_status = 403  # the peer forbids it: fail at once, no origin
        with pytest.raises(BackendError, match="HTTP 403"):
            b.read(blob, 0, 10)
    finally:
        b.close()


def test_ping_url_health_check(peer: Peer, logs: Any) -> None:
    cfg = BackendConfig.model_validate({"type": "registry", "registry": {
        "host": "h.invalid", "repo": "r", "proxy": {"url": peer.url, "ping_url": f"{peer.url}/server/ping",
                                                    "check_interval": 60}}})
    b = create_backend(cfg)
    try:
        proxy = _proxy_of(b)
        assert proxy.check_now() and proxy.current() == peer.url
        peer.ping_status = 503
        with logs.expect("proxy_marked_down"):
            assert not proxy.check_now()
        assert proxy.current() is None  # fallback: go direct
        peer.ping_status = 200
        with logs.expect("proxy_recovered"):
            assert proxy.check_now()
    finally:
        b.close()


def test_health_checks_pause_when_idle(peer: Peer, logs: Any) -> None:
    from nydusd.config import ProxyConfig

    proxy = DragonflyProxy(ProxyConfig(url=peer.url, check_pause_elapsed=300), start_checker=False)
    try:
        assert proxy.check_due()  # recently used (constructed): checked
        proxy._last_used -= 301
        assert not proxy.check_due()  # idle and healthy: paused
        with logs.expect("proxy_marked_down"):
            proxy.report_failure("boom")
        assert proxy.check_due() and proxy.healthy  # a down proxy is checked even when idle
        assert proxy.current() == peer.url  # using it resets the idle clock
        assert proxy.check_due()
    finally:
        proxy.close()
