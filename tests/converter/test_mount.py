"""`nydusify mount`: nydusd serves the converted image from the registry (registry backend); every
file of the FUSE mount is compared with the rootfs umoci unpacks from the OCI source."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nydusd.converter.rootfs import compare, dir_rootfs
from tests.converter.conftest import Image, docker_config
from tests.converter.test_convert import check, convert
from tests.harness.daemon import force_unmount, is_mounted
from tests.harness.oci_images import skopeo_push, unpack_rootfs
from tests.harness.oci_registry import Registry
from tests.harness.servers.registry import PASSWORD, USER

ROOT = Path(__file__).resolve().parents[2]


def _mount_and_compare(target: str, rootfs: Path, tmp_path: Path, env: dict[str, str],
                       extra: tuple[str, ...] = ()) -> int:
    mnt = tmp_path / "mnt"
    cmd = [sys.executable, "-m", "nydusd.cli.convert", "--log-level", "warn", "mount", "--target", target,
           "--plain-http", "--mount-path", str(mnt), "--work-dir", str(tmp_path / "work"),
           "--nydusd", f"{sys.executable} -m nydusd", *extra]
    log = open(tmp_path / "nydusify.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, **env, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 40
        while not is_mounted(mnt):
            assert proc.poll() is None, (tmp_path / "nydusify.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "nydusify.log").read_text()
            time.sleep(0.05)
        # st_mode, owner, size, rdev, symlink target, xattrs, content of every path (as check does)
        want, got = dir_rootfs(rootfs), dir_rootfs(mnt)
        assert compare(want, got) == []
        count = len(want)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, (tmp_path / "nydusify.log").read_text()
        assert not is_mounted(mnt)
        return count
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        force_unmount(mnt)
        log.close()


@pytest.fixture(scope="module")
def oci_rootfs_dir(source_image: Image, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return unpack_rootfs(source_image.tmp, source_image.layout, "v1", tmp_path_factory.mktemp("unpack") / "b")


@pytest.mark.fuse
@pytest.mark.parametrize("fs_version", [5, 6])
def test_mount_matches_umoci_rootfs(registry: Registry, source_image: Image, oci_rootfs_dir: Path,
                                    tmp_path: Path, fs_version: int) -> None:
    target = f"{registry.host}/mount/texture:v{fs_version}"
    convert(source_image.ref, target, tmp_path / "conv", fs_version=fs_version)
    assert _mount_and_compare(target, oci_rootfs_dir, tmp_path, {"HOME": str(tmp_path)}) >= 25


@pytest.mark.fuse
@pytest.mark.parametrize("mode", ["htpasswd", "token"])
def test_mount_with_registry_auth(request: pytest.FixtureRequest, mode: str, source_image: Image,
                                  oci_rootfs_dir: Path, tmp_path: Path) -> None:
    server = request.getfixturevalue(f"registry_{mode}")
    src = f"{server.host}/nydusify-mount-{mode}/texture:v1"
    skopeo_push(source_image.tmp, source_image.layout, "v1", src, f"{USER}:{PASSWORD}")
    env = docker_config(tmp_path / "home", server.host, USER, PASSWORD)
    target = f"{server.host}/nydusify-mount-{mode}/texture:nydus"
    convert(src, target, tmp_path / "conv", env=env)
    assert _mount_and_compare(target, oci_rootfs_dir, tmp_path, env) >= 25


@pytest.mark.fuse
def test_check_through_a_nydusd_mount(registry: Registry, source_image: Image, tmp_path: Path) -> None:
    """`check --nydusd`: upstream's filesystem rule, comparing against a real FUSE mount."""
    target = f"{registry.host}/mount/checked:v6"
    convert(source_image.ref, target, tmp_path / "conv")
    nydusd = f"{sys.executable} -m nydusd"
    assert check(target, source_image.ref, tmp_path / "c", nydusd=nydusd) == []
    assert not is_mounted(tmp_path / "c" / "nydus_mnt")
    # a difference seen through the mount is reported (the source image has other content)
    other = f"{registry.host}/mount/other:v1"
    from tests.converter.test_bad_input import layer_tar, push_image

    push_image(registry, "mount/other", "v1", [layer_tar([("only-here", b"1", "")])])
    problems = check(target, other, tmp_path / "c2", nydusd=nydusd)
    assert "filesystem: /only-here: missing in nydus image" in problems
    assert "filesystem: /bin/tool: only in nydus image" in problems


@pytest.mark.fuse
def test_mount_with_localfs_backend(registry: Registry, source_image: Image, oci_rootfs_dir: Path,
                                    tmp_path: Path) -> None:
    import json

    from nydusd.converter.stores import create_store

    blobs = tmp_path / "blobs"
    target = f"{registry.host}/mount/localfs:v6"
    with create_store("localfs", json.dumps({"dir": str(blobs)})) as store:
        convert(source_image.ref, target, tmp_path / "conv", blob_store=store)
    extra = ("--backend-type", "localfs", "--backend-config", json.dumps({"dir": str(blobs)}))
    assert _mount_and_compare(target, oci_rootfs_dir, tmp_path, {"HOME": str(tmp_path)}, extra) >= 25


def test_mount_names_its_api_socket_and_cleans_up_after_ctrl_c(registry: Registry, source_image: Image,
                                                               tmp_path: Path) -> None:
    """Default --work-dir ./tmp and --mount-path ./image-fs: both gone after SIGINT (Ctrl-C)."""
    target = f"{registry.host}/dst/texture:ctrlc"
    convert(source_image.ref, target, tmp_path / "conv")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    cmd = [sys.executable, "-m", "nydusd.cli.convert", "--log-level", "warn", "mount", "--target", target,
           "--plain-http", "--nydusd", f"{sys.executable} -m nydusd"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                            env={**os.environ, "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        assert lines[0] == f"mounted {target} at image-fs\n", lines
        sock = str(cwd / "tmp" / "nydusd" / "api.sock")
        assert lines[1] == f"nydusd API socket: {sock} (e.g. nydusctl -S {sock} info)\n"
        assert lines[2] == "press Ctrl-C to unmount\n"
        nydusctl = str(Path(sys.executable).parent / "nydusctl")
        info = subprocess.run([nydusctl, "-S", sock, "info"], capture_output=True, text=True, timeout=30)
        assert "RUNNING" in info.stdout, info.stderr
        assert is_mounted(cwd / "image-fs")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert sorted(os.listdir(cwd)) == []  # no ./tmp, no ./image-fs
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        force_unmount(cwd / "image-fs")
