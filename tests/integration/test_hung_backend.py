"""One image's dead backend must not stall the other images of a shared daemon.

A real docker-registry sits behind ``FaultShim``, which accepts every blob GET and never answers
(``hang``): the backend of ``/hang`` is dead but connections succeed, so each read waits for the
full backend timeout. ``/fresh`` is served from localfs. With the default 4 ``--thread-num``,
eight parallel ``cat`` under ``/hang`` used to take every FUSE worker (and the kernel's background
request slots), so a read under ``/fresh`` waited ~28 s; and ``DELETE /api/v1/mount`` of ``/hang``
answered 204 while its readers stayed blocked until the backend timeout. Both FUSE sessions.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.harness.apiclient import ApiClient
from tests.harness.daemon import Nydusd
from tests.harness.images import build_daemon_image

pytestmark = pytest.mark.fuse

TIMEOUT = 10  # the hung backend's timeout: every wait on it would last this long


def _tree(root: Path, files: int, size: int, seed: int) -> Path:
    import random

    rnd = random.Random(seed)
    root.mkdir(parents=True)
    for i in range(files):
        (root / f"f{i}").write_bytes(rnd.randbytes(size))
    return root


def _wait_for(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture(params=[("ondemand", "llfuse"), ("prefetch", "llfuse"), ("ondemand", "own")],
                ids=["ondemand", "prefetch", "ondemand-own-session"])
def shared(request, tmp_path, registry_server, fault_shim):  # type: ignore[no-untyped-def]
    mode, session = request.param
    hang_src = _tree(tmp_path / "hang-src", 12, 3 << 20, seed=1)
    fresh_src = _tree(tmp_path / "fresh-src", 4, 300_000, seed=2)
    hang = build_daemon_image(hang_src, tmp_path / "hang-img", version=6)
    fresh = build_daemon_image(fresh_src, tmp_path / "fresh-img", version=6)
    repo = "nydus/hang"
    for blob in Path(hang.blob_dir).iterdir():
        registry_server.push_blob(repo, blob.read_bytes())
    backend = registry_server.backend_config(repo, host=fault_shim.netloc, timeout=TIMEOUT,
                                             connect_timeout=TIMEOUT, retry_limit=0)
    hang_cfg = json.dumps({"device": {"backend": {"type": "registry", "config": backend},
                                      "cache": {"type": "blobcache",
                                                "config": {"work_dir": str(tmp_path / "c1")}}},
                           "mode": "direct",
                           # prefetch workers stuck on the dead backend too (they are no FUSE workers)
                           "fs_prefetch": {"enable": mode == "prefetch", "threads_count": 4,
                                           "prefetch_all": True}})
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sock = str(tmp_path / "api.sock")
    # the own /dev/fuse session starts more workers as they are taken (the backend-wait reserve)
    with Nydusd(["--mountpoint", str(mnt), "--apisock", sock, "--fuse-session", session], mnt,
                log_path=tmp_path / "log", apisock=sock) as daemon:
        api = ApiClient(sock)
        assert api.mount("/hang", hang.bootstrap, hang_cfg)[0] == 204
        fault_shim.hang_all()
        assert api.mount("/fresh", fresh.bootstrap, fresh.config_text(tmp_path / "c2"))[0] == 204
        readers = [subprocess.Popen(["cat", str(mnt / "hang" / f"f{i}")], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE) for i in range(8)]
        try:
            # the readers are stuck on the dead backend (their reads and the readahead they
            # started share a few fetches, so there are fewer GETs than readers)
            _wait_for(lambda: fault_shim.hanging >= 1, 10, "a hanging blob GET")
            time.sleep(1.0)
            yield mnt, api, readers, fresh_src, daemon
        finally:
            fault_shim.release()
            for r in readers:
                r.kill()
                r.wait()
                r.stderr.close()


def test_hung_backend_does_not_stall_other_mounts(shared):  # type: ignore[no-untyped-def]
    mnt, _api, readers, fresh_src, daemon = shared
    for i in range(4):
        start = time.monotonic()
        data = subprocess.run(["cat", str(mnt / "fresh" / f"f{i}")], capture_output=True,
                              timeout=60, check=True).stdout
        took = time.monotonic() - start
        print(f"fresh read {i}: {took * 1000:.1f} ms")
        assert data == (fresh_src / f"f{i}").read_bytes()
        assert took < 0.5, f"a read of another image took {took:.2f} s behind the hung backend"
    assert all(r.poll() is None for r in readers)  # still waiting: nothing was failed early
    assert daemon.alive()


def test_umount_fails_in_flight_reads_promptly(shared):  # type: ignore[no-untyped-def]
    import threading

    mnt, api, readers, _fresh_src, daemon = shared
    answered: list[float] = []
    start = time.monotonic()
    deleting = threading.Thread(target=lambda: answered.append(
        (api.umount("/hang")[0], time.monotonic() - start)))
    deleting.start()
    for r in readers:
        r.wait(timeout=TIMEOUT * 3)
    took = time.monotonic() - start
    deleting.join(TIMEOUT * 3)
    print(f"in-flight reads ended {took * 1000:.1f} ms, DELETE answered {answered[0][1] * 1000:.1f} ms "
          "after the DELETE was sent")
    assert took < 2.0, f"in-flight reads ended {took:.2f} s after the umount (backend timeout {TIMEOUT} s)"
    assert answered[0][0] == 204 and answered[0][1] < 2.0, answered
    for r in readers:
        assert r.returncode != 0
        err = r.stderr.read().decode()
        assert "Input/output error" in err or "Stale file handle" in err, err
    assert not os.path.exists(mnt / "hang")
    assert (mnt / "fresh" / "f0").read_bytes()
    assert daemon.alive()
