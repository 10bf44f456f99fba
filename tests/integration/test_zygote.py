"""``nydusd-zygote`` + ``NYDUSD_ZYGOTE``: a ``nydusd`` started with the variable is served by a fork of
the warm zygote, and to its starter it behaves like the daemon itself -- its signals reach the
daemon, its exit status is the daemon's, killing it kills the daemon; refused callers (another
mount namespace) and a missing zygote fall back to a normal start."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.apiclient import ApiClient
from tests.harness.daemon import ROOT, Nydusd, is_mounted
from tests.harness.images import DaemonImage, build_daemon_image, sample_tree

pytestmark = pytest.mark.fuse


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[DaemonImage, Path]:
    tmp = tmp_path_factory.mktemp("zygote-image")
    src = sample_tree(tmp / "src", big=False)
    return build_daemon_image(src, tmp / "img"), src


@pytest.fixture
def image(tree: tuple[DaemonImage, Path]) -> DaemonImage:
    return tree[0]


@pytest.fixture
def zygote(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    sock = str(tmp_path / "zygote.sock")
    log = tmp_path / "zygote.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "nydusd.cli.zygote", "--socket", sock],
                                stdout=out, stderr=subprocess.STDOUT, cwd=str(ROOT),
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 30
    while "zygote_ready" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    assert os.stat(sock).st_mode & 0o777 == 0o600
    try:
        yield sock, proc, log
    finally:
        proc.terminate()
        proc.wait(10)
    assert not os.path.exists(sock)


def daemon_pids(zygote_pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(zygote_pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def start(image: DaemonImage, tmp: Path, zygote_sock: str | None, name: str = "d",
          extra_env: dict[str, str] | None = None) -> Nydusd:
    mnt = tmp / f"mnt-{name}"
    mnt.mkdir()
    sock = str(tmp / f"{name}.sock")
    cfg = image.write_config(tmp / f"{name}.json", tmp / f"cache-{name}")
    env = {"NYDUSD_ZYGOTE": zygote_sock} if zygote_sock else {}
    return Nydusd(["--config", cfg, "--bootstrap", image.bootstrap, "--mountpoint", str(mnt),
                   "--apisock", sock], mnt, log_path=tmp / f"{name}.log", apisock=sock,
                  module="nydusd.cli.launch", env={**env, **(extra_env or {})})


def test_a_daemon_forked_by_the_zygote_serves_and_stops_with_its_starter(
        tree: tuple[DaemonImage, Path], tmp_path: Path,
        zygote: tuple[str, subprocess.Popen[bytes], Path]) -> None:
    image, src = tree
    sock, zproc, zlog = zygote
    d = start(image, tmp_path, sock).start()
    try:
        assert ApiClient(d.apisock).info()["state"] == "RUNNING"
        children = daemon_pids(zproc.pid)
        assert len(children) == 1 and d.proc is not None and children[0] != d.proc.pid
        assert Path(f"/proc/{children[0]}/comm").read_text().strip() == "nydusd"
        # the daemon got its starter's stdout/stderr and working directory
        with open(f"/proc/{children[0]}/cwd/.probe-zygote", "w"):
            pass
        assert (ROOT / ".probe-zygote").exists()
        (ROOT / ".probe-zygote").unlink()
        assert os.readlink(f"/proc/{children[0]}/fd/2") == os.readlink(f"/proc/{d.proc.pid}/fd/2")
        assert "fuse_mounted" in d.log() or "startup_phase" in d.log()
        files = [p for p in src.rglob("*") if p.is_file() and not p.is_symlink()]
        assert files
        for p in files:
            assert (Path(d.mountpoint) / p.relative_to(src)).read_bytes() == p.read_bytes()
        assert d.terminate() == 0  # SIGTERM to the starter reached the daemon; its status came back
        assert not is_mounted(d.mountpoint)
        assert daemon_pids(zproc.pid) == []
        assert "zygote_daemon_ended" in zlog.read_text()
    finally:
        d.cleanup()


def test_killing_the_starter_kills_the_daemon_and_usage_errors_keep_their_status(
        image: DaemonImage, tmp_path: Path, zygote: tuple[str, subprocess.Popen[bytes], Path]) -> None:
    sock, zproc, _ = zygote
    d = start(image, tmp_path, sock).start()
    try:
        [child] = daemon_pids(zproc.pid)
        assert d.proc is not None
        d.proc.kill()
        d.proc.wait(5)
        deadline = time.monotonic() + 5
        while os.path.exists(f"/proc/{child}") and not _zombie_or_gone(child):
            assert time.monotonic() < deadline, "the daemon outlived its killed starter"
            time.sleep(0.02)
    finally:
        d.cleanup()
    bad = subprocess.run([sys.executable, "-m", "nydusd.cli.launch", "--no-such-flag"],
                         capture_output=True, text=True, cwd=str(ROOT),
                         env={**os.environ, "PYTHONPATH": str(ROOT), "NYDUSD_ZYGOTE": sock})
    assert bad.returncode == 2 and "--no-such-flag" in bad.stderr
    assert "starting here" not in bad.stderr  # served by the zygote, not a fallback


def _zombie_or_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def test_refused_or_missing_zygote_falls_back_to_a_normal_start(
        image: DaemonImage, tmp_path: Path, zygote: tuple[str, subprocess.Popen[bytes], Path]) -> None:
    sock, zproc, zlog = zygote
    # another mount namespace: the zygote would mount in the wrong one, so it refuses
    other_ns = subprocess.run(["unshare", "--mount", "--propagation", "unchanged", sys.executable,
                               "-m", "nydusd.cli.launch", "--version"], capture_output=True,
                              text=True, cwd=str(ROOT),
                              env={**os.environ, "PYTHONPATH": str(ROOT), "NYDUSD_ZYGOTE": sock})
    assert other_ns.returncode == 0 and "Version:" in other_ns.stdout
    assert "another mnt namespace" in other_ns.stderr and "starting here" in other_ns.stderr
    assert "zygote_refused" in zlog.read_text()
    # no zygote at the path: the daemon starts in the starter's own process
    d = start(image, tmp_path, str(tmp_path / "absent.sock")).start()
    try:
        assert ApiClient(d.apisock).info()["state"] == "RUNNING"
        assert daemon_pids(zproc.pid) == []
        assert "unavailable" in d.log()
    finally:
        d.terminate()
        d.cleanup()


def test_stopping_the_zygote_leaves_its_daemons_serving(
        tree: tuple[DaemonImage, Path], tmp_path: Path,
        zygote: tuple[str, subprocess.Popen[bytes], Path]) -> None:
    image, src = tree
    sock, zproc, _ = zygote
    d = start(image, tmp_path, sock).start()
    try:
        (child,) = daemon_pids(zproc.pid)
        zproc.terminate()  # e.g. restarted for an upgrade
        zproc.wait(10)
        time.sleep(0.3)
        assert d.alive() and os.path.exists(f"/proc/{child}")
        assert ApiClient(d.apisock).info()["state"] == "RUNNING"
        some = next(p for p in src.rglob("*") if p.is_file() and not p.is_symlink())
        assert (Path(d.mountpoint) / some.relative_to(src)).read_bytes() == some.read_bytes()
        assert d.terminate() == 0  # still forwarded; the status is unknown, so 0
        assert not is_mounted(d.mountpoint)
        assert "went away" in d.log()
    finally:
        d.cleanup()
