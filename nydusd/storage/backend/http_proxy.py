"""The ``http-proxy`` backend (v2 only): blobs served by a plain HTTP endpoint, e.g. the
snapshotter's content-store proxy that ``nydus-image unpack`` reads over a unix socket.

Owns: ``HttpProxyBackend``. ``addr`` is ``http://…``, ``https://…`` or the absolute path of an
existing unix socket; blob ``<id>`` is ``<addr><path>/<id>`` (``path`` is ignored for unix sockets,
which get ``http://localhost/<id>``). Size via ``HEAD`` (Content-Length), data via ``GET`` with
``Range`` (206). Optional Dragonfly ``proxy`` like the other remote backends.

Must not import ``requests`` (the oci HTTP layer sends), cache, rafs or fs.

Threading: thread-safe; the HTTP client pools connections.
"""

from __future__ import annotations

import os
import stat
from typing import ClassVar
from urllib.parse import quote

from nydusd.config import HttpProxyConfig
from nydusd.errors import BackendError, BlobNotFound, ConfigError
from nydusd.http import HttpClient, Response, status_error
from nydusd.storage.backend.base import BlobBackend, RetryPolicy
from nydusd.storage.backend.proxy import DragonflyProxy, proxy_from_config


class HttpProxyBackend(BlobBackend):
    """Read blobs from ``<addr><path>/<blob_id>`` with ranged GETs."""

    type: ClassVar[str] = "http-proxy"

    def __init__(self, cfg: HttpProxyConfig, retry: RetryPolicy | None = None) -> None:
        addr: str = cfg.addr
        unix_socket: str | None = None
        if addr.startswith(("http://", "https://")):
            self.base_url = addr.rstrip("/") + "/" + (cfg.path or "").strip("/")
        elif addr.startswith("/"):
            try:
                is_socket = stat.S_ISSOCK(os.stat(addr).st_mode)
            except OSError:
                is_socket = False
            if not is_socket:
                raise ConfigError(f"http-proxy addr {addr!r} is not an existing unix socket",
                                  field="backend.http-proxy.addr")
            unix_socket = addr
            self.base_url = "http://localhost/"
        else:
            raise ConfigError("http-proxy addr must be http://, https:// or an absolute unix socket path",
                              field="backend.http-proxy.addr")
        super().__init__(retry or RetryPolicy.from_config(cfg))
        self.base_url = self.base_url.rstrip("/")
        self.proxy: DragonflyProxy | None = None if unix_socket else proxy_from_config(cfg)
        self.http = HttpClient(skip_verify=cfg.skip_verify, ca_cert_files=cfg.ca_cert_files,
                               timeout=cfg.timeout, connect_timeout=cfg.connect_timeout,
                               proxy=self.proxy, unix_socket=unix_socket)

    def blob_url(self, blob_id: str) -> str:
        return f"{self.base_url}/{quote(blob_id, safe='')}"

    def try_blob_size(self, blob_id: str) -> int:
        resp = self.http.request("HEAD", self.blob_url(blob_id))
        if resp.status == 200 and resp.headers.get("Content-Length") is not None:
            return int(resp.headers["Content-Length"])
        raise self._error(resp, "HEAD", blob_id)

    def try_read(self, blob_id: str, offset: int, size: int, *, prefetch: bool = False) -> bytes:
        resp = self.http.request("GET", self.blob_url(blob_id), prefetch=prefetch,
                                 headers={"Range": f"bytes={offset}-{offset + size - 1}"})
        if resp.status == 206:
            return resp.content
        if resp.status == 200:
            return resp.content[offset:offset + size]
        if resp.status == 416:
            return b""
        raise self._error(resp, "GET", blob_id)

    def _error(self, resp: Response, op: str, blob_id: str) -> BackendError:
        if resp.status == 404:
            return BlobNotFound(f"http-proxy {op} {self.blob_url(blob_id)}: HTTP 404", status=404)
        return status_error(resp, f"http-proxy {op} {self.blob_url(blob_id)}")

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
        self.http.close()
        super().close()
