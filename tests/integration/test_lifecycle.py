"""Stopping nydusd at any moment of its life: SIGTERM/SIGINT at varied delays after the API socket
appears (including before the FUSE loop has started, and right after requests kept the workers
busy) and ``PUT /api/v1/daemon/exit``. Every stop must end the process with status 0 within a few
seconds; signals unmount, exit keeps the mount for a successor.

Regression: the socket appears before ``llfuse.main`` runs, so an early SIGTERM used to kill the
process with the default action (status -15, mount left behind), and llfuse's own shutdown could
lose the wake-up of a busy worker and hang forever (about 1 stop in 15 right after a readdir).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness.apiclient import ApiClient
from tests.harness.daemon import ROOT, force_unmount, is_mounted
from tests.harness.images import build_daemon_image, sample_tree

pytestmark = [pytest.mark.fuse, pytest.mark.usefixtures("fuse_session")]

STOP_BOUND = 8.0  # seconds from the signal to the exit (a healthy stop takes ~0.3 s)
DELAYS = (0.0, 0.005, 0.02, 0.05, 0.1, 0.2)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lifecycle")
    return build_daemon_image(sample_tree(tmp / "src", big=False), tmp / "img", version=6)


def _start(tmp: Path, image, n: int) -> tuple[subprocess.Popen[bytes], Path, str]:
    mnt = tmp / "mnt"
    mnt.mkdir(exist_ok=True)
    sock = str(tmp / f"api{n}.sock")
    log = open(tmp / f"nydusd{n}.log", "wb")  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nydusd", "--bootstrap", image.bootstrap, "--localfs-dir",
             image.blob_dir, "--mountpoint", str(mnt), "--apisock", sock, "--thread-num", "4"],
            stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT),
            env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        log.close()
    deadline = time.monotonic() + 20
    while not os.path.exists(sock):
        assert proc.poll() is None, (tmp / f"nydusd{n}.log").read_text()
        assert time.monotonic() < deadline, "no API socket"
        time.sleep(0.002)
    return proc, mnt, sock


def _wait_exit(proc: subprocess.Popen[bytes], tmp: Path, n: int, what: str) -> float:
    start = time.monotonic()
    try:
        code = proc.wait(STOP_BOUND)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"{what}: nydusd did not exit within {STOP_BOUND}s:\n"
                    + (tmp / f"nydusd{n}.log").read_text()[-3000:])
    assert code == 0, f"{what}: exit status {code}:\n" + (tmp / f"nydusd{n}.log").read_text()[-3000:]
    return time.monotonic() - start


@pytest.mark.parametrize(("signum", "cycles"), [(signal.SIGTERM, 18), (signal.SIGINT, 6)])
def test_stop_signal_at_any_moment(tmp_path, image, signum, cycles):
    slowest = 0.0
    for n in range(cycles):
        proc, mnt, _sock = _start(tmp_path, image, n)
        try:
            time.sleep(DELAYS[n % len(DELAYS)])
            if n % 2:  # keep the workers busy right up to the signal (the lost-wake-up race)
                os.listdir(mnt)
                (mnt / "small.txt").read_bytes()
            proc.send_signal(signum)
            what = f"cycle {n} ({signal.Signals(signum).name}, delay {DELAYS[n % len(DELAYS)]})"
            slowest = max(slowest, _wait_exit(proc, tmp_path, n, what))
            assert not is_mounted(mnt), f"{what}: mount left behind"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            force_unmount(mnt)
    assert slowest < STOP_BOUND


def test_exit_request_keeps_the_mount_and_leaves(tmp_path, image):
    for n in range(4):
        proc, mnt, sock = _start(tmp_path, image, n)
        try:
            if n % 2:
                os.listdir(mnt)
            status, _ = ApiClient(sock).request("PUT", "/api/v1/daemon/exit")
            assert status == 204
            _wait_exit(proc, tmp_path, n, f"exit cycle {n}")
            assert is_mounted(mnt)  # left for a successor (failover/upgrade)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            force_unmount(mnt)
        assert not is_mounted(mnt)


def test_second_signal_during_shutdown_is_harmless(tmp_path, image):
    proc, mnt, _sock = _start(tmp_path, image, 0)
    try:
        os.listdir(mnt)
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGTERM)
        _wait_exit(proc, tmp_path, 0, "three signals")
        assert not is_mounted(mnt)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        force_unmount(mnt)
