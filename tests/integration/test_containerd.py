"""End to end through containerd 1.6 and the real nydus-snapshotter v0.6.1 with our nydusd.

The snapshotter runs with its default settings (``log_to_stdout = false``, so every nydusd gets a
``--log-file`` in a directory nobody created; ``recover_policy = "restart"``) and starts
``.venv/bin/nydusd`` itself -- no wrapper. Both daemon modes: ``multiple`` (one nydusd per image,
started inside ``ctr run``) and ``shared`` (one nydusd, images attached through the API).

Per mode: ``nydus-rpull`` + ``ctr run --snapshotter nydus`` prints the file the container reads;
far less than the image was fetched and the registry's access log agrees byte for byte with
nydusd's ``/api/v1/metrics/backend``; a snapshotter restart keeps a running container serving and
new containers starting; removing the image tears the nydusd (multiple) or its instance (shared)
down; and after ``kill -9`` of nydusd the snapshotter's restart brings a working daemon back on the
dead FUSE mount. With ``recover_policy = "failover"`` a container running through the killed
nydusd keeps working: the snapshotter's successor takes the FUSE session over from its supervisor.

The snapshotter is built once by the rig's ``build.sh`` into ~/.cache/nydus-py/nydus-snapshotter
(about 45 s the first time, a no-op afterwards). Skipped when the rig directory is absent.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.containerd_rig import (
    BIG_SIZE,
    GREETING,
    AccessLogRegistry,
    SnapshotterRig,
    build_snapshotter,
    busybox_image,
    missing_tools,
)

pytestmark = [pytest.mark.fuse, pytest.mark.skipif(missing_tools() is not None,
                                                   reason=str(missing_tools()))]

MODES = ("multiple", "shared")


@pytest.fixture(scope="module")
def bin_dir() -> Path:
    return build_snapshotter()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AccessLogRegistry]:
    reg = AccessLogRegistry(tmp_path_factory.mktemp("registry")).start()
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory, registry: AccessLogRegistry) -> dict[str, Any]:
    return busybox_image(tmp_path_factory.mktemp("image"), registry)


@pytest.fixture
def rig_factory(bin_dir: Path) -> Iterator[Any]:
    rigs: list[SnapshotterRig] = []
    # a short state path: the snapshotter's API socket paths must fit in sun_path (108 bytes)
    work = Path(tempfile.mkdtemp(prefix="nydus-ctrd-"))

    def make(mode: str, recover_policy: str = "restart", zygote: bool = False) -> SnapshotterRig:
        rig = SnapshotterRig(work / mode, bin_dir, mode=mode, recover_policy=recover_policy,
                             namespace=f"nydus-py-test-{os.getpid()}", zygote=zygote)
        rigs.append(rig)
        return rig.start()

    try:
        yield make
    finally:
        for rig in rigs:
            rig.close()
        shutil.rmtree(work, ignore_errors=True)


def _daemons_running(rig: SnapshotterRig) -> bool:
    try:
        return bool(rig.api_socks()) and all(
            rig.api(s, "/api/v1/daemon")["state"] == "RUNNING" for s in rig.api_socks())
    except (OSError, RuntimeError):
        return False


def _ensure_watched(rig: SnapshotterRig) -> None:
    """Make sure the snapshotter watches its nydusd for death.

    v0.6.1 subscribes to a daemon's death only if its API socket appeared within ~3 s of the
    start (20 tries, 100 ms apart, plus jitter); on a loaded machine our nydusd can take longer.
    A snapshotter restart subscribes to the running daemon, so the recovery path is still what
    is tested."""
    (sock,) = rig.api_socks()
    if f"Nydusd {sock.parent.name} probably not started" not in rig.snapshotter_log():
        return
    monitors = rig.snapshotter_log().count("Run daemons monitor")
    rig.stop_snapshotter()
    rig.start_snapshotter()
    rig.wait_for(lambda: rig.snapshotter_log().count("Run daemons monitor") > monitors, 10,
                 "the restarted snapshotter's daemon monitor")


@pytest.mark.parametrize("mode", MODES)
def test_lazy_run_snapshotter_restart_and_image_removal(rig_factory: Any, registry: AccessLogRegistry,
                                                        image: dict[str, Any], mode: str) -> None:
    rig: SnapshotterRig = rig_factory(mode)
    ref = image["nydus"]
    rig.rpull(ref)
    mark = registry.mark()
    assert rig.run(ref, "c1", "/bin/cat", "/etc/greeting") == GREETING.decode()

    # lazy: the container's reads fetched a small part of the data blobs, and the registry's
    # access log and nydusd's backend metrics agree on how much
    data = image["data_blobs"]
    gets, fetched = registry.blob_gets(mark, set(data))
    assert 0 < fetched < 0.2 * sum(data.values()), (fetched, data)
    assert registry.blob_gets(mark) == (gets, fetched)  # nothing but data-blob ranges after the pull
    assert rig.backend_bytes() == fetched
    # the nydusd log went where the snapshotter asked, in a directory nobody created for it
    assert list((rig.root / "logs").glob("*/nydusd.log"))

    # snapshotter restart with a running container: the container keeps reading, new ones start
    rig.run_detached(ref, "c2", "/bin/sleep", "600")
    daemons = rig.nydusd_pids()
    rig.stop_snapshotter()
    rig.start_snapshotter()
    assert rig.nydusd_pids() == daemons  # reconnected to the running nydusd, none restarted
    out = rig.ctr("tasks", "exec", "--exec-id", "e1", "c2", "/bin/sha256sum", "/etc/greeting").stdout
    assert out.split()[0] == __import__("hashlib").sha256(GREETING).hexdigest()
    assert rig.run(ref, "c3", "/bin/cat", "/etc/greeting") == GREETING.decode()
    rig.kill_container("c2")

    # image removal: multiple mode destroys the image's nydusd, shared mode detaches the instance
    rig.ctr("images", "rm", "--sync", ref)
    if mode == "multiple":
        rig.wait_for(lambda: not rig.nydusd_pids(), 30, "the image's nydusd to be destroyed")
    else:
        (sock,) = rig.api_socks()
        rig.wait_for(lambda: not rig.api(sock, "/api/v1/daemon")["backend_collection"], 30,
                     "the shared nydusd to unmount the image")
        assert rig.nydusd_pids() == daemons


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_multiple_mode_daemons_forked_by_a_zygote(rig_factory: Any, image: dict[str, Any]) -> None:
    """``NYDUSD_ZYGOTE`` in the snapshotter's environment: every nydusd it starts is served by a fork
    of the warm zygote, and the snapshotter cannot tell (state poll, container, image removal)."""
    rig: SnapshotterRig = rig_factory("multiple", zygote=True)
    assert rig.zygote is not None
    ref = image["nydus"]
    rig.rpull(ref)
    assert rig.run(ref, "c1", "/bin/cat", "/etc/greeting") == GREETING.decode()
    (starter,) = rig.nydusd_pids()  # the process the snapshotter started and watches
    (daemon,) = _children(rig.zygote.pid)  # the one serving the image
    assert daemon != starter
    assert "zygote_forked" in rig._tail("zygote.out")
    # removal: the snapshotter's SIGTERM to its nydusd reaches the fork, which unmounts and exits
    rig.ctr("images", "rm", "--sync", ref)
    rig.wait_for(lambda: not rig.nydusd_pids() and not _children(rig.zygote.pid), 30,
                 "the image's nydusd and its fork to end")
    assert '"exit": 0' in rig._tail("zygote.out")


@pytest.mark.parametrize("mode", MODES)
def test_recover_policy_restart_after_kill9(rig_factory: Any, image: dict[str, Any], mode: str) -> None:
    """kill -9 leaves a dead FUSE mount (ENOTCONN) that the snapshotter fails to unmount; the
    nydusd it restarts on that mountpoint must serve (regression: "mountpoint is not a directory")."""
    rig: SnapshotterRig = rig_factory(mode)
    ref = image["nydus"]
    rig.rpull(ref)
    assert rig.run(ref, "c1", "/bin/cat", "/etc/greeting") == GREETING.decode()
    (victim,) = rig.nydusd_pids()
    _ensure_watched(rig)
    os.kill(victim, signal.SIGKILL)
    rig.wait_for(lambda: rig.nydusd_pids() not in ([], [victim]), 30, "a restarted nydusd")
    rig.wait_for(lambda: _daemons_running(rig), 30, "the restarted nydusd to be RUNNING")
    (successor,) = rig.nydusd_pids()
    assert successor != victim
    deadline = time.monotonic() + 30
    while True:  # shared mode: the snapshotter re-attaches the image right after the restart
        res = rig.ctr("run", "--snapshotter", "nydus", "--rm", ref, "c2", "/bin/cat", "/etc/greeting",
                      check=False)
        if res.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert res.stdout == GREETING.decode(), res.stderr + rig.snapshotter_log()[-3000:]
    # The snapshotter's unmount of the dead mount usually succeeds (the mount root's attributes are
    # cached, so its lstat() does not meet ENOTCONN); when it fails, the new nydusd detaches it.
    failed = "Can't umount" in rig.snapshotter_log()
    logs = "".join(p.read_text() for p in (rig.root / "logs").glob("*/nydusd.log"))
    assert ("stale_fuse_mount_detached" in logs) == failed


#: the reader loop of the failover test: reads an image file every 200 ms, notes every failure
READER = ("while :; do /bin/cat /etc/greeting > /last 2>> /errors || echo \"fail $?\" >> /errors; "
          "/bin/ls /bin /etc > /dev/null 2>> /errors || echo \"ls fail $?\" >> /errors; "
          "echo x >> /reads; /bin/sleep 0.2; done")


@pytest.mark.parametrize("mode", ("shared", "multiple", "multiple+zygote"))
def test_recover_policy_failover_after_kill9(rig_factory: Any, image: dict[str, Any], mode: str) -> None:
    """recover_policy = "failover": after kill -9 of nydusd the snapshotter starts a new one, which
    takes the FUSE connection over from the snapshotter's supervisor. A container running through
    it never notices: its reader loop logs no error (no ENOTCONN), it reads a file it never touched
    before (fetched lazily by the new daemon) with the right content, and new containers start.
    With a zygote, the kill -9 hits the process the snapshotter started, and its fork dies with it."""
    rig: SnapshotterRig = rig_factory(mode.removesuffix("+zygote"), recover_policy="failover",
                                      zygote=mode.endswith("+zygote"))
    ref = image["nydus"]
    rig.rpull(ref)
    rig.run_detached(ref, "c1", "/bin/sh", "-c", READER)
    (victim,) = rig.nydusd_pids()
    (sock,) = rig.api_socks()
    daemon_id = sock.parent.name
    cmdline = Path(f"/proc/{victim}/cmdline").read_bytes().split(b"\0")
    assert b"--supervisor" in cmdline and b"--id" in cmdline, cmdline
    # the snapshotter sends for the FUSE fd after the mount: the supervisor holds it before the kill
    rig.wait_for(lambda: "upgrade_state_sent" in _nydusd_logs(rig), 20, "sendfd to the supervisor")
    _ensure_watched(rig)

    def reads() -> int:
        res = rig.ctr("tasks", "exec", "--exec-id", f"r{time.monotonic_ns()}", "c1", "/bin/busybox",
                      "wc", "-l", "/reads", check=False)
        return int(res.stdout.split()[0]) if res.returncode == 0 else 0

    rig.wait_for(lambda: reads() > 0, 20, "the reader loop to start")
    before = reads()
    os.kill(victim, signal.SIGKILL)
    rig.wait_for(lambda: rig.nydusd_pids() not in ([], [victim]), 30, "a new nydusd")
    rig.wait_for(lambda: _daemons_running(rig), 30, "the new nydusd to be RUNNING")
    (successor,) = rig.nydusd_pids()
    assert successor != victim
    log = rig.snapshotter_log()
    logs = _nydusd_logs(rig)
    # the snapshotter's failover path: it sent the kept states to the successor, which took the
    # FUSE session over (nydusd log) -- no failure on the way
    failover = log[log.index(f"Do failover for daemon {daemon_id}"):]
    assert f"Supervisor {daemon_id} sends states" in failover, failover
    assert not any(e in failover for e in ("fail to takeover", "fail to start", "didn't reach state"))
    assert "upgrade_state_received" in logs and "takeover_done" in logs, logs[-3000:]
    assert "stale_fuse_mount_detached" not in logs  # ... and did not mount afresh
    assert "Can't umount" not in log  # the snapshotter did not tear the live mount down

    # the running container: a file it never read, fetched through the new daemon, is intact
    big = hashlib.sha256(random.Random(18).randbytes(BIG_SIZE)).hexdigest()
    out = rig.ctr("tasks", "exec", "--exec-id", "e1", "c1", "/bin/sha256sum", "/data/unused.bin").stdout
    assert out.split()[0] == big
    rig.wait_for(lambda: reads() > before + 10, 20, "the reader loop to go on")
    errors = rig.ctr("tasks", "exec", "--exec-id", "e2", "c1", "/bin/sh", "-c",
                     "/bin/cat /errors 2>/dev/null; /bin/cat /last").stdout
    assert errors == GREETING.decode(), errors
    # and a new container starts on the same image
    assert rig.run(ref, "c2", "/bin/cat", "/etc/greeting") == GREETING.decode()
    rig.kill_container("c1")


def _nydusd_logs(rig: SnapshotterRig) -> str:
    return "".join(p.read_text(errors="replace") for p in (rig.root / "logs").glob("*/nydusd.log"))
