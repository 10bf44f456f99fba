"""Oversized and malformed API input against a real ``python -m nydusd`` with a real FUSE mount: each
is refused with a clear 4xx, the daemon stays as it was (mounts, listing of the pseudo root, memory),
and an umount leaves no empty pseudo directories behind."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.app import MAX_BODY
from tests.harness.daemon import LiveDaemon, snapshotter_config
from tests.harness.images import build_image, make_files

pytestmark = pytest.mark.fuse

FILES = {"a.txt": b"limits\n", "dir/b.bin": os.urandom(100_000)}


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[LiveDaemon, Path, str]]:
    image = build_image(make_files(tmp_path / "src", FILES), tmp_path / "blobs",
                        bootstrap_name="one.boot").bootstrap
    (tmp_path / "cache").mkdir()
    config = json.dumps(snapshotter_config(tmp_path / "blobs", tmp_path / "cache"))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sock = tmp_path / "api.sock"
    d = LiveDaemon(tmp_path, ["--apisock", str(sock), "--mountpoint", str(mnt)], mnt, sock)
    try:
        yield d.start(), image, config
    finally:
        d.stop()


def raw(sock: Path, head: bytes, body: bytes = b"", *, chunk: int = 1 << 20,
        timeout: float = 30.0) -> tuple[int, bytes]:
    """Send ``head`` + ``body`` while reading the answer; returns (status, answer body). Stops
    sending once an answer arrived (what a client waiting for 100-continue does)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(sock))
    try:
        data, got = head + body, b""
        s.setblocking(False)
        pos, deadline = 0, time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pos < len(data):
                try:
                    pos += s.send(data[pos:pos + chunk])
                except BlockingIOError:
                    time.sleep(0.001)
                except (BrokenPipeError, ConnectionResetError):
                    pos = len(data)
            try:
                more = s.recv(1 << 16)
            except BlockingIOError:
                if pos >= len(data):
                    time.sleep(0.005)
                continue
            if not more:
                break
            got += more
            if b"\r\n\r\n" in got:
                hdrs, _, rest = got.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in hdrs.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), None)
                if int(got.split(b" ")[1]) == 204:
                    length = 0
                if length is not None and len(rest) >= length:
                    return int(got.split(b" ")[1]), rest[:length]
        raise AssertionError(f"no complete answer: {got[:200]!r}")
    finally:
        s.close()


def hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def mount_body(image: Path, config: str, **extra: object) -> bytes:
    return json.dumps({"source": str(image), "fs_type": "rafs", "config": config, **extra}).encode()


def post_mount(sock: Path, mountpoint: str, body: bytes) -> tuple[int, bytes]:
    from urllib.parse import quote

    head = (f"POST /api/v1/mount?mountpoint={quote(mountpoint, safe='/')} HTTP/1.1\r\nHost: unix\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return raw(sock, head, body)


def test_oversized_input_is_refused_and_changes_nothing(live) -> None:  # type: ignore[no-untyped-def]
    d, image, config = live
    sock = d.sock
    assert post_mount(sock, "/ok", mount_body(image, config))[0] == 204
    before = sorted(os.listdir(d.mountpoint))

    # a component over NAME_MAX, a path over PATH_MAX: 400, and `ls` of the root still works
    for mp in ["/" + "n" * 256, "/a/" + "n" * 300 + "/b", "/p" * 2049]:
        status, body = post_mount(sock, mp, mount_body(image, config))
        assert status == 400 and b"longer than" in body, (status, body[:200])
        assert sorted(os.listdir(d.mountpoint)) == before
    assert post_mount(sock, "/" + "m" * 255, mount_body(image, config))[0] == 204  # at the limit
    assert (d.mountpoint / ("m" * 255) / "a.txt").read_bytes() == FILES["a.txt"]

    # prefetch_files must be absolute, without ".."
    for bad in [["a.txt"], ["/dir/../etc"], ["/ok", "../x"]]:
        status, body = post_mount(sock, "/pf", mount_body(image, config, prefetch_files=bad))
        assert status == 400 and b"prefetch_files" in body, (status, body[:200])
    assert not (d.mountpoint / "pf").exists()
    assert post_mount(sock, "/pf", mount_body(image, config, prefetch_files=["/dir", "/a.txt"]))[0] == 204

    # a 200 MB body: 413 before it is read, and the daemon's peak memory does not follow it
    hwm = hwm_kib(d.proc.pid)  # type: ignore[union-attr]
    big = 200 << 20
    head = (f"PUT /api/v1/daemon HTTP/1.1\r\nHost: unix\r\nContent-Length: {big}\r\n\r\n").encode()
    status, body = raw(sock, head, b"{" + b" " * (big - 1))
    assert status == 413 and b"PayloadTooLarge" in body
    head = b"PUT /api/v1/daemon HTTP/1.1\r\nHost: unix\r\nTransfer-Encoding: chunked\r\n\r\n"
    piece = b"100000\r\n" + b" " * 0x100000 + b"\r\n"
    status, body = raw(sock, head, piece * (2 * MAX_BODY // 0x100000 + 2) + b"0\r\n\r\n")
    assert status == 413, body
    grown = hwm_kib(d.proc.pid) - hwm  # type: ignore[union-attr]
    assert grown < 40 << 10, f"peak RSS grew by {grown} KiB"

    # a 1 MB URL: 414 (the connection is not just dropped); a 20 KB one too; big headers: 431
    for size in (1 << 20, 20 << 10):
        head = b"GET /api/v1/daemon?x=" + b"a" * size + b" HTTP/1.1\r\nHost: unix\r\n\r\n"
        status, body = raw(sock, head)
        assert status == 414 and b"UriTooLong" in body, (size, status, body[:200])
    status, body = raw(sock, b"GET /api/v1/daemon HTTP/1.1\r\nHost: unix\r\nX-Big: " + b"b" * (100 << 10)
                       + b"\r\n\r\n")
    assert status == 431 and b"RequestHeaderFieldsTooLarge" in body

    # the daemon is unchanged and still serves
    with d.client() as c:
        assert sorted(c.info()["backend_collection"]) == ["/" + "m" * 255, "/ok", "/pf"]
    assert (d.mountpoint / "ok" / "dir" / "b.bin").read_bytes() == FILES["dir/b.bin"]


def test_umount_leaves_no_empty_directories(live) -> None:  # type: ignore[no-untyped-def]
    d, image, config = live
    with d.client() as c:
        c.mount("/a/b/c", str(image), config)
        c.mount("/a/x", str(image), config)
        c.mount("/d/e", str(image), config)
        assert sorted(os.listdir(d.mountpoint)) == ["a", "d"]
        c.umount("/a//b/c")
        assert sorted(os.listdir(d.mountpoint)) == ["a", "d"]
        assert os.listdir(d.mountpoint / "a") == ["x"]
        c.umount("/d/e/")
        assert os.listdir(d.mountpoint) == ["a"]
        assert not (d.mountpoint / "d").exists()
        c.umount("/a/x")
        assert os.listdir(d.mountpoint) == []
        c.mount("/a/b/c", str(image), config)  # the same path again
        assert (d.mountpoint / "a" / "b" / "c" / "a.txt").read_bytes() == FILES["a.txt"]
