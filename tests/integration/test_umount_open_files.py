"""Files held open across an umount or remount of their image (real nydusd, kernel FUSE, API).

Review finding: a read on such a file reached the closed cache (``ValueError: mmap closed or
invalid`` logged as ``fuse_handler_crashed``, EIO) and a running on-demand write could go through a
closed -- possibly reused -- cache descriptor. Now such a read answers ESTALE (or, if it raced the
umount itself, EIO from the closed cache), and the daemon never logs a handler crash.
"""

from __future__ import annotations

import errno
import os
import random
import threading
import time

import pytest

from tests.harness.apiclient import ApiClient
from tests.harness.daemon import Nydusd
from tests.harness.images import build_daemon_image, sample_tree

pytestmark = [pytest.mark.fuse, pytest.mark.usefixtures("fuse_session")]

MiB = 1 << 20


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("img")
    src = sample_tree(tmp / "src")
    return build_daemon_image(src, tmp / "img6", version=6), src


def daemon(tmp, threads: int = 4) -> tuple[Nydusd, ApiClient]:
    mnt = tmp / "mnt"
    mnt.mkdir()
    sock = str(tmp / "api.sock")
    d = Nydusd(["fuse", "--mountpoint", str(mnt), "--apisock", sock, "--thread-num", str(threads),
                "--log-level", "info"], mnt, log_path=tmp / "nydusd.log", apisock=sock)
    return d, ApiClient(sock)


def read_errno(fd: int, offset: int) -> int:
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the kernel must ask the daemon
    try:
        os.pread(fd, 4096, offset)
    except OSError as exc:
        return exc.errno or 0
    return 0


def test_read_of_file_open_across_umount_and_remount_is_estale(tmp_path, image):
    img, src = image
    want = (src / "dir" / "multi_chunk").read_bytes()
    d, api = daemon(tmp_path)
    mnt = tmp_path / "mnt"
    with d:
        cfg = img.config_text(tmp_path / "cache")
        assert api.mount("/a", img.bootstrap, cfg)[0] == 204
        fd = os.open(mnt / "a" / "dir" / "multi_chunk", os.O_RDONLY)
        try:
            assert os.pread(fd, 4096, 0) == want[:4096]
            assert api.umount("/a")[0] == 204
            assert read_errno(fd, 2 * MiB + 500_000) == errno.ESTALE
            assert read_errno(fd, 0) == errno.ESTALE
        finally:
            os.close(fd)
        # remount: a file opened on the old instance is stale; a new open reads the new one
        assert api.mount("/a", img.bootstrap, cfg)[0] == 204
        fd = os.open(mnt / "a" / "dir" / "multi_chunk", os.O_RDONLY)
        try:
            assert os.pread(fd, 4096, MiB) == want[MiB:MiB + 4096]
            status, body = api.request("PUT", "/api/v1/mount", {"source": img.bootstrap, "fs_type": "rafs",
                                                                "config": cfg}, mountpoint="/a")
            assert status == 204, body
            assert read_errno(fd, 3 * MiB) == errno.ESTALE
        finally:
            os.close(fd)
        assert (mnt / "a" / "dir" / "multi_chunk").read_bytes() == want
        assert api.info()["state"] == "RUNNING"
    log = (tmp_path / "nydusd.log").read_text()
    assert "fuse_handler_crashed" not in log and "Traceback" not in log
    assert "cache_write_failed" not in log


def test_reads_racing_umounts_never_crash_a_handler(tmp_path, image):
    """Readers keep reading (cold cache: on-demand fetches and writes) while their image is
    unmounted and another one mounted; every read gives the right bytes, ESTALE or EIO."""
    img, src = image
    want = (src / "dir" / "multi_chunk").read_bytes()
    d, api = daemon(tmp_path, threads=8)
    mnt = tmp_path / "mnt"
    bad: list[str] = []
    with d:
        for cycle in range(4):
            cache = tmp_path / f"cache{cycle}"
            assert api.mount("/a", img.bootstrap, img.config_text(cache))[0] == 204
            fds = [os.open(mnt / "a" / "dir" / "multi_chunk", os.O_RDONLY) for _ in range(4)]
            stop = threading.Event()

            def reader(fd: int, seed: int, stop: threading.Event = stop) -> None:
                rnd = random.Random(seed)
                while not stop.is_set():
                    off = rnd.randrange(len(want) - 4096)
                    try:
                        os.posix_fadvise(fd, off, 4096, os.POSIX_FADV_DONTNEED)
                        got = os.pread(fd, 4096, off)
                    except OSError as exc:
                        if exc.errno not in (errno.ESTALE, errno.EIO):
                            bad.append(f"errno {exc.errno}")
                        continue
                    if got != want[off:off + len(got)]:
                        bad.append(f"wrong bytes at {off}")

            threads = [threading.Thread(target=reader, args=(fd, cycle * 10 + i)) for i, fd in enumerate(fds)]
            for t in threads:
                t.start()
            try:
                time.sleep(0.1 + 0.1 * cycle)
                assert api.umount("/a")[0] == 204
                assert api.mount("/b", img.bootstrap, img.config_text(tmp_path / f"cacheb{cycle}"))[0] == 204
                time.sleep(0.2)
            finally:
                stop.set()
                for t in threads:
                    t.join(10)
                for fd in fds:
                    os.close(fd)
            assert (mnt / "b" / "dir" / "multi_chunk").read_bytes() == want
            assert api.umount("/b")[0] == 204
        assert api.info()["state"] == "RUNNING"
    assert not bad, bad[:5]
    log = (tmp_path / "nydusd.log").read_text()
    assert "fuse_handler_crashed" not in log and "Traceback" not in log
    assert "cache_write_failed" not in log
