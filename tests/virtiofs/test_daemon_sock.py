"""The nydusd process in virtio-fs mode (``--sock``), driven by the Python vhost-user front-end:
start-up with ``--bootstrap`` at the root, the shared daemon whose API mounts appear in the pseudo
root, states, SIGTERM, and the command-line checks."""

from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path

import pytest

from tests.harness.apiclient import ApiClient
from tests.harness.daemon import Nydusd
from tests.harness.fuse_wire import FuseClient, FuseReplyError
from tests.harness.images import build_daemon_image, sample_tree
from tests.harness.vhost_frontend import Frontend
from tests.integration.test_mount import run_cli


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vsock")
    src = sample_tree(tmp / "src", big=False)
    other = tmp / "other"
    other.mkdir()
    (other / "small.txt").write_bytes(b"second image\n")
    return {"src": src, "v6": build_daemon_image(src, tmp / "v6"),
            "v5": build_daemon_image(src, tmp / "v5", version=5),
            "other": build_daemon_image(other, tmp / "o")}


def _start(tmp: Path, *args: str, sub: tuple[str, ...] = ()) -> tuple[Nydusd, str]:
    sock = str(tmp / "vhost-user-fs.sock")
    d = Nydusd([*sub, "--sock", sock, "--log-level", "debug", *args], tmp / "unused",
               log_path=tmp / "nydusd.log", apisock=str(tmp / "api.sock") if "--apisock" in args else None)
    d.start(wait_mount=False)
    d.wait(lambda: os.path.exists(sock), 20, "the vhost-user socket")
    if d.apisock:
        d.wait(lambda: os.path.exists(d.apisock or ""), 20, "the API socket")
    return d, sock


def _connect(sock: str) -> tuple[Frontend, FuseClient]:
    fe = Frontend(sock)
    fe.setup()
    client = FuseClient(lambda req: fe.roundtrip(req))
    client.init()
    return fe, client


def test_bootstrap_at_the_root_and_sigterm(tmp_path, images):
    cfg = images["v6"].write_config(tmp_path / "config.json", tmp_path / "cache")
    d, sock = _start(tmp_path, "--config", cfg, "--bootstrap", images["v6"].bootstrap)
    try:
        fe, client = _connect(sock)
        assert client.read_file(client.resolve("small.txt").nodeid) == b"hello nydus\n"
        assert client.readlink(client.resolve("link_rel").nodeid) == b"small.txt"
        st = client.getattr(client.resolve("dir/sub").nodeid)
        assert stat.S_IMODE(st.mode) == 0o1777
        fe.close()
        assert d.terminate() == 0
        assert not os.path.exists(sock)
        assert "virtiofs_closed" in d.log()
    finally:
        d.cleanup()


def test_shared_daemon_api_mounts_appear_in_the_pseudo_root(tmp_path, images):
    d, sock = _start(tmp_path, "--apisock", str(tmp_path / "api.sock"), sub=("virtiofs",))
    api = ApiClient(str(tmp_path / "api.sock"))
    try:
        assert api.info()["state"] == "RUNNING"
        fe, client = _connect(sock)
        assert api.request("GET", "/api/v1/metrics/inflight")[0] == 204  # nothing in flight
        assert [e.name for e in client.listdir(1)] == [b".", b".."]
        for name, version in (("pseudo_1", "v6"), ("pseudo_2", "v5")):
            cfg = images[version].write_config(tmp_path / f"{name}.json", tmp_path / f"cache-{name}")
            status, body = api.request("PUT", "/api/v1/mount", {
                "source": images[version].bootstrap, "fstype": "rafs", "mountpoint": f"/{name}",
                "config": cfg})
            assert status == 204, body
        assert [e.name for e in client.listdir(1, plus=True)] == [b".", b"..", b"pseudo_1", b"pseudo_2"]
        p1 = client.lookup(1, b"pseudo_1")
        assert p1.entry_valid <= 1.0  # the guest re-checks pseudo entries: umount shows up by itself
        for name in ("pseudo_1", "pseudo_2"):
            assert client.read_file(client.resolve(f"{name}/dir/sub/deeper/leaf.bin").nodeid) == (
                images["src"] / "dir/sub/deeper/leaf.bin").read_bytes()
        assert api.umount("/pseudo_1")[0] == 204
        with pytest.raises(FuseReplyError) as exc:
            client.lookup(1, b"pseudo_1")
        assert exc.value.errno == errno.ENOENT
        assert client.read_file(client.resolve("pseudo_2/small.txt").nodeid) == b"hello nydus\n"
        status, metrics = api.request("GET", "/api/v1/metrics", id="/pseudo_2")
        assert status == 200 and metrics["data_read"] > 0
        # QEMU goes away and comes back: the mounts are still there
        fe.close()
        fe, client = _connect(sock)
        assert client.read_file(client.resolve("pseudo_2/small.txt").nodeid) == b"hello nydus\n"
        fe.close()
        assert d.terminate() == 0
    finally:
        d.cleanup()


def test_cli_checks_for_the_virtiofs_mode(tmp_path):
    for args, needle in [
        (["virtiofs", "--config", "c"], "--sock"),
        (["--sock", "/tmp/s", "--mountpoint", "/m"], "cannot be used with --mountpoint"),
        (["uffd"], "not supported"),
    ]:
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert needle in r.stderr, (args, r.stderr)
    # a live back-end's socket is not stolen
    d, sock = _start(tmp_path)
    try:
        r = run_cli("virtiofs", "--sock", sock)
        assert r.returncode != 0 and "in use" in r.stderr
        time.sleep(0.1)
        assert d.alive()
    finally:
        d.terminate()
        d.cleanup()
