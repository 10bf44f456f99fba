"""Replays what containerd nydus-snapshotter does to nydusd (spec interfaces.md §4.2, §4.3, §4.6,
§4.8): the exact command lines it emits, its waits (socket <=10 s, RUNNING <=2 s), its idle liveness
connection, the configs it generates (including keys nydusd ignores), its per-snapshot mounts with
URL-encoded mountpoints, the metrics it scrapes, and its teardown (SIGTERM unmounts; exit API keeps
the mount)."""

from __future__ import annotations

import json
import select
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from api.client import ApiClient
from api.schemas import BlobcacheMetrics, FsIoStats
from tests.harness.daemon import LiveDaemon, is_mounted, snapshotter_config
from tests.harness.images import build_image, make_files

pytestmark = pytest.mark.fuse

FILES = {"etc/os-release": b"ID=nydus\n", "usr/bin/tool": b"\x7fELF" + bytes(range(256)) * 500}


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("snapimg")
    return build_image(make_files(root / "src", FILES), root / "blobs").bootstrap


def liveness(sock: Path) -> socket.socket:
    """The snapshotter's monitor: connect (retrying <=2 s), send nothing, keep it open."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deadline = time.monotonic() + 2
    while True:
        try:
            s.connect(str(sock))
            return s
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def hung_up(s: socket.socket, timeout: float = 0.0) -> bool:
    readable, _, _ = select.select([s], [], [], timeout)
    return bool(readable) and s.recv(1) == b""


def get(c: ApiClient, path: str) -> tuple[int, bytes]:
    status, headers, body = c.request("GET", path)
    assert headers["server"] == "Nydus API"
    return status, body


@pytest.fixture
def work(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    for mnt in tmp_path.glob("**/mnt"):
        if is_mounted(mnt):
            subprocess.run(["fusermount", "-u", "-z", str(mnt)], check=False, capture_output=True)


def test_dedicated_daemon(work: Path, image: Path) -> None:
    daemon_id = "d1"
    snap = work / "snapshots" / "7"
    mnt = snap / "mnt"
    mnt.mkdir(parents=True)
    cfg_path = work / "config" / daemon_id / "config.json"
    cfg_path.parent.mkdir(parents=True)
    cache = work / "cache"
    cache.mkdir()
    cfg_path.write_text(json.dumps(snapshotter_config(image.parent, cache)))
    sock = work / "socket" / daemon_id / "api.sock"
    sock.parent.mkdir(parents=True)
    args = ["fuse", "--thread-num", "4", "--config", str(cfg_path), "--bootstrap", str(image),
            "--mountpoint", str(mnt), "--apisock", str(sock), "--log-level", "info",
            "--log-rotation-size", "100", "--failover-policy", "resend"]
    d = LiveDaemon(work, args, mnt, sock)
    try:
        d.start()  # socket <=10 s, RUNNING <=2 s
        assert d.first_state == "RUNNING"  # the socket only appears once the daemon is RUNNING
        monitor = liveness(sock)
        with d.client() as c:
            assert c.info()["state"] == "RUNNING"
            status, body = get(c, "/api/v1/metrics/blobcache")  # WaitUntilReady: no id
            assert status == 200
            BlobcacheMetrics.model_validate_json(body)
            # overlay lowerdir = the mountpoint itself
            assert (mnt / "etc" / "os-release").read_bytes() == FILES["etc/os-release"]
            assert (mnt / "usr" / "bin" / "tool").read_bytes() == FILES["usr/bin/tool"]
            status, body = get(c, "/api/v1/metrics")  # metrics scrape, no id: the only fs
            fs = FsIoStats.model_validate_json(body)
            assert fs.data_read >= len(FILES["usr/bin/tool"]) and fs.fop_hits[4] > 0
            assert fs.id == "/"
            assert get(c, "/api/v1/metrics/inflight") == (204, b"")
        assert not hung_up(monitor)
        # Remove: SIGTERM, wait process, wait until the mountpoint is unmounted
        assert d.proc is not None
        d.proc.terminate()
        assert d.wait_exit(10) == 0, d.log()
        assert not is_mounted(mnt)
        assert hung_up(monitor, timeout=2)  # what the snapshotter sees as "daemon died"
        monitor.close()
    finally:
        d.stop()


def test_shared_daemon(work: Path, image: Path) -> None:
    root_mnt = work / "mnt"
    root_mnt.mkdir()
    sock = work / "socket" / "shared" / "api.sock"
    sock.parent.mkdir(parents=True)
    args = ["fuse", "--thread-num", "4", "--mountpoint", str(root_mnt), "--apisock", str(sock),
            "--log-level", "info", "--failover-policy", "resend"]
    d = LiveDaemon(work, args, root_mnt, sock)
    try:
        d.start()
        monitor = liveness(sock)
        with d.client() as c:
            for sid in ("12", "13"):
                cache = work / "cache" / sid
                cache.mkdir(parents=True)
                cfg = json.dumps(snapshotter_config(image.parent, cache, snapshot_id=sid))
                body = {"fs_type": "rafs", "source": str(image), "config": cfg}  # no prefetch_files
                url = f"/api/v1/mount?mountpoint={quote('/' + sid, safe='')}"
                status, _, _ = c.request("POST", url, body)
                assert status == 204
                # the lower dir is stat-ed right after the POST
                assert (root_mnt / sid).is_dir()
                assert c.info()["state"] == "RUNNING"
                assert (root_mnt / sid / "etc" / "os-release").read_bytes() == FILES["etc/os-release"]
                status, raw = get(c, f"/api/v1/metrics/blobcache?id=%2F{sid}")
                assert status == 200, raw
                BlobcacheMetrics.model_validate_json(raw)
                status, raw = get(c, f"/api/v1/metrics?id=%2F{sid}")
                assert status == 200 and FsIoStats.model_validate_json(raw).data_read == len(b"ID=nydus\n")
            info = c.info()
            assert set(info["backend_collection"]) == {"/12", "/13"}
            assert all(v["backend_type"] == "Rafs" for v in info["backend_collection"].values())
            for sid in ("12", "13"):
                status, _, _ = c.request("DELETE", f"/api/v1/mount?mountpoint=%2F{sid}")
                assert status == 204
                assert not (root_mnt / sid).exists()
            # hot-upgrade's last step on the old daemon: exit without unmounting
            status, _, _ = c.request("PUT", "/api/v1/daemon/exit")
            assert status == 204
        assert d.wait_exit(10) == 0, d.log()
        assert is_mounted(root_mnt)
        assert hung_up(monitor, timeout=2)
        monitor.close()
    finally:
        d.stop()
