"""nydusd with its HTTP API on a unix socket: the dedicated and shared (pseudo mount) daemon flows the
snapshotter drives, kernel cache invalidation on umount/remount, error isolation, exit without
umount, concurrency across mounts, and 300 mount/umount cycles without leaks."""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.harness.apiclient import ApiClient
from tests.harness.daemon import Nydusd, is_mounted, mount_line
from tests.harness.images import build_daemon_image, sample_tree
from tests.harness.treecmp import compare_trees

pytestmark = pytest.mark.fuse


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Read-only images shared by the tests of this module (none of them modifies a blob)."""
    tmp_path = tmp_path_factory.mktemp("images")
    src = sample_tree(tmp_path / "src")
    other = tmp_path / "src2"
    other.mkdir()
    (other / "small.txt").write_bytes(b"second image\n")
    return {"src": src, "v5": build_daemon_image(src, tmp_path / "img5", version=5),
            "v6": build_daemon_image(src, tmp_path / "img6", version=6),
            "other": build_daemon_image(other, tmp_path / "img_other", version=6)}


def shared_daemon(tmp: Path, *extra: str) -> tuple[Nydusd, ApiClient]:
    mnt = tmp / "mnt"
    mnt.mkdir(exist_ok=True)
    sock = str(tmp / "api.sock")
    d = Nydusd(["fuse", "--mountpoint", str(mnt), "--apisock", sock, "--thread-num", "4",
                "--log-level", "info", *extra], mnt, log_path=tmp / "nydusd.log", apisock=sock)
    return d, ApiClient(sock)


def test_dedicated_daemon_api_and_metrics(tmp_path, images):
    image = images["v6"]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sock = str(tmp_path / "api.sock")
    cfg = image.write_config(tmp_path / "cfg.json", tmp_path / "cache", iostats_files=True,
                             access_pattern=True, latest_read_files=True)
    with Nydusd(["fuse", "--config", cfg, "--bootstrap", image.bootstrap, "--mountpoint", str(mnt),
                 "--apisock", sock, "--id", "abc", "--supervisor", str(tmp_path / "sup.sock"),
                 "--failover-policy", "resend"], mnt, log_path=tmp_path / "log", apisock=sock) as d:
        api = ApiClient(sock)
        info = api.info()  # the socket exists only once the daemon is RUNNING
        assert info["state"] == "RUNNING" and info["id"] == "abc"
        assert list(info["backend_collection"]) == ["/"]
        data = (mnt / "dir" / "multi_chunk").read_bytes()
        reads = api.request("GET", "/api/v1/metrics")[1]["fop_hits"][4]
        assert (mnt / "dir" / "multi_chunk").read_bytes() == data  # re-open: kept page cache
        assert api.request("GET", "/api/v1/metrics")[1]["fop_hits"][4] == reads
        status, fs = api.request("GET", "/api/v1/metrics")
        assert status == 200 and fs["id"] == "/" and fs["data_read"] >= len(data)
        assert fs["fop_hits"][4] > 0 and fs["files_account_enabled"] is True
        status, backend = api.request("GET", "/api/v1/metrics/backend", id="/")
        assert status == 200 and backend["backend_type"] == "localfs" and backend["read_count"] > 0
        status, cache = api.request("GET", "/api/v1/metrics/blobcache")
        assert status == 200 and cache["underlying_files"]
        status, pattern = api.request("GET", "/api/v1/metrics/pattern")
        assert status == 200 and pattern and pattern[0]["nr_read"] >= 1
        status, sb = api.request("GET", "/api/v1/daemon/backend", mountpoint="/")
        assert status == 200 and sb["magic"] == 0xE0F5E1E2 and sb["chunk_size"] == 1 << 20
        assert sb["inodes_count"] > 50 and sb["attr_timeout"]["secs"] > 0
        status, _ = api.request("PUT", "/api/v1/daemon", {"log_level": "debug"})
        assert status == 204
        status, body = api.request("PUT", "/api/v1/daemon/start")
        assert status == 400  # already RUNNING
    assert d.proc.returncode == 0 and not is_mounted(mnt)
    assert not os.path.exists(sock)


def test_shared_daemon_mounts_umounts_and_invalidates(tmp_path, images):
    d, api = shared_daemon(tmp_path)
    mnt = Path(d.mountpoint)
    with d:
        assert api.info()["state"] == "RUNNING" and os.listdir(mnt) == []
        cfg5 = images["v5"].config_text(tmp_path / "cache5")
        cfg6 = images["v6"].config_text(tmp_path / "cache6")
        assert api.mount("/pseudo_1", images["v5"].bootstrap, cfg5)[0] == 204
        assert api.mount("/x/y/z", images["v6"].bootstrap, cfg6)[0] == 204
        assert (mnt / "x" / "y" / "z").is_dir()  # stat-able right after the POST
        assert compare_trees(images["src"], mnt / "pseudo_1") > 50
        assert compare_trees(images["src"], mnt / "x" / "y" / "z") > 50
        status, body = api.mount("/pseudo_1", images["v5"].bootstrap, cfg5)
        assert status >= 400 and "already exists" in body["message"]
        # the kernel has cached these entries (long timeouts); DELETE must invalidate them
        assert (mnt / "pseudo_1" / "small.txt").exists()
        assert api.umount("/pseudo_1")[0] == 204
        assert not (mnt / "pseudo_1").exists()
        assert not (mnt / "pseudo_1" / "small.txt").exists()
        assert sorted(os.listdir(mnt)) == ["x"]
        assert api.umount("/pseudo_1")[0] >= 400
        # remount swaps the image in place; the new content is visible immediately
        assert (mnt / "x" / "y" / "z" / "small.txt").read_bytes() == b"hello nydus\n"
        status, _ = api.request("PUT", "/api/v1/mount", {"source": images["other"].bootstrap,
                                "fs_type": "rafs", "config": images["other"].config_text(None)},
                                mountpoint="/x/y/z")
        assert status == 204
        assert (mnt / "x" / "y" / "z" / "small.txt").read_bytes() == b"second image\n"
        assert not (mnt / "x" / "y" / "z" / "dir").exists()
        status, fs = api.request("GET", "/api/v1/metrics", id="/x/y/z")
        assert status == 200 and fs["id"] == "/x/y/z"
        assert api.request("GET", "/api/v1/metrics")[0] == 200  # exactly one fs left
        with open("/proc/self/mounts") as f:
            lines = [line for line in f if line.split()[1] == str(mnt)]
        assert len(lines) == 1 and lines[0].split()[2] == "fuse"


def test_bad_mounts_leave_daemon_and_other_mounts_working(tmp_path, images, logs):
    d, api = shared_daemon(tmp_path)
    mnt = Path(d.mountpoint)
    with d:
        cfg = images["v6"].config_text(tmp_path / "cache")
        assert api.mount("/good", images["v6"].bootstrap, cfg)[0] == 204
        corrupt = tmp_path / "corrupt.boot"
        corrupt.write_bytes(os.urandom(16384))
        status, body = api.mount("/bad", str(corrupt), cfg)
        assert status == 500 and body["message"]
        status, body = api.mount("/missing", str(tmp_path / "nope.boot"), cfg)
        assert status >= 400
        status, body = api.mount("/badcfg", images["v6"].bootstrap, "{not json")
        assert status >= 400
        assert not (mnt / "bad").exists()
        assert (mnt / "good" / "small.txt").read_bytes() == b"hello nydus\n"
        status, events = api.request("GET", "/api/v1/daemon/events")
        assert status == 200 and events["total_errors"] >= 1
        assert d.alive() and api.info()["state"] == "RUNNING"


def test_exit_api_leaves_the_mount_for_a_successor(tmp_path, images):
    d, api = shared_daemon(tmp_path)
    mnt = Path(d.mountpoint)
    try:
        d.start()
        assert api.mount("/m", images["v6"].bootstrap, images["v6"].config_text(None))[0] == 204
        status, _ = api.request("PUT", "/api/v1/daemon/exit")
        assert status == 204
        assert d.proc.wait(10) == 0
        assert is_mounted(mnt)  # not unmounted: the kernel mount stays for the successor
        assert mount_line(mnt)[0] == "rafs"
    finally:
        d.cleanup()
    assert not is_mounted(mnt)


def _reader(mounts, files, deadline, errors, counter, seed):
    rnd = random.Random(seed)
    fds = {}
    try:
        while time.monotonic() < deadline:
            mp = rnd.choice(mounts)
            rel, data = rnd.choice(files)
            path = os.path.join(mp, rel)
            fd = fds.get(path)
            if fd is None:
                fd = fds[path] = os.open(path, os.O_RDONLY)
            off = rnd.randrange(0, max(1, len(data)))
            size = rnd.choice((1, 511, 4096, 65536, 200_000))
            got = os.pread(fd, size, off)
            if got != data[off:off + size]:
                errors.append(f"{path}@{off}+{size}: wrong bytes")
                return
            counter.append(len(got))
    except Exception as e:  # noqa: BLE001 - reported to the test thread
        errors.append(repr(e))
    finally:
        for fd in fds.values():
            os.close(fd)


def run_concurrency(tmp_path, images, seconds: float) -> None:
    d, api = shared_daemon(tmp_path)
    mnt = Path(d.mountpoint)
    src = images["src"]
    files = [(str(p.relative_to(src)), p.read_bytes()) for p in sorted(src.rglob("*"))
             if p.is_file() and not p.is_symlink() and p.stat().st_size > 0 and p.name != "fifo"]
    with d:
        mounts = []
        for i, key in enumerate(["v5", "v6", "v5", "v6"]):
            cfg = images[key].config_text(tmp_path / f"cache{i}" if i % 2 == 0 else None)
            assert api.mount(f"/m{i}", images[key].bootstrap, cfg)[0] == 204
            mounts.append(str(mnt / f"m{i}"))
        errors: list[str] = []
        counter: list[int] = []
        deadline = time.monotonic() + seconds
        threads = [threading.Thread(target=_reader, args=(mounts, files, deadline, errors, counter, i))
                   for i in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 60)
        assert not errors, errors[:5]
        assert len(counter) > 500 and d.alive()
        for i in range(4):
            status, fs = api.request("GET", "/api/v1/metrics", id=f"/m{i}")
            assert status == 200 and fs["fop_errors"][4] == 0


def test_concurrent_reads_on_four_mounts(tmp_path, images):
    run_concurrency(tmp_path, images, seconds=8)


@pytest.mark.slow
def test_concurrent_reads_on_four_mounts_long(tmp_path, images):
    if not os.environ.get("NYDUS_SLOW_TESTS"):
        pytest.skip("set NYDUS_SLOW_TESTS=1 for the 30 s variant")
    run_concurrency(tmp_path, images, seconds=30)


def test_three_hundred_api_mount_cycles(tmp_path, images):
    d, api = shared_daemon(tmp_path)
    mnt = Path(d.mountpoint)
    image = images["v6"]
    cfg = image.config_text(tmp_path / "cache")
    with d:
        pid = d.proc.pid

        def fds() -> int:
            return len(os.listdir(f"/proc/{pid}/fd"))

        def threads() -> int:
            return len(os.listdir(f"/proc/{pid}/task"))

        assert api.mount("/warm", image.bootstrap, cfg)[0] == 204
        (mnt / "warm" / "small.txt").read_bytes()
        assert api.umount("/warm")[0] == 204
        base_fds, base_threads = fds(), threads()
        for i in range(300):
            mp = f"/snap{i % 5}"
            assert api.mount(mp, image.bootstrap, cfg)[0] == 204
            if i % 10 == 0:
                assert (mnt / mp.strip("/") / "small.txt").read_bytes() == b"hello nydus\n"
            else:
                assert (mnt / mp.strip("/")).is_dir()
            assert api.umount(mp)[0] == 204
        assert os.listdir(mnt) == []
        assert fds() <= base_fds + 2
        assert threads() <= base_threads + 1
        assert api.mount("/final/nested", image.bootstrap, cfg)[0] == 204
        assert (mnt / "final" / "nested" / "small.txt").read_bytes() == b"hello nydus\n"


def test_sigint_unmounts_too(tmp_path):
    d, api = shared_daemon(tmp_path)
    try:
        d.start()
        d.proc.send_signal(2)
        assert d.proc.wait(10) == 0
        assert not is_mounted(d.mountpoint)
    finally:
        d.cleanup()
    subprocess.run(["true"], check=True)


def test_upgrade_mode_stays_init_until_exit(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sock = str(tmp_path / "api.sock")
    log = tmp_path / "nydusd"
    d = Nydusd(["fuse", "--mountpoint", str(mnt), "--apisock", sock, "--upgrade", "--log-file",
                str(log)], mnt, log_path=tmp_path / "out", apisock=sock)
    try:
        d.start(wait_mount=False)
        d.wait(lambda: os.path.exists(sock), 15, "the API socket")
        api = ApiClient(sock)
        assert api.info()["state"] == "INIT"
        assert not is_mounted(mnt)  # upgrade mode does not mount: it waits for a takeover
        assert api.request("PUT", "/api/v1/daemon/start")[0] == 400
        assert api.request("GET", "/api/v1/metrics/inflight")[0] == 204
        assert api.request("PUT", "/api/v1/daemon/exit")[0] == 204
        assert d.proc.wait(10) == 0
        assert (tmp_path / "nydusd.log").exists()  # ".log" appended to an extension-less name
    finally:
        d.cleanup()


def test_restart_after_crash_detects_failover_and_stays_init(tmp_path, images):
    """A daemon with a supervisor killed with SIGKILL leaves its mount and a dead socket; the next one
    started with the same arguments must not mount over it but wait in INIT for a takeover (spec
    §1.6). Without a supervisor the dead mount is replaced instead (test_startup_paths.py)."""
    image = images["v6"]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sock = str(tmp_path / "api.sock")
    cfg = image.write_config(tmp_path / "cfg.json", None)
    args = ["fuse", "--config", cfg, "--bootstrap", image.bootstrap, "--mountpoint", str(mnt),
            "--apisock", sock, "--id", "d1", "--supervisor", str(tmp_path / "sup.sock")]
    first = Nydusd(args, mnt, log_path=tmp_path / "log1", apisock=sock)
    second = Nydusd(args, mnt, log_path=tmp_path / "log2", apisock=sock)
    try:
        first.start()
        first.proc.kill()
        first.proc.wait(10)
        assert is_mounted(mnt) and os.path.exists(sock)
        second.start(wait_mount=False)
        second.wait(lambda: ApiClient(sock).request("GET", "/api/v1/daemon")[0] == 200
                    if _connectable(sock) else False, 15, "the new API socket")
        assert ApiClient(sock).info()["state"] == "INIT"
        assert "previous_daemon_crashed" in second.log()
        assert ApiClient(sock).request("PUT", "/api/v1/daemon/exit")[0] == 204
        assert second.proc.wait(10) == 0
    finally:
        second.cleanup()
        first.cleanup()


def _connectable(path: str) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def test_remount_of_the_root_image(tmp_path, images):
    image = images["v6"]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sock = str(tmp_path / "api.sock")
    cfg = image.write_config(tmp_path / "cfg.json", None)
    with Nydusd(["fuse", "--config", cfg, "--bootstrap", image.bootstrap, "--mountpoint", str(mnt),
                 "--apisock", sock], mnt, log_path=tmp_path / "log", apisock=sock):
        api = ApiClient(sock)
        assert (mnt / "small.txt").read_bytes() == b"hello nydus\n"
        assert (mnt / "dir").is_dir()
        status, body = api.request("PUT", "/api/v1/mount", {"source": images["other"].bootstrap,
                                   "fs_type": "rafs", "config": images["other"].config_text(None)},
                                   mountpoint="/")
        assert status == 204, body
        assert (mnt / "small.txt").read_bytes() == b"second image\n"
        assert not (mnt / "dir").exists()
        assert sorted(os.listdir(mnt)) == ["small.txt"]


def test_mount_churn_under_read_load(tmp_path, images):
    """Readers hammer two mounts while a third is mounted, read and unmounted over and over (also
    under the readers' feet): the steady mounts never see an error, the churned one only ENOENT /
    ESTALE / EIO, and no handler ever crashes."""
    d, api = shared_daemon(tmp_path)
    mnt = Path(d.mountpoint)
    src = images["src"]
    files = [(str(p.relative_to(src)), p.read_bytes()) for p in sorted((src / "dir" / "sub").glob("f*"))]
    cfg = images["v6"].config_text(None)
    with d:
        for mp in ("/s0", "/s1"):
            assert api.mount(mp, images["v6"].bootstrap, cfg)[0] == 204
        stop = threading.Event()
        errors: list[str] = []

        def reader(seed: int, roots: list[str], tolerated: tuple[int, ...]) -> None:
            rnd = random.Random(seed)
            while not stop.is_set():
                rel, data = rnd.choice(files)
                try:
                    with open(mnt / rnd.choice(roots) / rel, "rb") as f:
                        if f.read() != data:
                            errors.append(f"wrong bytes in {rel}")
                except OSError as e:
                    if e.errno not in tolerated:
                        errors.append(repr(e))

        steady = [threading.Thread(target=reader, args=(i, ["s0", "s1"], ())) for i in range(6)]
        churn = [threading.Thread(target=reader, args=(100 + i, ["c"], (2, 5, 116))) for i in range(2)]
        for t in steady + churn:
            t.start()
        try:
            for _ in range(40):
                assert api.mount("/c", images["v6"].bootstrap, cfg)[0] == 204
                time.sleep(0.02)
                assert api.umount("/c")[0] == 204
        finally:
            stop.set()
            for t in steady + churn:
                t.join(30)
        assert errors == []
        assert d.alive() and "fuse_handler_crashed" not in (tmp_path / "nydusd.log").read_text()
