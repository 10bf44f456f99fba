"""The real uvicorn server on a unix socket: 0600 socket with no exposure window, stale/live socket
handling, idle keep-alive connections kept open, clean stop (spec interfaces.md §1.6, §3)."""

from __future__ import annotations

import os
import select
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from api import server as server_mod
from api.client import ApiClient, ApiError
from api.server import ApiServer, probe_socket, start_api_server
from nydusd.errors import AlreadyExists, InvalidArgument
from tests.harness.fakes.daemon import FakeDaemon


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "api.sock"


@pytest.fixture
def served(sock_path: Path) -> Iterator[ApiServer]:
    handle = start_api_server(FakeDaemon(), str(sock_path))
    try:
        yield handle
    finally:
        handle.stop()


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_socket_is_0600_and_serves(served: ApiServer, sock_path: Path) -> None:
    assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    assert mode(sock_path) == 0o600
    with ApiClient(str(sock_path)) as c:
        status, headers, body = c.request("GET", "/api/v1/daemon")
        assert status == 200 and headers["server"] == "Nydus API"
        assert headers["content-type"] == "application/json"
        assert c.info()["state"] == "RUNNING"
        with pytest.raises(ApiError) as e:
            c.umount("/nothing")
        assert e.value.status == 500 and "doesn't exist" in e.value.api_message
    assert not [p for p in sock_path.parent.iterdir() if p.name.startswith(".nydusd-api-")]


def _spy_publish(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, bool, int]]:
    """Records (call, socket mode, destination existed, private dir mode) at publication time."""
    seen: list[tuple[str, int, bool, int]] = []

    def wrap(name: str) -> None:
        real = getattr(os, name)

        def spy(src: str, dst: str, **kw: Any) -> None:
            src_fd = kw["src_dir_fd"]
            seen.append((name, stat.S_IMODE(os.stat(src, dir_fd=src_fd).st_mode), os.path.lexists(dst),
                         stat.S_IMODE(os.fstat(src_fd).st_mode)))
            real(src, dst, **kw)

        monkeypatch.setattr(server_mod.os, name, spy)

    wrap("rename")
    wrap("link")
    return seen


def test_socket_never_visible_with_other_permissions(sock_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _spy_publish(monkeypatch)
    sock = server_mod.bind_unix_socket(str(sock_path))
    try:
        # at the moment it appears at the final path it is already 0600, inside a 0700 directory
        assert seen == [("link", 0o600, False, 0o700)]
        assert mode(sock_path) == 0o600
        assert probe_socket(str(sock_path)) is True  # already listening when it appears
    finally:
        sock.close()
        sock_path.unlink()
    assert sorted(p.name for p in sock_path.parent.iterdir()) == []  # no private dir, no lock file


def _stale_socket(path: Path) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # a dead daemon's leftover: the file stays, nobody listens


def test_stale_socket_is_replaced(sock_path: Path, logs: object, monkeypatch: pytest.MonkeyPatch) -> None:
    _stale_socket(sock_path)
    assert probe_socket(str(sock_path)) is False
    seen = _spy_publish(monkeypatch)
    handle = start_api_server(FakeDaemon(), str(sock_path))
    try:
        assert seen == [("rename", 0o600, True, 0o700)]  # replaced in one step, already 0600
        assert mode(sock_path) == 0o600
        with ApiClient(str(sock_path)) as c:
            assert c.info()["state"] == "RUNNING"
        assert logs.count("api_socket_replaced") == 1  # type: ignore[attr-defined]
    finally:
        handle.stop()
    assert not sock_path.exists()


def test_regular_file_is_refused_and_left_intact(sock_path: Path) -> None:
    sock_path.write_text("precious data\n")
    with pytest.raises(InvalidArgument, match="not a socket") as e:
        start_api_server(FakeDaemon(), str(sock_path))
    assert e.value.context["path"] == str(sock_path)
    assert sock_path.read_text() == "precious data\n"
    assert sorted(p.name for p in sock_path.parent.iterdir()) == ["api.sock"]


def test_directory_and_symlink_are_refused(sock_path: Path, tmp_path: Path) -> None:
    sock_path.mkdir()
    (sock_path / "keep").write_text("x")
    with pytest.raises(InvalidArgument, match="is a directory"):
        start_api_server(FakeDaemon(), str(sock_path))
    assert (sock_path / "keep").read_text() == "x"
    link = tmp_path / "link.sock"
    link.symlink_to(sock_path / "keep")
    with pytest.raises(InvalidArgument, match="not a socket"):
        server_mod.bind_unix_socket(str(link))
    assert link.is_symlink() and link.read_text() == "x"


def _bind_pair(path: Path) -> list[socket.socket | BaseException | None]:
    """Two threads call bind_unix_socket(path) at the same moment; their results."""
    results: list[socket.socket | BaseException | None] = [None, None]
    barrier = threading.Barrier(2)

    def bind(i: int) -> None:
        barrier.wait()
        try:
            results[i] = server_mod.bind_unix_socket(str(path))
        except BaseException as e:  # noqa: BLE001 - inspected by the caller
            results[i] = e

    threads = [threading.Thread(target=bind, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return results


def _race(path: Path, trials: int, prepare: Callable[[], None]) -> list[tuple[int, list[str]]]:
    """``trials`` rounds of _bind_pair; per round (number of winners, the losers' error types)."""
    outcomes = []
    for _ in range(trials):
        prepare()
        results = _bind_pair(path)
        socks = [r for r in results if isinstance(r, socket.socket)]
        outcomes.append((len(socks), [type(r).__name__ for r in results if not isinstance(r, socket.socket)]))
        if socks:
            assert probe_socket(str(path)) is True  # the winner is the one reachable at the path
        for s in socks:
            s.close()
        path.unlink()
    return outcomes


def test_concurrent_binds_on_a_fresh_path_have_one_winner(sock_path: Path) -> None:
    outcomes = _race(sock_path, 50, lambda: None)
    assert outcomes == [(1, ["AlreadyExists"])] * 50


def test_concurrent_binds_over_a_stale_socket_have_one_winner(sock_path: Path) -> None:
    outcomes = _race(sock_path, 50, lambda: _stale_socket(sock_path))
    assert outcomes == [(1, ["AlreadyExists"])] * 50


def test_live_socket_is_refused(sock_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(sock_path))
        live.listen(1)
        with pytest.raises(AlreadyExists, match="in use by a live process"):
            start_api_server(FakeDaemon(), str(sock_path))
        assert probe_socket(str(sock_path)) is True  # untouched
    sock_path.unlink()


def test_second_server_on_same_path_is_refused(served: ApiServer, sock_path: Path) -> None:
    with pytest.raises(AlreadyExists):
        start_api_server(FakeDaemon(), str(sock_path))
    with ApiClient(str(sock_path)) as c:
        assert c.info()["state"] == "RUNNING"


def test_unusable_paths(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="directory"):
        start_api_server(FakeDaemon(), str(tmp_path))
    with pytest.raises(InvalidArgument, match="cannot create"):
        start_api_server(FakeDaemon(), str(tmp_path / "missing" / "api.sock"))


def test_long_socket_path(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / "api.sock"
    assert len(str(path)) > 108
    handle = start_api_server(FakeDaemon(), str(path))
    try:
        assert mode(path) == 0o600
        # clients reach it through a short alias of its directory
        fd = os.open(deep, os.O_RDONLY)
        try:
            with ApiClient(f"/proc/self/fd/{fd}/api.sock") as c:
                assert c.info()["state"] == "RUNNING"
        finally:
            os.close(fd)
    finally:
        handle.stop()


@pytest.mark.slow
def test_idle_keepalive_connections_stay_open(served: ApiServer, sock_path: Path) -> None:
    # the snapshotter's liveness connection: opened, never used
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(str(sock_path))
    with ApiClient(str(sock_path)) as c:
        c.info()
        time.sleep(6.5)  # longer than uvicorn's default 5 s keep-alive timeout
        readable, _, errored = select.select([silent], [], [silent], 0)
        assert readable == [] and errored == []  # no EOF/hang-up on the idle connection
        sock_before = c.conn.sock
        assert c.info()["state"] == "RUNNING"
        assert c.conn.sock is sock_before  # the same keep-alive connection was reused
    silent.close()


def test_stop_with_idle_connection_open_is_prompt(sock_path: Path) -> None:
    handle = start_api_server(FakeDaemon(), str(sock_path))
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    idle.connect(str(sock_path))
    try:
        t0 = time.monotonic()
        handle.stop()
        assert time.monotonic() - t0 < 3
        assert not handle.running
        assert not sock_path.exists()
        assert idle.recv(1) == b""  # the server hung up on shutdown
        assert not [t for t in threading.enumerate() if t.name == "nydusd-api"]
    finally:
        idle.close()


def test_stop_keeps_a_successors_socket(sock_path: Path) -> None:
    first = start_api_server(FakeDaemon(), str(sock_path))
    first.stop(wait=False)
    first._thread.join(5)
    # a successor took the path over before the first one cleaned up
    second = start_api_server(FakeDaemon(), str(sock_path))
    try:
        first.stop()
        with ApiClient(str(sock_path)) as c:
            assert c.info()["state"] == "RUNNING"
    finally:
        second.stop()


def test_http10_and_raw_clients(served: ApiServer, sock_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(sock_path))
        s.sendall(b"GET /api/v1/daemon HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):  # HTTP/1.0 without keep-alive: the server closes after the reply
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"server: nydus api" in head.lower()
    assert b'"state":"RUNNING"' in body


def test_concurrent_clients(served: ApiServer, sock_path: Path, bootstrap: Path, config_text: str) -> None:
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            with ApiClient(str(sock_path)) as c:
                for i in range(10):
                    mp = f"/w{n}/{i}"
                    c.mount(mp, str(bootstrap), config_text)
                    assert c.metrics(id=mp)["id"] == mp
                    c.umount(mp)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    with ApiClient(str(sock_path)) as c:
        assert c.info()["backend_collection"] == {}
