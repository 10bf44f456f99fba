"""The Dragonfly (P2P) proxy in front of a remote backend: routing, health and fallback (spec §2.4).

Owns: ``DragonflyProxy``, built from a backend's ``proxy`` config. It satisfies
``nydusd.http.ProxyRoute``: the HTTP layer asks ``current()`` before each request and
reports transport failures. A health-checker thread polls the proxy every ``check_interval``
seconds (``ping_url`` with GET, else a TCP connect to the proxy's address) and marks it up or down:

- proxy up: requests go through it, with ``X-Dragonfly-*`` headers (priority 3 prefetch / 6
  on-demand, ``X-Dragonfly-Use-P2P: true``, ``X-Dragonfly-Prefetch``); ``use_http`` asks the proxy
  for ``http://`` URLs so that it can see (and cache) the traffic instead of tunnelling TLS;
- proxy down + ``fallback``: requests go straight to the origin until a health check succeeds,
  then return to the proxy;
- proxy down without ``fallback``: reads fail with a BackendError naming the proxy.

Health checks pause after ``check_pause_elapsed`` seconds without requests.

Must not import cache, rafs, fs; ``requests`` stays in ``nydusd/http.py`` (the ping uses its
``HttpClient``).

Threading: one daemon thread per proxy (stopped by ``close()``); ``healthy`` is a single attribute
swapped under a lock; counters are guarded by the same lock.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from nydusd.config import ProxyConfig, RemoteConfig
from nydusd.errors import BackendError, ConfigError, redact_credentials
from nydusd.http import HttpClient
from nydusd.log import get_logger

log = get_logger(__name__)

T = TypeVar("T")
PING_TIMEOUT = 2.0


class DragonflyProxy:
    """Route requests through a Dragonfly peer while it is healthy."""

    def __init__(self, cfg: ProxyConfig, *, start_checker: bool = True) -> None:
        self.url: str = cfg.url
        #: the URL as logs, errors and metrics show it (credentials masked)
        self.public_url = redact_credentials(self.url)
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"proxy url must be http(s)://host:port, got {self.public_url!r}",
                              field="backend.proxy.url")
        self._addr = (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        self.ping_url: str = cfg.ping_url or ""
        self.fallback: bool = bool(cfg.fallback)
        self.use_http: bool = bool(cfg.use_http)
        self.check_interval = max(0.05, float(cfg.check_interval or 5))
        self.check_pause_elapsed = float(cfg.check_pause_elapsed or 0)
        self._lock = threading.Lock()
        self._healthy = True
        self._last_used = time.monotonic()
        self.proxied_requests = 0
        self.direct_requests = 0
        self.marked_down = 0
        self.recovered = 0
        self._pinger = HttpClient(timeout=PING_TIMEOUT, connect_timeout=PING_TIMEOUT, pool_size=2)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if start_checker:
            self._thread = threading.Thread(target=self._check_loop, name="nydus-proxy-health",
                                            daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ ProxyRoute
    @property
    def healthy(self) -> bool:
        return self._healthy

    def current(self) -> str | None:
        """The proxy URL while healthy; None (go direct) while down with fallback.
        Raises BackendError while down without fallback."""
        with self._lock:
            self._last_used = time.monotonic()
            if self._healthy:
                self.proxied_requests += 1
                return self.url
            if self.fallback:
                self.direct_requests += 1
                return None
        raise BackendError(f"proxy {self.public_url} is unhealthy and proxy fallback is disabled",
                           transient=True, proxy=self.public_url)

    def rewrite(self, url: str) -> str:
        if self.use_http and url.startswith("https://"):
            return "http://" + url[len("https://"):]
        return url

    def headers(self, prefetch: bool) -> dict[str, str]:
        return {"X-Dragonfly-Priority": "3" if prefetch else "6",
                "X-Dragonfly-Use-P2P": "true",
                "X-Dragonfly-Prefetch": "true" if prefetch else "false"}

    def report_failure(self, cause: str) -> None:
        """A proxied request failed: mark the proxy down until a health check succeeds."""
        with self._lock:
            was = self._healthy
            self._healthy = False
            if was:
                self.marked_down += 1
        if was:
            log.warning("proxy_marked_down", proxy=self.public_url, cause=cause, fallback=self.fallback)

    # ------------------------------------------------------------------ health checks
    def check_now(self) -> bool:
        """Run one health check and update the state; returns the proxy's health."""
        ok = self._ping()
        with self._lock:
            was = self._healthy
            self._healthy = ok
            if ok and not was:
                self.recovered += 1
            if was and not ok:
                self.marked_down += 1
        if ok and not was:
            log.info("proxy_recovered", proxy=self.public_url)
        elif was and not ok:
            log.warning("proxy_marked_down", proxy=self.public_url, cause="health check failed",
                        fallback=self.fallback)
        return ok

    def _ping(self) -> bool:
        if self.ping_url:
            try:
                resp = self._pinger.request("GET", self.ping_url, use_proxy=False)
            except BackendError:
                return False
            return resp.status < 500
        try:
            with socket.create_connection(self._addr, timeout=PING_TIMEOUT):
                return True
        except OSError:
            return False

    def check_due(self) -> bool:
        """One tick of the health checker: check unless paused; returns whether it checked.
        Checks pause after ``check_pause_elapsed`` seconds without requests while the proxy is
        healthy (nobody reads: do not keep poking the peer); a down proxy is always checked."""
        with self._lock:
            idle = time.monotonic() - self._last_used
            paused = bool(self.check_pause_elapsed) and idle > self.check_pause_elapsed and self._healthy
        if paused:
            return False
        self.check_now()
        return True

    def _check_loop(self) -> None:
        while not self._stop.wait(self.check_interval):
            self.check_due()

    def call(self, proxied: Callable[[], T], direct: Callable[[], T], *,
             is_proxy_failure: Callable[[BaseException], bool]) -> T:
        """For transports that do not go through ``HttpClient`` (oss2): run ``proxied`` while the
        proxy is up, ``direct`` otherwise; a proxy failure falls back to ``direct`` when allowed."""
        purl = self.current()
        if purl is None:
            return direct()
        shown = self.public_url
        try:
            return proxied()
        except Exception as exc:
            if not is_proxy_failure(exc):
                raise
            self.report_failure(str(exc))
            if not self.fallback:
                raise BackendError(f"request through proxy {shown} failed and proxy fallback is "
                                   f"disabled: {exc}", transient=True, proxy=shown) from exc
            log.info("proxy_request_fell_back", proxy=shown, cause=str(exc))
            return direct()

    def metrics(self) -> dict[str, Any]:
        with self._lock:
            return {"url": self.public_url, "healthy": self._healthy, "fallback": self.fallback,
                    "proxied_requests": self.proxied_requests, "direct_requests": self.direct_requests,
                    "marked_down": self.marked_down, "recovered": self.recovered}

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=PING_TIMEOUT * 2)
            self._thread = None
        self._pinger.close()


def proxy_from_config(cfg: RemoteConfig) -> DragonflyProxy | None:
    """A DragonflyProxy when the backend config has ``proxy.url`` set, else None."""
    if not cfg.proxy.url:
        return None
    return DragonflyProxy(cfg.proxy)
