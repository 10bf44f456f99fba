"""``api/early.py``: the daemon-info answer on the API socket before the API stack is imported, and
the hand-over of the socket -- and of every connection it accepted -- to the real uvicorn server."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.early import EarlyApi
from api.server import ApiServer, start_api_server
from tests.harness.fakes.daemon import FakeDaemon


class Conn:
    """A raw HTTP/1.1 client on one unix connection (keep-alive, requests in order)."""

    def __init__(self, path: Path) -> None:
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(15)
        self.s.connect(str(path))
        self.buf = b""

    def send(self, method: str, target: str, body: bytes = b"", extra: str = "") -> None:
        head = f"{method} {target} HTTP/1.1\r\nHost: unix\r\n{extra}"
        if body:
            head += f"Content-Length: {len(body)}\r\n"
        self.s.sendall(head.encode() + b"\r\n" + body)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            data = self.s.recv(65536)
            assert data, "connection closed before a response"
            self.buf += data
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(self.buf) < length:
            data = self.s.recv(65536)
            assert data
            self.buf += data
        body, self.buf = self.buf[:length], self.buf[length:]
        return int(lines[0].split()[1]), headers, body

    def closed_by_peer(self, timeout: float) -> bool:
        self.s.settimeout(timeout)
        try:
            return self.s.recv(1) == b""
        except TimeoutError:
            return False
        finally:
            self.s.settimeout(15)

    def close(self) -> None:
        self.s.close()


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "api.sock"


@pytest.fixture
def early(sock_path: Path) -> Iterator[tuple[EarlyApi, FakeDaemon]]:
    daemon = FakeDaemon()
    e = EarlyApi(daemon.info, str(sock_path))
    e.start()
    yield e, daemon
    e.close()


def hand_over(e: EarlyApi, daemon: FakeDaemon, sock_path: Path) -> ApiServer:
    server: ApiServer = e.hand_over(lambda s: start_api_server(daemon, str(sock_path), sock=s))
    return server


def test_daemon_info_is_answered_early_on_a_private_socket_with_keep_alive(
        early: tuple[EarlyApi, FakeDaemon], sock_path: Path) -> None:
    e, daemon = early
    assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    assert stat.S_IMODE(os.lstat(sock_path).st_mode) == 0o600
    c = Conn(sock_path)
    try:
        for _ in range(3):  # one connection, several requests: the snapshotter's client keeps it
            c.send("GET", "/api/v1/daemon")
            status, headers, body = c.response()
            assert status == 200
            assert headers["content-type"] == "application/json" and headers["server"] == "Nydus API"
            assert json.loads(body) == daemon.info()
        assert e.answered == 3
        c.send("GET", "/api/v1/daemon", extra="Connection: close\r\n")
        assert c.response()[0] == 200
        assert c.closed_by_peer(5)
    finally:
        c.close()


def test_other_requests_wait_for_the_full_server_and_get_its_answers(
        early: tuple[EarlyApi, FakeDaemon], sock_path: Path) -> None:
    e, daemon = early
    c = Conn(sock_path)
    idle = Conn(sock_path)  # the snapshotter's liveness connection: never a request, never closed
    got: list[tuple[int, dict[str, str], bytes]] = []
    try:
        c.send("GET", "/api/v1/daemon")
        assert c.response()[0] == 200
        c.send("GET", "/api/v1/daemon/events")  # not ours to answer: waits
        t = threading.Thread(target=lambda: got.append(c.response()))
        t.start()
        time.sleep(0.3)
        assert got == [] and t.is_alive()
        server = hand_over(e, daemon, sock_path)
        try:
            t.join(15)
            status, _, body = got[0]
            assert status == 200 and json.loads(body) == daemon.events()
            # the same connection, now a pipe to the full server: errors are the full server's
            c.send("DELETE", "/api/v1/mount?mountpoint=/nothing")
            status, headers, body = c.response()
            assert status == 500 and headers["server"] == "Nydus API"
            assert "doesn't exist" in json.loads(body)["message"]
            c.send("GET", "/api/v1/daemon")
            assert c.response()[0] == 200
            assert e.answered == 1  # the full server answered everything after the hand-over
            # the idle connection accepted early is still open, and works through the pipe
            assert not idle.closed_by_peer(0.3)
            idle.send("GET", "/api/v1/daemon")
            assert idle.response()[0] == 200
            # new connections go straight to the full server
            fresh = Conn(sock_path)
            fresh.send("GET", "/api/v1/daemon")
            assert fresh.response()[0] == 200
            fresh.close()
            assert e.answered == 1
        finally:
            server.stop()
    finally:
        c.close()
        idle.close()
    assert not sock_path.exists()  # the full server's stop removed it


def test_bodies_and_unusual_heads_are_never_answered_early(
        early: tuple[EarlyApi, FakeDaemon], sock_path: Path) -> None:
    e, daemon = early
    conns = []
    for method, target, body in (("PUT", "/api/v1/daemon", b'{"log_level":"debug"}'),
                                 ("GET", "/api/v1/daemon?x=1", b""),
                                 ("GET", "/api/v1/daemon/", b""),
                                 ("GET", "/api/v1/daemon", b"{}")):
        c = Conn(sock_path)
        c.send(method, target, body)
        conns.append(c)
    time.sleep(0.3)
    assert e.answered == 0
    server = hand_over(e, daemon, sock_path)
    try:
        statuses = [c.response()[0] for c in conns]
        assert statuses[0] == 204  # configured by the full server
        assert statuses[1] == 200 and statuses[2] == 404 and statuses[3] == 200
        assert daemon.log_level == "debug"
    finally:
        for c in conns:
            c.close()
        server.stop()


def test_without_a_full_server_other_requests_get_503_and_close_removes_the_socket(
        early: tuple[EarlyApi, FakeDaemon], sock_path: Path) -> None:
    e, _daemon = early
    c = Conn(sock_path)
    try:
        c.send("GET", "/api/v1/metrics")
        time.sleep(0.2)
        e.fail()
        status, headers, body = c.response()
        assert status == 503 and headers["connection"] == "close"
        assert json.loads(body)["code"] == "NotReady"
        c2 = Conn(sock_path)
        c2.send("GET", "/api/v1/daemon")  # the daemon info is still answered
        assert c2.response()[0] == 200
        c2.close()
    finally:
        c.close()
    e.close()
    assert not sock_path.exists()


def test_a_full_server_that_fails_to_start_leaves_the_early_answers(
        early: tuple[EarlyApi, FakeDaemon], sock_path: Path) -> None:
    e, _daemon = early

    def broken(_sock: socket.socket) -> None:
        raise RuntimeError("no server")

    with pytest.raises(RuntimeError):
        e.hand_over(broken)
    c = Conn(sock_path)
    try:
        c.send("GET", "/api/v1/daemon")
        assert c.response()[0] == 200
        c.send("GET", "/api/v1/metrics")
        assert c.response()[0] == 503
    finally:
        c.close()
