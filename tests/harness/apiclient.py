"""A minimal HTTP/1.1 client over the nydusd unix socket (what the snapshotter does with Go net/http)."""

from __future__ import annotations

import http.client
import json
import socket
import urllib.parse
from typing import Any


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 30.0) -> None:
        super().__init__("unix", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.path)
        self.sock = sock


class ApiClient:
    def __init__(self, sock_path: str, timeout: float = 30.0) -> None:
        self.sock_path = sock_path
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None, **query: str) -> tuple[int, Any]:
        if query:
            path += "?" + urllib.parse.urlencode(query)
        conn = _UnixConnection(self.sock_path, self.timeout)
        try:
            payload = None if body is None else json.dumps(body)
            conn.request(method, path, body=payload,
                         headers={"Content-Type": "application/json"} if payload else {})
            resp = conn.getresponse()
            raw = resp.read()
            return resp.status, (json.loads(raw) if raw else None)
        finally:
            conn.close()

    def info(self) -> dict[str, Any]:
        status, body = self.request("GET", "/api/v1/daemon")
        assert status == 200, body
        return body

    def mount(self, mountpoint: str, source: str, config: str) -> tuple[int, Any]:
        return self.request("POST", "/api/v1/mount", {"source": source, "fs_type": "rafs",
                                                      "config": config}, mountpoint=mountpoint)

    def umount(self, mountpoint: str) -> tuple[int, Any]:
        return self.request("DELETE", "/api/v1/mount", mountpoint=mountpoint)
