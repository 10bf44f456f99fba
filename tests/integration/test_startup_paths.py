"""nydusd's start-up paths as nydus-snapshotter meets them: a ``--log-file`` in a directory that does
not exist yet, a dead FUSE mount (ENOTCONN) and a stale API socket left by a daemon killed with
SIGKILL (``recover_policy = "restart"`` starts a plain nydusd on them), and clear refusals for a
mountpoint that is missing, not a directory, or already served.

Regressions: ``cannot open log file: No such file or directory`` (every nydus container failed under
the snapshotter's default ``log_to_stdout = false``), and ``mountpoint is not a directory`` from the
replacement daemon after ``kill -9``. With ``--supervisor`` the dead mount stays for a takeover
(spec §1.6; tested in test_api_daemon.py)."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.apiclient import ApiClient
from tests.harness.daemon import ROOT, Nydusd, is_mounted
from tests.harness.images import DaemonImage, build_daemon_image, sample_tree

pytestmark = pytest.mark.fuse


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> DaemonImage:
    tmp = tmp_path_factory.mktemp("startup")
    return build_daemon_image(sample_tree(tmp / "src", big=False), tmp / "img", version=6)


def _fuse_mounts_at(path: Path) -> int:
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        return sum(1 for line in f if line.split()[1:3] == [target, "fuse"])


def _run_nydusd(args: list[str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nydusd", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_log_file_in_a_missing_directory(tmp_path: Path) -> None:
    """The snapshotter's shared-daemon command line, log dir not created: nydusd creates it."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sock = str(tmp_path / "api.sock")
    log_file = tmp_path / "logs" / "d7f3" / "nydusd.log"
    with Nydusd(["fuse", "--thread-num", "4", "--mountpoint", str(mnt), "--apisock", sock,
                 "--log-level", "info", "--log-file", str(log_file)], mnt,
                log_path=tmp_path / "out", apisock=sock):
        assert ApiClient(sock).info()["state"] == "RUNNING"
        assert "fuse_mounted" in log_file.read_text()


def _dedicated(tmp: Path, image: DaemonImage, sock: str, n: int, *extra: str) -> Nydusd:
    mnt = tmp / "mnt"
    cfg = image.write_config(tmp / "cfg.json", tmp / "cache")
    return Nydusd(["fuse", "--thread-num", "4", "--config", cfg, "--bootstrap", image.bootstrap,
                   "--mountpoint", str(mnt), "--apisock", sock, "--log-file",
                   str(tmp / "logs" / f"nydusd{n}.log"), *extra], mnt, log_path=tmp / f"out{n}",
                  apisock=sock)


def test_dead_fuse_mount_is_detached_and_mounted_afresh(tmp_path: Path, image: DaemonImage) -> None:
    """kill -9, then the same command line again (what recover_policy "restart" does): serves."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sock = str(tmp_path / "api.sock")
    first = _dedicated(tmp_path, image, sock, 1)
    second = _dedicated(tmp_path, image, sock, 2)
    try:
        first.start()
        assert (mnt / "small.txt").read_bytes() == b"hello nydus\n"
        assert first.proc is not None
        first.proc.kill()
        first.proc.wait(10)
        with pytest.raises(OSError) as dead:
            os.statvfs(mnt)
        assert dead.value.errno == errno.ENOTCONN  # the situation the snapshotter leaves behind
        assert os.path.exists(sock)  # stale socket of the dead daemon
        second.start(wait_mount=False)
        second.wait(lambda: _serves(mnt), 20, "the fresh mount")
        assert ApiClient(sock).info()["state"] == "RUNNING"  # the stale socket was replaced
        assert (mnt / "dir" / "sub" / "deeper" / "leaf.bin").stat().st_size == 70_000
        assert _fuse_mounts_at(mnt) == 1  # the dead mount is gone, not stacked under the new one
        log = (tmp_path / "logs" / "nydusd2.log").read_text()
        assert "stale_fuse_mount_detached" in log and "previous_daemon_crashed" not in log
    finally:
        second.terminate()
        second.cleanup()
        first.cleanup()
    assert not is_mounted(mnt)


def test_shared_daemon_restart_after_kill(tmp_path: Path, image: DaemonImage) -> None:
    """Shared mode: the snapshotter restarts the daemon, then POSTs each image's mount again."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sock = str(tmp_path / "api.sock")
    args = ["fuse", "--thread-num", "4", "--mountpoint", str(mnt), "--apisock", sock,
            "--log-file", str(tmp_path / "logs" / "d1" / "nydusd.log")]
    cfg = image.config_text(tmp_path / "cache")
    first = Nydusd(args, mnt, log_path=tmp_path / "out1", apisock=sock)
    second = Nydusd(args, mnt, log_path=tmp_path / "out2", apisock=sock)
    try:
        first.start()
        assert ApiClient(sock).mount("/3", image.bootstrap, cfg)[0] == 204
        assert (mnt / "3" / "small.txt").read_bytes() == b"hello nydus\n"
        assert first.proc is not None
        first.proc.kill()
        first.proc.wait(10)
        second.start(wait_mount=False)  # the dead mount and the stale socket are there already
        api = ApiClient(sock)
        second.wait(lambda: _answers(api), 20, "the new API socket")
        assert api.info()["state"] == "RUNNING"
        assert api.mount("/3", image.bootstrap, cfg)[0] == 204
        assert (mnt / "3" / "small.txt").read_bytes() == b"hello nydus\n"
        assert _fuse_mounts_at(mnt) == 1
    finally:
        second.terminate()
        second.cleanup()
        first.cleanup()


def _answers(api: ApiClient) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(api.sock_path)
        except OSError:
            return False  # the dead daemon's socket, not replaced yet
    return api.request("GET", "/api/v1/daemon")[0] == 200


def _serves(mnt: Path) -> bool:
    try:
        return (mnt / "small.txt").read_bytes() == b"hello nydus\n"
    except OSError:
        return False


def test_live_mount_is_refused_and_left_serving(tmp_path: Path, image: DaemonImage) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sock = str(tmp_path / "api.sock")
    with _dedicated(tmp_path, image, sock, 1):
        res = _run_nydusd(["fuse", "--localfs-dir", image.blob_dir, "--bootstrap", image.bootstrap,
                           "--mountpoint", str(mnt), "--apisock", str(tmp_path / "other.sock")])
        assert res.returncode != 0
        assert f"{os.path.realpath(mnt)} is already a mount point (fuse)" in res.stderr
        assert _serves(mnt) and _fuse_mounts_at(mnt) == 1
        assert not os.path.exists(tmp_path / "other.sock")


def test_mount_on_top_of_a_tmpfs_mount_point(tmp_path: Path, image: DaemonImage) -> None:
    """Only a live FUSE mount is refused: an (empty) tmpfs mounted at the mountpoint is a fine
    place to mount on, as with upstream nydusd."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "nydus-test", str(mnt)], check=True)
    try:
        sock = str(tmp_path / "api.sock")
        with _dedicated(tmp_path, image, sock, 1):
            assert _serves(mnt) and _fuse_mounts_at(mnt) == 1
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_unusable_mountpoint_messages(tmp_path: Path, image: DaemonImage, kind: str) -> None:
    mnt = tmp_path / "mnt"
    if kind == "file":
        mnt.write_text("keep me")
    res = _run_nydusd(["fuse", "--localfs-dir", image.blob_dir, "--bootstrap", image.bootstrap,
                       "--mountpoint", str(mnt), "--apisock", str(tmp_path / "api.sock")])
    assert res.returncode != 0
    want = "does not exist (create the directory first)" if kind == "missing" else "is not a directory"
    assert f"nydusd: error: mountpoint {mnt} {want}" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert not os.path.exists(tmp_path / "api.sock")
    if kind == "file":
        assert mnt.read_text() == "keep me"
