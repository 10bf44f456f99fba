"""A plain blob HTTP server like the snapshotter's content-store proxy (``http-proxy`` backend).

Serves ``GET``/``HEAD <prefix>/<blob_id>`` from a dict (each GET optionally stalled ``delay`` s),
over TCP on 127.0.0.1 or over a unix socket. Ranges are strict: ``bytes=a-b``/``bytes=a-`` give
206 with ``Content-Range`` (the end clamped to the blob), a start past the end gives 416, no Range
gives 200 with the whole blob.
"""

from __future__ import annotations

import contextlib
import os
import socketserver
import threading
import time
from pathlib import Path

from tests.harness.servers.base import QuietHandler


class _ContentHandler(QuietHandler):
    def address_string(self) -> str:  # unix sockets have no peer address
        return "local"

    def setup(self) -> None:
        super().setup()
        srv: ContentServer = self.server.owner  # type: ignore[attr-defined]
        with srv.lock:
            srv.connections += 1

    def do_GET(self) -> None:  # noqa: N802
        self._serve(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(head=True)

    def _serve(self, head: bool) -> None:
        srv: ContentServer = self.server.owner  # type: ignore[attr-defined]
        path = self.path.split("?")[0]
        with srv.lock:
            srv.paths.append(path)
            srv.active += 1
        try:
            if srv.delay and not head:
                time.sleep(srv.delay)
            self._answer(srv, path, head)
        finally:
            with srv.lock:
                srv.active -= 1

    def _answer(self, srv: ContentServer, path: str, head: bool) -> None:
        prefix, _, blob_id = path.rpartition("/")
        data = srv.blobs.get(blob_id) if prefix == srv.prefix else None
        if data is None:
            self.send_body(404, b"not found", head=head)
            return
        rng = self.headers.get("Range")
        if not rng:
            self.send_body(200, data, head=head)
            return
        a, _, b = rng.removeprefix("bytes=").partition("-")
        start = int(a)
        if start >= len(data):
            self.send_body(416, b"", {"Content-Range": f"bytes */{len(data)}"}, head=head)
            return
        end = min(int(b) if b else len(data) - 1, len(data) - 1)
        self.send_body(206, data[start:end + 1], {"Content-Range": f"bytes {start}-{end}/{len(data)}"},
                       head=head)


class _TcpServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: object = None


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    owner: object = None


class ContentServer:
    """Blob server; ``url`` (TCP) or ``socket_path`` (unix) says where it listens."""

    def __init__(self, blobs: dict[str, bytes], *, prefix: str = "/blobs",
                 unix_socket: Path | None = None) -> None:
        self.blobs = blobs
        self.prefix = prefix.rstrip("/")
        self.paths: list[str] = []
        self.connections = 0  # TCP/unix connections accepted (keep-alive reuse shows as few)
        self.delay = 0.0  # seconds each GET stalls before its answer (requests "in flight")
        self.active = 0  # requests being answered right now
        self.lock = threading.Lock()
        self.socket_path = str(unix_socket) if unix_socket else None
        server: socketserver.BaseServer
        if self.socket_path:
            server = _UnixServer(self.socket_path, _ContentHandler)
        else:
            server = _TcpServer(("127.0.0.1", 0), _ContentHandler)
        server.owner = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name="test-content-server")
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address  # type: ignore[misc]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        if self.socket_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
