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
import time
from pathlib import Path

import pytest

from tests.harness.daemon import ROOT, Nydusd, force_unmount

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


def _tar(path: Path, members: dict[str, bytes], mode: str = "w") -> None:
    import io
    import tarfile

    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_readme_nydus_image_block_runs_verbatim(workdir: Path) -> None:
    """Every command of the nydus-image block; the test makes ``rootfs/``, ``base.tar`` and
    ``layer.tar.gz`` (a whiteout of /etc/hello.txt plus a new file) and fills ``$BASE_BLOB_ID`` and
    ``$UPPER_BLOB_ID`` from the ``-J`` outputs, as the README says to."""
    import json

    (workdir / "rootfs" / "etc" / "os-release").write_text('PRETTY_NAME="README test"\n')
    _tar(workdir / "base.tar", {"etc/hello.txt": b"hello from the README\n", "etc/keep": b"kept\n"})
    _tar(workdir / "layer.tar.gz", {"etc/.wh.hello.txt": b"", "etc/new": b"new in the layer\n"}, "w:gz")
    cmds = block_after("### nydus-image: build")
    assert len(cmds) == 10 and cmds[-1].startswith("nydus-image merge ")
    env: dict[str, str] = {}
    for cmd in cmds:
        if "$BASE_BLOB_ID" in cmd:
            env = {name: json.loads((workdir / f"{layer}.json").read_text())["blobs"][-1]
                   for name, layer in (("BASE_BLOB_ID", "base"), ("UPPER_BLOB_ID", "upper"))}
        r = subprocess.run(["bash", "-ec", cmd], cwd=workdir, capture_output=True, text=True, timeout=120,
                           env={**os.environ, **env,
                                "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
        assert r.returncode == 0, f"{cmd}\n{r.stderr}"
        if cmd.startswith("nydus-image inspect"):
            stat = json.loads(r.stdout)
            assert stat["path"] == "/etc/os-release" and stat["size"] == 26, stat
    assert json.loads((workdir / "check.json").read_text())
    import tarfile

    with tarfile.open(workdir / "rootfs.tar") as tar:
        hello = tar.extractfile("etc/hello.txt")
        assert hello is not None and hello.read() == b"hello from the README\n"
    for boot in ("layered.boot", "merged.boot"):
        listing = subprocess.run([str(Path(sys.executable).parent / "nydus-image"), "inspect", boot, "-R",
                                  "ls /etc"], cwd=workdir, capture_output=True, text=True, timeout=60)
        assert listing.returncode == 0, listing.stderr
        assert "new" in listing.stdout and "hello.txt" not in listing.stdout, (boot, listing.stdout)


def trust_certificate(directory: Path, cert: Path) -> dict[str, str]:
    """Environment under which the tools (and the nydusd they start) trust ``cert`` as they trust
    a public CA: a ``sitecustomize`` on PYTHONPATH points certifi (requests' CA bundle) at a copy
    of its bundle with ``cert`` appended. The tools read no CA variables from the environment."""
    import certifi

    directory.mkdir()
    bundle = directory / "ca-bundle.pem"
    bundle.write_bytes(Path(certifi.where()).read_bytes() + b"\n" + cert.read_bytes())
    (directory / "sitecustomize.py").write_text(
        f"import certifi\ncertifi.where = lambda: {str(bundle)!r}\n")
    return {"PYTHONPATH": os.pathsep.join([str(directory), str(ROOT)])}


def test_readme_nydusify_block_runs_verbatim(tmp_path: Path) -> None:
    """``nydusify convert``, ``check`` and ``mount`` as the README writes them (no ``--*-insecure``:
    the registry serves https). Filled by the test: ``registry.example.com`` is a docker-registry on
    127.0.0.1 whose self-signed certificate the tools trust (``trust_certificate``), the source
    image is a one-file image pushed there, ``/mnt/alpine`` is a temporary directory."""
    import signal

    from tests.harness.oci_images import run, tool_env
    from tests.harness.oci_registry import Registry

    cmds = block_after("### nydusify: convert")
    assert [c.split()[1] for c in cmds] == ["convert", "check", "mount"]
    env = tool_env(tmp_path)
    layout, bundle = tmp_path / "oci", tmp_path / "bundle"
    run(["umoci", "init", "--layout", str(layout)], env)
    run(["umoci", "new", "--image", f"{layout}:3"], env)
    run(["umoci", "unpack", "--image", f"{layout}:3", str(bundle)], env)
    (bundle / "rootfs" / "etc").mkdir(parents=True)
    (bundle / "rootfs" / "etc" / "alpine-release").write_text("3.test\n")
    run(["umoci", "repack", "--image", f"{layout}:3", str(bundle)], env)
    mnt = tmp_path / "mnt"
    with Registry(tmp_path / "registry", tls=True) as reg:
        run(["skopeo", "--tmpdir", str(tmp_path / "home/run"), "copy", "--dest-tls-verify=false",
             f"oci:{layout}:3", f"docker://{reg.host}/library/alpine:3"], env)
        env = {**env, **trust_certificate(tmp_path / "trust", reg.cert),
               "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        fill = [c.replace("registry.example.com", reg.host).replace("/mnt/alpine", str(mnt)) for c in cmds]
        for cmd in fill[:2]:
            r = subprocess.run(["bash", "-ec", cmd], cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=180)
            assert r.returncode == 0, f"{cmd}\n{r.stderr}"
        with open(tmp_path / "mount.log", "wb") as log:
            proc = subprocess.Popen(["bash", "-ec", f"exec {fill[2]}"], cwd=tmp_path, env=env, stdout=log,
                                    stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while not os.path.ismount(mnt) and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.1)
            assert os.path.ismount(mnt), (tmp_path / "mount.log").read_text()
            assert (mnt / "etc" / "alpine-release").read_text() == "3.test\n"
            proc.send_signal(signal.SIGINT)  # Ctrl-C: unmount, remove ./tmp
            assert proc.wait(30) == 0, (tmp_path / "mount.log").read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            force_unmount(mnt)
    # Ctrl-C left nothing of the mount's behind (convert's own ./tmp work dir stays, empty)
    assert not os.path.ismount(mnt) and not (tmp_path / "tmp" / "nydusd").exists()
    assert not (tmp_path / "tmp" / "nydus_bootstrap").exists()


def test_readme_quick_start_is_accurate() -> None:
    """``make demo`` runs verbatim (setup is idempotent, then the demo mounts, reads and cleans up);
    ``make test`` does what its comment says: setup, ruff, mypy, then pytest."""
    start = README.index("## Quick start")
    body = re.search(r"```sh\n(.*?)```", README[start:], re.S)
    assert body is not None
    cmds = [line.split("#")[0].strip() for line in body.group(1).splitlines() if line.strip()]
    assert cmds == ["make demo", "make test"]
    assert "lint (ruff, mypy --strict) and run every test (pytest)" in body.group(1)
    r = subprocess.run(["make", "demo"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "nydusd is RUNNING" in r.stdout and "still mounted: False" in r.stdout
    plan = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    steps = [next(i for i, line in enumerate(plan.splitlines()) if word in line)
             for word in ("setup.sh", "ruff check", "mypy", "pytest")]
    assert steps == sorted(steps), plan
