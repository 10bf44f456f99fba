"""Serving the admin API on a unix socket: uvicorn in a thread, started by the daemon CLI.

Owns: ``start_api_server(daemon, path) -> ApiServer`` (the one entry point nydusd.cli.daemon calls,
after the daemon reached RUNNING, or INIT in upgrade mode; spec interfaces.md §1.6) and ``ApiServer``
(``.stop()``, ``.path``, ``.running``). The socket itself (0600, published without destroying
anything live) is ``api/unixsock.py``'s; ``probe_socket`` and ``bind_unix_socket`` are re-exported.
The daemon may bind it first and hand it over (``sock=``): ``api/early.py`` answers on it while this
module's imports are still running.

- Idle keep-alive connections are never closed by the server (``KEEP_ALIVE_SECONDS`` is ~3 years):
  nydus-snapshotter holds one idle connection per daemon and treats a hang-up as daemon death.

Must not import: fs/storage/rafs internals. Threading contract: the server runs its own asyncio
loop in the thread ``nydusd-api``; routes run in that loop's worker threads. ``stop()`` is called
from any thread except a request handler (use ``stop(wait=False)`` there). uvicorn installs no
signal handlers outside the main thread, so the daemon keeps its own.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import threading
import time
from typing import Any

import h11
import structlog
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from api.app import create_app
from api.deps import DaemonApi
from api.unixsock import bind_unix_socket, probe_socket
from nydusd.errors import NydusError

__all__ = ["ApiServer", "bind_unix_socket", "probe_socket", "start_api_server"]

log = structlog.get_logger(__name__)

KEEP_ALIVE_SECONDS = 10**8


#: largest request line + headers; beyond it the request is answered 414 (line) or 431 (headers)
MAX_REQUEST_HEAD = 64 << 10
#: after such an answer the rest of the request is read and dropped (at most this much, this long)
#: before the connection closes: closing with unread data would reset the connection, and the
#: client would see ECONNRESET instead of the answer
DRAIN_LIMIT = 64 << 20
DRAIN_SECONDS = 2.0


class ApiServer:
    """A running API server; ``stop()`` shuts it down and removes its socket file."""

    def __init__(self, server: uvicorn.Server, thread: threading.Thread, path: str,
                 inode: tuple[int, int]) -> None:
        self._server = server
        self._thread = thread
        self.path = path
        self._inode = inode

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, wait: bool = True, timeout: float = 10.0) -> None:
        """Stop serving: close the listener and idle connections, let in-flight requests finish
        (bounded by ``timeout``), then remove the socket file if it is still ours.

        ``wait=False`` only asks the server to stop (safe from inside a request handler).
        """
        self._server.should_exit = True
        if not wait:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout)
        self._remove_socket()
        log.info("api_server_stopped", path=self.path)

    def _remove_socket(self) -> None:
        # only our own file: a successor may already serve a new socket at the same path
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, except for a request head over ``MAX_REQUEST_HEAD`` bytes: h11
    refuses it, and uvicorn would answer 400 and close at once -- with the rest of a long URL still
    unread, which resets the connection before the client reads anything. Here the answer is 414
    (the request line is incomplete: URI too long) or 431 (headers too large), the write side is
    shut, and what the client still sends is read and dropped (bounded) until it closes."""

    _draining = False
    _drained = 0

    def data_received(self, data: bytes) -> None:
        if self._draining:
            self._drained += len(data)
            if self._drained > DRAIN_LIMIT:
                self.transport.close()
            return
        super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        buffered, _ = self.conn.trailing_data
        if len(buffered) <= MAX_REQUEST_HEAD:
            super().send_400_response(msg)
            return
        line_done = b"\n" in buffered[:MAX_REQUEST_HEAD]
        status = 431 if line_done else 414
        message = ("RequestHeaderFieldsTooLarge" if line_done else "UriTooLong") + (
            f'("request {"headers" if line_done else "line"} longer than {MAX_REQUEST_HEAD} bytes")')
        body = ('{"code":"UNDEFINED","message":' + _json_str(message) + "}").encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close"), (b"server", b"Nydus API")]
        reason = b"Request Header Fields Too Large" if line_done else b"URI Too Long"
        for event in (h11.Response(status_code=status, headers=headers, reason=reason), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        log.info("api_request_refused", status=status, buffered=len(buffered))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._draining = True
        self.loop.call_later(DRAIN_SECONDS, self.transport.close)


def _json_str(text: str) -> str:
    import json

    return json.dumps(text)


def _uvicorn_config(daemon: DaemonApi, **overrides: Any) -> uvicorn.Config:
    options: dict[str, Any] = {
        "lifespan": "off", "ws": "none", "log_config": None, "access_log": False, "server_header": False,
        "http": LimitedH11Protocol, "h11_max_incomplete_event_size": MAX_REQUEST_HEAD,
        "loop": "asyncio", "timeout_keep_alive": KEEP_ALIVE_SECONDS,
        "timeout_graceful_shutdown": 5,
    }
    options.update(overrides)
    return uvicorn.Config(create_app(daemon), **options)


def start_api_server(daemon: DaemonApi, path: str, *, startup_timeout: float = 10.0,
                     sock: socket.socket | None = None, **uvicorn_options: Any) -> ApiServer:
    """Serve the API of ``daemon`` on the unix socket ``path`` in a background thread -- on
    ``sock`` when given (already bound and published at ``path`` by ``bind_unix_socket``).

    Returns once the server accepts requests. Raises AlreadyExists (a live process serves ``path``),
    InvalidArgument (unusable path) or NydusError (the server failed to start).
    """
    if sock is None:
        sock = bind_unix_socket(path)
    st = os.lstat(os.path.abspath(path))
    server = uvicorn.Server(_uvicorn_config(daemon, **uvicorn_options))
    thread = threading.Thread(target=_serve, args=(server, sock), name="nydusd-api", daemon=True)
    thread.start()
    handle = ApiServer(server, thread, os.path.abspath(path), (st.st_dev, st.st_ino))
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            handle.stop(timeout=1.0)
            raise NydusError("the API server failed to start", path=path)
        time.sleep(0.005)
    log.info("api_server_started", path=handle.path, mode=oct(stat.S_IMODE(st.st_mode)))
    return handle


#: the name nydusd.cli.daemon looks up first
start = start_api_server


def _serve(server: uvicorn.Server, sock: socket.socket) -> None:
    try:
        server.run(sockets=[sock])
    except BaseException as e:  # noqa: BLE001 - a thread must report, not die silently
        log.exception("api_server_crashed", error=str(e))
    finally:
        sock.close()
