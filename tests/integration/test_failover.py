"""Failover and hot upgrade with real kernel FUSE mounts: nydusd hands its /dev/fuse connection to a
supervisor written from the protocol description (``spec_supervisor.py``), is killed with SIGKILL
or asked to exit, and a successor takes the connection over while reader processes keep reading
files of the mounted images -- they must never see ENOTCONN/EIO or a wrong byte (policy
``resend``). The call sequences are the snapshotter's (interfaces.md §4.5)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness.apiclient import ApiClient
from tests.harness.daemon import ROOT, Nydusd, is_mounted
from tests.harness.images import build_daemon_image, sample_tree
from tests.harness.servers.content_server import ContentServer
from tests.harness.spec_supervisor import SpecSupervisor

pytestmark = pytest.mark.fuse


def file_hashes(src: Path, mnt: Path) -> dict[str, str]:
    out = {}
    for dirpath, _dirs, names in os.walk(src):
        for name in names:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                out[str(mnt / path.relative_to(src))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


class Readers:
    """``tests/harness/reader.py`` in a subprocess (a read blocked on a dead daemon must not
    block pytest)."""

    def __init__(self, tmp: Path, files: dict[str, str], threads: int = 4) -> None:
        self.stop = tmp / "readers.stop"
        self.progress = tmp / "readers.progress"
        spec = tmp / "readers.json"
        spec.write_text(json.dumps({"files": files, "threads": threads, "stop": str(self.stop),
                                    "progress": str(self.progress)}))
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.harness.reader", str(spec)],
                                     cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def passes(self) -> int:
        try:
            return int(self.progress.read_text() or 0)
        except (OSError, ValueError):
            return 0

    def wait_passes(self, n: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.passes() < n:
            assert self.proc.poll() is None, self.proc.stderr.read().decode()
            assert time.monotonic() < deadline, f"readers made {self.passes()} passes, not {n}"
            time.sleep(0.02)

    def finish(self, timeout: float = 60.0) -> dict:
        self.stop.write_text("")
        out, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, err.decode()
        return json.loads(out)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.proc.stdout.close()
        self.proc.stderr.close()


def wait_state(api: ApiClient, state: str, timeout: float) -> float:
    start = time.monotonic()
    while True:
        try:
            if api.info()["state"] == state:
                return time.monotonic() - start
        except (OSError, AssertionError):
            pass
        assert time.monotonic() - start < timeout, f"state {state} not reached"
        time.sleep(0.01)


def sendfd(api: ApiClient, sup: SpecSupervisor) -> None:
    t = sup.expect_sendfd()
    status, body = api.request("PUT", "/api/v1/daemon/fuse/sendfd")
    t.join(10)
    assert status == 204, body
    assert sup.error is None, sup.error


def takeover(api: ApiClient, sup: SpecSupervisor, misbehave: str | None = None) -> tuple[int, object]:
    t = sup.expect_takeover(misbehave)
    status, body = api.request("PUT", "/api/v1/daemon/fuse/takeover")
    t.join(10)
    return status, body


def resent_of(log: str) -> int:
    return sum(int(m.group(1)) for line in log.splitlines() if "fuse_session_done" in line
               for m in [re.search(r"resent[=\"': ]+(\d+)", line)] if m)


@pytest.fixture
def two_images(tmp_path):
    a = build_daemon_image(sample_tree(tmp_path / "src_a", seed=1), tmp_path / "img_a", version=6)
    b = build_daemon_image(sample_tree(tmp_path / "src_b", seed=2), tmp_path / "img_b", version=5)
    return {"/a": (tmp_path / "src_a", a), "/b": (tmp_path / "src_b", b)}


@pytest.fixture
def slow_blobs(two_images):
    """The images' blobs over HTTP, every GET stalled: a kill always finds reads in flight."""
    blobs = {}
    for _src, image in two_images.values():
        for name in os.listdir(image.blob_dir):
            blobs[name] = Path(image.blob_dir, name).read_bytes()
    server = ContentServer(blobs)
    server.delay = 0.3
    yield server
    server.stop()


def _http_config(server: ContentServer, cache: Path) -> str:
    return json.dumps({"version": 2, "backend": {"type": "http-proxy", "http-proxy": {
        "addr": server.url, "path": "/blobs", "retry_limit": 0}},
        "cache": {"type": "blobcache", "filecache": {"work_dir": str(cache)}},
        "rafs": {"mode": "direct", "validate": True}})


def _shared_args(tmp: Path, policy: str) -> list[str]:
    return ["fuse", "--thread-num", "4", "--id", "daemon-1", "--mountpoint", str(tmp / "mnt"),
            "--apisock", str(tmp / "api.sock"), "--log-level", "info",
            "--supervisor", str(tmp / "supervisor.sock"), "--failover-policy", policy]


def _start_shared(tmp: Path, images, policy: str, sup: SpecSupervisor, log: str,
                  server: ContentServer) -> tuple[Nydusd, ApiClient]:
    (tmp / "mnt").mkdir(exist_ok=True)
    d = Nydusd(_shared_args(tmp, policy), tmp / "mnt", log_path=tmp / log,
               apisock=str(tmp / "api.sock")).start()
    api = ApiClient(str(tmp / "api.sock"))
    wait_state(api, "RUNNING", 2)
    for path, (_src, image) in images.items():
        status, body = api.mount(path, image.bootstrap, _http_config(server, tmp / f"cache{path}"))
        assert status == 204, body
        sendfd(api, sup)  # the snapshotter calls sendfd after each mount
    return d, api


@pytest.mark.parametrize("policy", ["resend", "flush"])
def test_kill9_failover_readers_never_fail(tmp_path, two_images, slow_blobs, policy):
    sup = SpecSupervisor(str(tmp_path / "supervisor.sock"))
    first, api = _start_shared(tmp_path, two_images, policy, sup, "first.log", slow_blobs)
    mnt = tmp_path / "mnt"
    files = {}
    for path, (src, _image) in two_images.items():
        files.update(file_hashes(src, mnt / path.strip("/")))
    readers = Readers(tmp_path, files, threads=6)
    second = None
    try:
        deadline = time.monotonic() + 10
        while slow_blobs.active < 2:  # cold reads stalled in the backend = requests in flight
            assert time.monotonic() < deadline, "no read reached the backend"
            time.sleep(0.005)
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        killed = time.monotonic()
        assert is_mounted(mnt)
        # the snapshotter's failover flow: supervisor ready, same command WITHOUT --upgrade
        second = Nydusd(_shared_args(tmp_path, policy), mnt, log_path=tmp_path / "second.log",
                        apisock=str(tmp_path / "api.sock")).start(wait_mount=False)
        second.wait(lambda: os.path.exists(tmp_path / "api.sock") and _connectable(api), 30,
                    "the new API socket")
        wait_state(api, "INIT", 2)  # crash detected: no mount over the live one
        status, body = takeover(api, sup)
        assert status == 204, body
        assert api.info()["state"] == "READY"
        assert api.request("PUT", "/api/v1/daemon/start")[0] == 204
        wait_state(api, "RUNNING", 2)
        recovered = time.monotonic() - killed
        before = readers.passes()
        readers.wait_passes(before + 6)
        # the blob caches carry over: with the backend gone, every read is still served
        slow_blobs.stop()
        before = readers.passes()
        readers.wait_passes(before + 4)
        result = readers.finish()
        info = api.info()
        assert sorted(info["backend_collection"]) == ["/a", "/b"] and info["id"] == "daemon-1"
        for path in two_images:
            status, metrics = api.request("GET", "/api/v1/metrics", id=path)
            assert status == 200 and metrics["data_read"] > 0, metrics
            status, cache = api.request("GET", "/api/v1/metrics/blobcache", id=path)
            assert status == 200, cache
        second.proc.send_signal(signal.SIGTERM)
        assert second.proc.wait(10) == 0
        assert not is_mounted(mnt)
        resent = resent_of(second.log())
        assert result["mismatches"] == [], result
        assert result["reads"] > 100
        assert resent >= 1  # the stalled reads were re-sent to the new daemon
        if policy == "resend":
            assert result["errors"] == [], result
        else:  # flush: only the requests the dead daemon had in flight fail, with EIO
            assert len(result["errors"]) <= resent, (result, resent)
            assert all(" 5 " in e for e in result["errors"]), result
        print(f"policy={policy} recovered_in={recovered:.2f}s resent={resent} reads={result['reads']}")
        assert "fuse_handler_crashed" not in second.log()
    finally:
        for d in (second, first):
            if d is not None:
                d.cleanup()
        sup.close()  # the last holder of the connection: blocked readers get ENOTCONN now
        readers.kill()


def _connectable(api: ApiClient) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(api.sock_path)
        except OSError:
            return False
    return True


def _dedicated_args(tmp: Path, image, apisock: str, *extra: str) -> list[str]:
    cfg = image.write_config(tmp / "cfg.json", tmp / "cache")
    return ["fuse", "--config", cfg, "--bootstrap", image.bootstrap, "--mountpoint", str(tmp / "mnt"),
            "--apisock", apisock, "--id", "dedicated", "--supervisor", str(tmp / "supervisor.sock"),
            "--thread-num", "4", *extra]


def _proc_counts(pid: int) -> tuple[int, int]:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    threads = int(re.search(r"Threads:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))
    return fds, threads


def test_hot_upgrade_20_times_under_read_load(tmp_path):
    src = sample_tree(tmp_path / "src", seed=5)
    image = build_daemon_image(src, tmp_path / "img", version=6)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sup = SpecSupervisor(str(tmp_path / "supervisor.sock"))
    my_fds = len(os.listdir("/proc/self/fd"))
    sock0 = str(tmp_path / "api0.sock")
    old = Nydusd(_dedicated_args(tmp_path, image, sock0), mnt, log_path=tmp_path / "d0.log",
                 apisock=sock0).start()
    old_api = ApiClient(sock0)
    wait_state(old_api, "RUNNING", 2)
    readers = Readers(tmp_path, file_hashes(src, mnt), threads=4)
    daemons = [old]
    counts = []
    try:
        readers.wait_passes(2)
        for i in range(1, 21):
            sock = str(tmp_path / f"api{i}.sock")
            new = Nydusd(_dedicated_args(tmp_path, image, sock, "--upgrade"), mnt,
                         log_path=tmp_path / f"d{i}.log", apisock=sock).start(wait_mount=False)
            daemons.append(new)
            new.wait(lambda s=sock: os.path.exists(s), 15, "the API socket")
            api = ApiClient(sock)
            wait_state(api, "INIT", 5)
            sendfd(old_api, sup)
            status, body = takeover(api, sup)
            assert status == 204, (body, new.log())
            wait_state(api, "READY", 2)
            assert old_api.request("PUT", "/api/v1/daemon/exit")[0] == 204
            assert old.proc.wait(10) == 0, old.log()
            assert is_mounted(mnt)
            assert api.request("PUT", "/api/v1/daemon/start")[0] == 204
            wait_state(api, "RUNNING", 2)
            passes = readers.passes()
            readers.wait_passes(passes + 1)
            counts.append(_proc_counts(new.proc.pid))
            old, old_api = new, api
        result = readers.finish()
        assert result["errors"] == [] and result["mismatches"] == [], result
        assert result["reads"] > 200
        # no leak across generations: each new daemon holds what the second one held
        assert max(c[0] for c in counts[1:]) <= counts[0][0] + 2, counts
        assert max(c[1] for c in counts[1:]) <= counts[0][1] + 2, counts
        with open("/proc/self/mounts") as f:
            assert sum(1 for line in f if line.split()[1] == str(mnt)) == 1
        old.proc.send_signal(signal.SIGTERM)
        assert old.proc.wait(10) == 0
        assert not is_mounted(mnt)
        sup.close()
        assert len(os.listdir("/proc/self/fd")) <= my_fds + 1  # the supervisor let go of every fd
    finally:
        for d in reversed(daemons):
            d.cleanup()
        sup.close()
        readers.kill()


def test_supervisor_protocol_errors_are_clear_and_harmless(tmp_path):
    """Takeover from a supervisor that is not there, disappears, sends no fd, sends garbage or a
    truncated state: HTTP 500 naming the problem, the daemon stays INIT, keeps no stray fd, and a
    proper takeover afterwards still works. sendfd without a listening supervisor fails cleanly."""
    src = sample_tree(tmp_path / "src", big=False, seed=9)
    image = build_daemon_image(src, tmp_path / "img", version=6)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sock0, sock1 = str(tmp_path / "api0.sock"), str(tmp_path / "api1.sock")
    old = Nydusd(_dedicated_args(tmp_path, image, sock0), mnt, log_path=tmp_path / "d0.log",
                 apisock=sock0).start()
    new = Nydusd(_dedicated_args(tmp_path, image, sock1, "--upgrade"), mnt,
                 log_path=tmp_path / "d1.log", apisock=sock1)
    sup = None
    try:
        old_api, api = ApiClient(sock0), ApiClient(sock1)
        wait_state(old_api, "RUNNING", 5)
        status, body = old_api.request("PUT", "/api/v1/daemon/fuse/takeover")
        assert status == 400 and "UnexpectedEvent" in body["message"]
        status, body = old_api.request("PUT", "/api/v1/daemon/fuse/sendfd")  # nobody listens
        assert status == 500 and "cannot connect to the supervisor" in body["message"], body
        new.start(wait_mount=False)
        new.wait(lambda: os.path.exists(sock1), 30, "the API socket")
        wait_state(api, "INIT", 5)
        status, body = api.request("PUT", "/api/v1/daemon/fuse/takeover")
        assert status == 500 and "cannot connect to the supervisor" in body["message"], body
        sup = SpecSupervisor(str(tmp_path / "supervisor.sock"))
        sendfd(old_api, sup)
        null_before = _fd_targets(new.proc.pid).count("/dev/null")
        for misbehave, text in [("disappear", "received no control file descriptor"),
                                ("no-fd", "received no control file descriptor"),
                                ("garbage", "not ours"), ("truncated", "not ours")]:
            status, body = takeover(api, sup, misbehave)
            assert status == 500 and text in body["message"], (misbehave, body)
            assert body["message"].startswith("Upgrade(DaemonAbnormal(")
            assert api.info()["state"] == "INIT" and new.alive()
            targets = _fd_targets(new.proc.pid)  # every fd received on a failed takeover is closed
            assert "/dev/fuse" not in targets and targets.count("/dev/null") == null_before, targets
        assert not api.info()["backend_collection"]
        status, body = takeover(api, sup)
        assert status == 204, body
        assert api.info()["state"] == "READY"
        assert sorted(api.info()["backend_collection"]) == ["/"]
        status, body = takeover(api, sup)  # a second takeover is an illegal transition
        assert status == 400 and "UnexpectedEvent" in body["message"]
        assert old_api.request("PUT", "/api/v1/daemon/exit")[0] == 204
        assert old.proc.wait(10) == 0
        assert api.request("PUT", "/api/v1/daemon/start")[0] == 204
        wait_state(api, "RUNNING", 2)
        assert (mnt / "small.txt").read_bytes() == (src / "small.txt").read_bytes()
        new.proc.send_signal(signal.SIGTERM)
        assert new.proc.wait(10) == 0
        assert not is_mounted(mnt)
        assert "Traceback" not in new.log()
    finally:
        for d in (new, old):
            d.cleanup()
        if sup is not None:
            sup.close()


def _fd_targets(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return out


def test_sendfd_needs_a_supervisor(tmp_path):
    src = sample_tree(tmp_path / "src", big=False, seed=9)
    image = build_daemon_image(src, tmp_path / "img", version=6)
    (tmp_path / "mnt").mkdir()
    sock = str(tmp_path / "api.sock")
    args = _dedicated_args(tmp_path, image, sock)
    cut = args.index("--id")
    with Nydusd(args[:cut] + args[cut + 4:] + ["--fuse-session", "own"], tmp_path / "mnt",
                log_path=tmp_path / "d.log", apisock=sock):
        api = ApiClient(sock)
        wait_state(api, "RUNNING", 5)
        status, body = api.request("PUT", "/api/v1/daemon/fuse/sendfd")
        assert status == 500 and "no supervisor" in body["message"], body
    # llfuse cannot hand over: --supervisor with --fuse-session llfuse is refused up front
    proc = subprocess.run([sys.executable, "-m", "nydusd", *args, "--fuse-session", "llfuse"],
                          cwd=str(ROOT), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--supervisor needs the own FUSE session" in proc.stderr


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def test_nydusctl_supervise_restarts_a_killed_daemon(tmp_path):
    """The supervisor for people without the snapshotter: kill -9 its nydusd twice under a read
    load; each time it restarts nydusd with --upgrade and hands the session over: no read fails."""
    src = sample_tree(tmp_path / "src", seed=11)
    image = build_daemon_image(src, tmp_path / "img", version=6)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sock = str(tmp_path / "api.sock")
    cfg = image.write_config(tmp_path / "cfg.json", tmp_path / "cache")
    log = open(tmp_path / "supervise.log", "wb")  # noqa: SIM115 - handed to the child
    sup = subprocess.Popen(
        [sys.executable, "-m", "nydusd.cli.ctl", "-S", sock, "supervise", "--supervisor",
         str(tmp_path / "sup.sock"), "--sendfd-interval", "1", "--", sys.executable, "-m", "nydusd",
         "fuse", "--config", cfg, "--bootstrap", image.bootstrap, "--mountpoint", str(mnt),
         "--thread-num", "4"], cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT)
    log.close()
    readers = None
    try:
        api = ApiClient(sock)
        deadline = time.monotonic() + 30
        while not (is_mounted(mnt) and os.path.exists(sock) and _connectable(api)):
            assert sup.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "supervise.log").read_text()
            time.sleep(0.05)
        wait_state(api, "RUNNING", 10)
        readers = Readers(tmp_path, file_hashes(src, mnt), threads=4)
        readers.wait_passes(2)
        for _ in range(2):
            (victim,) = _children(sup.pid)
            os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while True:
                kids = [k for k in _children(sup.pid) if k != victim]
                if kids and _connectable(api) and api.info()["state"] == "RUNNING":
                    break
                assert time.monotonic() < deadline, (tmp_path / "supervise.log").read_text()
                time.sleep(0.05)
            passes = readers.passes()
            readers.wait_passes(passes + 2)
        result = readers.finish()
        assert result["errors"] == [] and result["mismatches"] == [], result
        text = (tmp_path / "supervise.log").read_text()
        assert text.count("supervised_daemon_restarted") == 2, text
        sup.send_signal(signal.SIGTERM)  # passed on: the daemon unmounts, the supervisor ends
        assert sup.wait(20) == 0
        assert not is_mounted(mnt)
    finally:
        if sup.poll() is None:
            for kid in _children(sup.pid):
                os.kill(kid, signal.SIGKILL)
            sup.kill()
            sup.wait()
        if readers is not None:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
            readers.kill()
