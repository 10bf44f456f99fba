"""The admin API before the API stack is imported: ``EarlyApi`` answers ``GET /api/v1/daemon`` on the
daemon's socket from the moment the daemon is RUNNING, and passes everything else to the full
server (``api/server.py``) as soon as that runs.

Why: importing FastAPI, uvicorn and pydantic's schema machinery is most of a daemon's start-up
(0.7-1.1 s on a small machine; the daemon's own imports and the mount take about as long again).
nydus-snapshotter, after spawning a dedicated daemon, waits for the socket file and then polls
``GET /api/v1/daemon`` until the state is ``RUNNING``; that poll alone stands between the mount and
the container's start. Answering it needs the daemon's ``info()`` and 40 lines of HTTP, nothing of
the API stack -- so the socket appears when the daemon is RUNNING (the order the snapshotter
relies on is kept), and the stack is imported after that, while the container already runs.

How:
- ``start()`` binds the socket with ``api/unixsock.py``'s rules (0600, nothing live replaced) and
  accepts on a thread ``nydusd-api-early``, one thread per connection.
- A connection's requests are answered here only while the full server is not up, and only the one
  exact case: ``GET /api/v1/daemon`` without a body (HTTP/1.x, keep-alive honoured), with the same
  JSON (compact, the daemon's dict as is) and headers as the full server's route.
- Anything else -- another route, a body, a malformed or oversized head, or any request once the
  full server runs -- turns the connection into a byte pipe to the full server (a connection of
  its own to the same socket), the bytes already read first. It waits for the full server to run;
  if the full server can never run (its import failed), it answers 503 and closes.
- ``hand_over(start)`` lets ``start(sock)`` serve the same listening socket, accepting alongside
  until it runs (no moment in which nobody answers), then stops accepting and releases the
  waiting pipes (they connect only then, so they always reach the full server).
- A connection is never closed by this side while the daemon lives (the snapshotter treats a
  hang-up of its idle connection as the daemon's death).

Must not import: the API stack (fastapi, uvicorn, pydantic), fs/storage/rafs internals.
Thread-safety: ``start``/``hand_over``/``fail``/``close`` are called by the daemon's start-up
code; everything else runs on this module's own threads.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from api.unixsock import bind_unix_socket

log = structlog.get_logger(__name__)

#: the one request answered here (no query string: the full server answers anything unusual)
DAEMON_INFO = b"/api/v1/daemon"
#: a request head longer than this is the full server's to refuse (414/431), not ours to parse
MAX_HEAD = 64 << 10
RECV_SIZE = 64 << 10


class EarlyApi:
    """The socket's first server; see the module docstring."""

    def __init__(self, info: Callable[[], dict[str, Any]], path: str) -> None:
        self.path = os.path.abspath(path)
        self._info = info
        self.sock: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._acceptor: threading.Thread | None = None
        self._full = threading.Event()  # set: the full server runs, or never will (``_failed``)
        self._failed = False
        self._handed_over = False
        #: set when a request needs the full server (it waits in a pipe until it runs)
        self.wanted = threading.Event()
        self._closed = False
        #: requests answered here (the rest were piped to the full server)
        self.answered = 0

    def start(self) -> socket.socket:
        """Bind and publish the socket, start accepting. Raises what ``bind_unix_socket`` raises."""
        self.sock = bind_unix_socket(self.path)
        st = os.lstat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        self._start_accepting()
        return self.sock

    def _start_accepting(self) -> None:
        self._acceptor = threading.Thread(target=self._accept_loop, name="nydusd-api-early",
                                          daemon=True)
        self._acceptor.start()

    def hand_over(self, start: Callable[[socket.socket], Any]) -> Any:
        """Call ``start(sock)`` (the full server, from then on serving this socket too), then stop
        accepting and return what ``start`` returned. If it raises, this server goes on: the daemon
        info stays answered, every other request gets 503."""
        assert self.sock is not None
        try:
            # both accept until the full server runs (whoever accepts a connection serves it):
            # there is no moment in which nobody answers the state poll
            result = start(self.sock)
        except BaseException:
            self.fail()  # this server keeps accepting: the daemon info stays answered, the rest 503
            raise
        self._stop_accepting()
        self._handed_over = True
        self._full.set()
        log.info("api_handed_over", path=self.path, answered_early=self.answered)
        return result

    def fail(self) -> None:
        """The full server will never run: requests other than the daemon info get 503."""
        self._failed = True
        self._full.set()

    def close(self) -> None:
        """Stop serving (when no full server took over): close the listener, remove the socket
        file if it is still ours (a successor may serve a new one at the same path)."""
        if self._closed:
            return
        self._closed = True
        self._stop_accepting()
        if self.sock is not None and not self._handed_over:
            self.sock.close()
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self._inode:
                    os.unlink(self.path)
        self.fail()  # wake the waiting pipes: they answer 503

    # -- accepting ---------------------------------------------------------------------------------

    def _stop_accepting(self) -> None:
        if self._acceptor is not None and self._acceptor.is_alive():
            os.write(self._stop_w, b"x")
            self._acceptor.join()

    def _accept_loop(self) -> None:
        assert self.sock is not None
        self.sock.setblocking(False)
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            if any(fd == self._stop_r for fd, _ in poller.poll()):
                return
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                continue
            except OSError as e:
                log.warning("api_early_accept_failed", error=str(e))
                return
            conn.setblocking(True)
            threading.Thread(target=self._connection, args=(conn,), name="nydusd-api-early-conn",
                             daemon=True).start()

    # -- one connection ----------------------------------------------------------------------------

    def _connection(self, conn: socket.socket) -> None:
        try:
            self._serve(conn)
        except OSError:
            pass  # the client went away
        except Exception as e:  # noqa: BLE001 - a connection thread must report, not die silently
            log.exception("api_early_connection_failed", error=str(e))
        finally:
            conn.close()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0 and len(buf) <= MAX_HEAD:
                data = conn.recv(RECV_SIZE)
                if not data:
                    return
                buf += data
                continue
            keep_alive = None if self._handed_over or end < 0 else _simple_daemon_get(buf[:end])
            if keep_alive is None:
                self._pipe(conn, buf)
                return
            started = time.perf_counter()
            try:
                payload = self._info()
            except Exception:  # noqa: BLE001 - the full server answers it, with its error mapping
                self._pipe(conn, buf)
                return
            self.answered += 1  # before the answer: who reads it may count at once
            conn.sendall(_response(200, json.dumps(payload, separators=(",", ":"),
                                                   ensure_ascii=False).encode(), keep_alive))
            log.info("api_request_handled", method="GET", path=DAEMON_INFO.decode(), query="",
                     status=200, ms=round((time.perf_counter() - started) * 1000, 2), early=True)
            buf = buf[end + 4:]
            if not keep_alive:
                conn.shutdown(socket.SHUT_WR)
                return

    def _pipe(self, conn: socket.socket, pending: bytes) -> None:
        """Hand the connection to the full server: bytes both ways until both sides are done."""
        self.wanted.set()
        self._full.wait()
        if self._failed:
            body = b'{"code":"NotReady","message":"the API server is not available"}'
            conn.sendall(_response(503, body, keep_alive=False))
            conn.shutdown(socket.SHUT_WR)
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as up:
            up.connect(self.path)
            up.sendall(pending)
            back = threading.Thread(target=_copy, args=(up, conn), name="nydusd-api-early-pipe",
                                    daemon=True)
            back.start()
            _copy(conn, up)
            back.join()


def _copy(src: socket.socket, dst: socket.socket) -> None:
    """Bytes from ``src`` to ``dst`` until ``src`` ends; then end ``dst``'s write side."""
    with contextlib.suppress(OSError):
        while data := src.recv(RECV_SIZE):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def _simple_daemon_get(head: bytes) -> bool | None:
    """For the one request answered early (``GET /api/v1/daemon``, HTTP/1.x, no body): whether the
    connection stays open after it; None for anything else."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"GET" or parts[1] != DAEMON_INFO:
        return None
    if parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        return None
    keep_alive = parts[2] == b"HTTP/1.1"
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or name != name.strip():
            return None  # malformed: the full server's to answer
        name, value = name.lower(), value.strip().lower()
        if name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
            return None
        if name == b"connection":
            tokens = {t.strip() for t in value.split(b",")}
            keep_alive = b"close" not in tokens and (keep_alive or b"keep-alive" in tokens)
    return keep_alive


_REASONS = {200: b"OK", 503: b"Service Unavailable"}


def _response(status: int, body: bytes, keep_alive: bool) -> bytes:
    """The full server's response form: JSON, ``Server: Nydus API``, a date."""
    head = [b"HTTP/1.1 %d %s" % (status, _REASONS[status]),
            b"date: " + email.utils.formatdate(usegmt=True).encode(),
            b"content-length: %d" % len(body),
            b"content-type: application/json",
            b"server: Nydus API"]
    if not keep_alive:
        head.append(b"connection: close")
    return b"\r\n".join(head) + b"\r\n\r\n" + body
