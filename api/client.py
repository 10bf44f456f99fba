"""A small HTTP client for the admin API over its unix socket (stdlib ``http.client`` only).

Owns: ``UnixHTTPConnection`` and ``ApiClient`` (used by ``nydusctl`` and the tests). Requests go to
host ``unix`` with URL-encoded query values, as nydus-snapshotter sends them (spec §3); one
keep-alive connection is reused for all calls of a client.
Must not import: anything from nydusd but errors (``requests`` is confined to nydusd/oci/client.py).
Thread-safety: one ApiClient per thread (an http.client connection is not thread-safe).
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any
from urllib.parse import urlencode

from nydusd.errors import NydusError


class ApiError(NydusError):
    """The daemon answered with an error status; ``status`` and the body's ``code``/``message``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}", status=status, api_code=code)
        self.status = status
        self.api_code = code
        self.api_message = message

    def __str__(self) -> str:
        return self.message


class UnixHTTPConnection(http.client.HTTPConnection):
    """``HTTPConnection`` whose transport is the unix socket ``path`` (host header ``unix``)."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        super().__init__("unix", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class ApiClient:
    """Calls the API at ``sock``; ``call`` returns the decoded JSON (None for 204) or raises ApiError."""

    def __init__(self, sock: str, timeout: float = 30.0) -> None:
        self.conn = UnixHTTPConnection(sock, timeout)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, body: Any = None,
                query: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """One raw exchange: ``(status, headers (lower-case names), body bytes)``."""
        url = path + ("?" + urlencode(query) if query else "")
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        try:
            self.conn.request(method, url, body=data, headers=headers)
            resp = self.conn.getresponse()
            payload = resp.read()
        except (ConnectionError, http.client.HTTPException):
            self.conn.close()  # the next call reconnects
            raise
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload

    def call(self, method: str, path: str, body: Any = None, query: dict[str, str] | None = None) -> Any:
        status, _, payload = self.request(method, path, body, query)
        if status == 204 or not payload:
            if status >= 400:
                raise ApiError(status, "UNDEFINED", "")
            return None
        decoded = json.loads(payload)
        if status >= 400:
            raise ApiError(status, decoded.get("code", "UNDEFINED"), decoded.get("message", ""))
        return decoded

    # -- the calls nydus-snapshotter and nydusctl make -------------------------------------------
    def info(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", "/api/v1/daemon")
        return result

    def mount(self, mountpoint: str, source: str, config: str, fs_type: str = "rafs",
              prefetch_files: list[str] | None = None) -> None:
        body: dict[str, Any] = {"source": source, "fs_type": fs_type, "config": config}
        if prefetch_files is not None:
            body["prefetch_files"] = prefetch_files
        self.call("POST", "/api/v1/mount", body, {"mountpoint": mountpoint})

    def remount(self, mountpoint: str, source: str, config: str, fs_type: str = "rafs") -> None:
        body = {"source": source, "fs_type": fs_type, "config": config}
        self.call("PUT", "/api/v1/mount", body, {"mountpoint": mountpoint})

    def umount(self, mountpoint: str) -> None:
        self.call("DELETE", "/api/v1/mount", query={"mountpoint": mountpoint})

    def metrics(self, kind: str = "", id: str | None = None) -> Any:
        """``kind``: "" (fs), "files", "pattern", "backend", "blobcache" or "inflight"."""
        path = "/api/v1/metrics" + (f"/{kind}" if kind else "")
        return self.call("GET", path, query={"id": id} if id is not None else None)
