"""The own session's worker pool over a real kernel mount (``DevFuseSession`` in this process, so
its threads can be counted): ``--thread-num`` workers read requests however busy they are -- more
readers than concurrent requests only hand each request to a sleeping worker (issue #17: 4 fio
jobs grew the pool to ~60 threads and the IOPS fell) -- and a worker about to wait on a backend
brings in another reader, so one image's hung backend never stalls another image's reads; once
the backend answers, the extra workers end."""

from __future__ import annotations

import mmap
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nydusd.config import load_config
from nydusd.daemon.instance import build_rafs_instance
from nydusd.fs import devfuse
from nydusd.fs.devfuse import DevFuseSession
from nydusd.fs.vfs import Vfs
from nydusd.storage import waits
from nydusd.storage.backend.localfs import LocalFsBackend
from tests.harness.daemon import is_mounted
from tests.harness.images import build_daemon_image

pytestmark = pytest.mark.fuse

THREADS = 2
CHUNK = 1 << 20
BLOCK = 4096


#: a reader process: random O_DIRECT 4 KiB reads of files f0..f3 for 1.5 s, each compared with the
#: source; prints how many it made
READER = r"""
import mmap, os, random, sys, time
mnt, src, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rnd, buf, n = random.Random(seed), mmap.mmap(-1, 4096), 0
data = [open(os.path.join(src, f"f{i}"), "rb").read() for i in range(4)]
fds = [os.open(os.path.join(mnt, f"f{i}"), os.O_RDONLY | os.O_DIRECT) for i in range(4)]
end = time.monotonic() + 1.5
while time.monotonic() < end:
    i = rnd.randrange(4)
    off = rnd.randrange(len(data[i]) // 4096) * 4096
    assert os.preadv(fds[i], [buf], off) == 4096 and buf[:] == data[i][off:off + 4096], (i, off)
    n += 1
print(n)
"""


def _workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("fuse-worker-")]


def _wait_for(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _direct_read(path: Path, offset: int, size: int = BLOCK) -> bytes:
    """One read that reaches the daemon (O_DIRECT: no page cache, no readahead)."""
    buf = mmap.mmap(-1, size)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        n = os.preadv(fd, [buf], offset)
        return buf[:n]
    finally:
        os.close(fd)
        buf.close()


@pytest.fixture
def served(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """A session with two images: ``/warm`` (its blob cache filled) and ``/hang`` (a localfs
    backend that blocks while ``gate`` is clear); yields (mnt, session, sources, gate)."""
    monkeypatch.setattr(devfuse, "RETIRE_SECONDS", 0.3, raising=False)
    rnd = random.Random(7)
    sources, instances = {}, []
    vfs = Vfs()
    for name in ("warm", "hang"):
        src = tmp_path / f"{name}-src"
        src.mkdir()
        for i in range(4):
            (src / f"f{i}").write_bytes(rnd.randbytes(4 * CHUNK))
        img = build_daemon_image(src, tmp_path / f"{name}-img")
        cfg = load_config(img.config_text(tmp_path / f"{name}-cache", digest_validate=False))
        inst = build_rafs_instance(f"/{name}", img.bootstrap, cfg)
        instances.append(inst)
        vfs.attach(f"/{name}", inst.fs, inst.stats)
        sources[name] = (src, img.blob_dir)
    gate = threading.Event()
    gate.set()
    hang_dir = sources["hang"][1]
    real_read = LocalFsBackend.try_read

    def try_read(self, blob_id, offset, size, *, prefetch=False):  # type: ignore[no-untyped-def]
        if self.dir == hang_dir:
            gate.wait(30)
        return real_read(self, blob_id, offset, size, prefetch=prefetch)
    monkeypatch.setattr(LocalFsBackend, "try_read", try_read)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    # the reserve the daemon gives it: one worker per possible backend wait
    session = DevFuseSession(vfs, str(mnt), threads=THREADS, max_threads=THREADS + waits.limits()[1])
    session.mount()
    runner = threading.Thread(target=session.run, daemon=True)
    runner.start()
    try:
        for i in range(4):  # fill the warm image's cache
            assert (mnt / "warm" / f"f{i}").read_bytes() == (sources["warm"][0] / f"f{i}").read_bytes()
        yield mnt, session, {k: v[0] for k, v in sources.items()}, gate
    finally:
        gate.set()
        session.stop("test done")
        runner.join(10)
        session.close()
        for inst in instances:
            inst.close()
    assert not runner.is_alive()
    assert not _workers()
    assert not is_mounted(mnt)


def test_busy_workers_start_no_more_and_a_hung_backend_brings_in_readers(served):  # type: ignore[no-untyped-def]
    mnt, session, sources, gate = served
    warm, warm_src = mnt / "warm", sources["warm"]
    expected = {i: (warm_src / f"f{i}").read_bytes() for i in range(4)}
    # filling the cache waited on the backend: the workers started meanwhile are gone by now
    _wait_for(lambda: len(_workers()) == THREADS, 10, "the fill's extra workers to end")

    # four concurrent readers of warm data (processes: this one's GIL would serialize them), each
    # request reaching the daemon: every worker is busy most of the time, yet none is added (the
    # old pool grew by one whenever all were busy)
    readers = [subprocess.Popen([sys.executable, "-c", READER, str(warm), str(warm_src), str(seed)],
                                stdout=subprocess.PIPE, text=True) for seed in range(4)]
    most = 0
    while any(r.poll() is None for r in readers):
        most = max(most, len(_workers()))
        time.sleep(0.002)
    counts = [int(r.communicate()[0]) for r in readers]
    assert all(r.returncode == 0 for r in readers)
    assert min(counts) > 50, counts
    assert most == THREADS, f"{most} workers for {THREADS} threads and 4 warm readers"

    # the backend of /hang stops answering: each reader waiting on it takes a worker, and another
    # reader comes in for it, so a read of /warm is served at once meanwhile
    gate.clear()
    hung: list[bytes] = []
    blocked = [threading.Thread(target=lambda i=i: hung.append(_direct_read(mnt / "hang" / f"f{i}", 0)))
               for i in range(3)]
    for t in blocked:
        t.start()
    _wait_for(lambda: session._blocked == 3, 10, "three workers waiting on the hung backend")
    assert len(_workers()) == THREADS + 3
    for i in range(4):
        start = time.monotonic()
        assert _direct_read(warm / f"f{i}", BLOCK) == expected[i][BLOCK:2 * BLOCK]
        assert time.monotonic() - start < 0.5
    assert not hung and all(t.is_alive() for t in blocked)

    # the backend answers: the waits end, the extra workers park, and end unneeded
    gate.set()
    for t in blocked:
        t.join(10)
    assert sorted(hung) == sorted((sources["hang"] / f"f{i}").read_bytes()[:BLOCK] for i in range(3))
    _wait_for(lambda: len(_workers()) == THREADS, 10, "the extra workers to end")
    assert _direct_read(warm / "f0", 0) == expected[0][:BLOCK]
    assert session._blocked == 0 and len(_workers()) == THREADS
