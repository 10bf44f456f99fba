"""The README's first commands, run verbatim: ``nydus-image create`` into ``blobs/`` then ``nydusd``
with ``config/nydusd-config.localfs.json`` must serve the file data (not RUNNING with EIO on every
read). Placeholders filled by the test: ``rootfs/`` (made here), ``/mnt/img`` and
``/run/nydusd/api.sock`` (temporary paths). A localfs blob that is missing fails the mount."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.proc import ROOT, Nydusd

pytestmark = pytest.mark.fuse

README = (ROOT / "README.md").read_text()


def block_after(heading: str) -> list[str]:
    """Commands of the first ```sh block under ``heading`` (comments dropped, continuations joined)."""
    start = README.index(heading)
    body = re.search(r"```sh\n(.*?)```", README[start:], re.S)
    assert body is not None
    cmds: list[str] = []
    pending = ""
    for line in body.group(1).splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
        if not line.endswith("\\"):
            cmds.append(pending)
            pending = ""
    return cmds


def shell(cmd: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(["bash", "-ec", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "rootfs" / "etc").mkdir(parents=True)
    (tmp_path / "rootfs" / "etc" / "hello.txt").write_text("hello from the README\n")
    shutil.copytree(ROOT / "config", tmp_path / "config")
    return tmp_path


def nydusd_command(workdir: Path) -> list[str]:
    cmd = block_after("### nydusd: the daemon")[0]
    assert cmd.startswith("nydusd --config config/nydusd-config.localfs.json --bootstrap image.boot")
    cmd = cmd.replace("/mnt/img", str(workdir / "mnt"))
    cmd = cmd.replace("/run/nydusd/api.sock", str(workdir / "api.sock"))
    (workdir / "mnt").mkdir()
    return cmd.split()[1:]


def test_readme_build_then_nydusd_serves_the_data(workdir: Path) -> None:
    build = block_after("### nydus-image: build")
    assert build[:2] == ["mkdir -p blobs", "nydus-image create --fs-version 6 --compressor zstd "
                         "--bootstrap image.boot --blob-dir blobs/ rootfs/"]
    for cmd in build[:2]:
        r = shell(cmd, workdir)
        assert r.returncode == 0, r.stderr
    args = nydusd_command(workdir)
    daemon = Nydusd(args, workdir / "mnt", log_path=workdir / "nydusd.log", apisock=str(workdir / "api.sock"),
                    cwd=workdir)
    with daemon:
        assert (workdir / "mnt" / "etc" / "hello.txt").read_text() == "hello from the README\n"
    assert (workdir / "cache").is_dir()  # relative work_dir: next to the blobs, not /var/lib/nydus


def test_missing_localfs_blob_fails_the_mount_with_a_clear_error(workdir: Path) -> None:
    for cmd in block_after("### nydus-image: build")[:2]:
        assert shell(cmd, workdir).returncode == 0
    for blob in (workdir / "blobs").iterdir():
        blob.unlink()
    args = nydusd_command(workdir)
    r = subprocess.run([sys.executable, "-m", "nydusd", *args], cwd=workdir, capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 1
    expected = (r"nydusd: error: localfs blob [0-9a-f]{64} not found in blobs \(point the config's "
                r"backend.config.dir at the directory `nydus-image create --blob-dir` wrote\)")
    assert re.search(expected, r.stderr), r.stderr
    assert not os.path.ismount(workdir / "mnt")


def test_readme_shared_daemon_command_starts(workdir: Path) -> None:
    cmd = block_after("### nydusd: the daemon")[1]
    assert cmd == ("nydusd fuse --config config/nydusd-config.localfs.json --mountpoint /mnt/nydus "
                   "--apisock /run/nydusd/api.sock")
    sock = str(workdir / "api.sock")
    args = cmd.replace("/mnt/nydus", str(workdir / "mnt")).replace("/run/nydusd/api.sock", sock).split()[1:]
    (workdir / "mnt").mkdir()
    with Nydusd(args, workdir / "mnt", log_path=workdir / "nydusd.log", apisock=sock, cwd=workdir) as d:
        assert d.alive() and os.listdir(workdir / "mnt") == []
