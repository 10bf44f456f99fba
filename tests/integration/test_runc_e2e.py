"""End to end, as a container runtime uses nydus: an OCI image in a local docker-registry is
converted with nydusify, nydusd mounts the result lazily from the registry, and runc runs a
container on overlayfs over that mount. The container's output is checked, and that the daemon
fetched far less than the image (the container touches busybox only, not the image's payload)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from nydusd.converter.optimize import source_bootstrap
from nydusd.converter.publish import extract_bootstrap
from nydusd.converter.remote import open_remote
from tests.converter.test_convert import convert
from tests.harness.apiclient import ApiClient
from tests.harness.daemon import Nydusd, force_unmount
from tests.harness.oci_images import run, skopeo_push, tool_env
from tests.harness.oci_registry import Registry

pytestmark = pytest.mark.fuse

TOOLS = ("runc", "umoci", "skopeo", "docker-registry", "busybox")
PAYLOAD = 3 * (4 << 20)     # incompressible bytes the container never reads


def busybox_image(tmp: Path) -> Path:
    """An OCI layout ``tmp/oci:v1``: static busybox (+ sh link), /etc files, and a payload."""
    env = tool_env(tmp)
    layout, bundle = tmp / "oci", tmp / "bundle"
    run(["umoci", "init", "--layout", str(layout)], env)
    run(["umoci", "new", "--image", f"{layout}:v1"], env)
    run(["umoci", "unpack", "--image", f"{layout}:v1", str(bundle)], env)
    root = bundle / "rootfs"
    for d in ("bin", "etc", "tmp", "proc", "sys", "dev", "opt/data"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(shutil.which("busybox") or "/bin/busybox", root / "bin/busybox")
    os.symlink("busybox", root / "bin/sh")
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/motd").write_text("served lazily by nydus\n")
    rnd = random.Random(13)
    for i in range(3):
        (root / f"opt/data/payload{i}.bin").write_bytes(rnd.randbytes(PAYLOAD // 3))
    run(["umoci", "repack", "--refresh-bundle", "--image", f"{layout}:v1", str(bundle)], env)
    shutil.rmtree(bundle)
    return layout


def _runc_bundle(bundle: Path, rootfs: Path, args: list[str]) -> None:
    bundle.mkdir()
    subprocess.run(["runc", "spec"], cwd=bundle, check=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["root"] = {"path": str(rootfs), "readonly": False}
    spec["process"]["terminal"] = False
    spec["process"]["args"] = args
    (bundle / "config.json").write_text(json.dumps(spec))


def test_runc_runs_a_container_from_a_lazily_mounted_nydus_image(tmp_path: Path) -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")
    layout = busybox_image(tmp_path)
    with Registry(tmp_path / "registry") as registry:
        src, dst = f"{registry.host}/e2e/busybox:v1", f"{registry.host}/e2e/busybox:nydus"
        skopeo_push(tmp_path, layout, "v1", src)
        convert(src, dst, tmp_path / "convert")

        remote = open_remote(dst, plain_http=True)
        try:
            manifest, _, layer = source_bootstrap(remote)
        finally:
            remote.close()
        image_bytes = sum(d.size for d in manifest.layers)
        boot = tmp_path / "image.boot"
        boot.write_bytes(extract_bootstrap(layer))
        host, repo = registry.host, "e2e/busybox"
        config = {"device": {"backend": {"type": "registry", "config": {
                      "scheme": "http", "host": host, "repo": repo, "timeout": 10, "retry_limit": 1}},
                  "cache": {"type": "blobcache", "config": {"work_dir": str(tmp_path / "cache")}}},
                  "mode": "direct", "digest_validate": False, "enable_xattr": True}
        (tmp_path / "nydusd.json").write_text(json.dumps(config))

        mnt, merged = tmp_path / "mnt", tmp_path / "merged"
        for d in (mnt, merged, tmp_path / "upper", tmp_path / "work"):
            d.mkdir()
        sock = str(tmp_path / "api.sock")
        state = tmp_path / "runc-state"
        daemon = Nydusd(["--config", str(tmp_path / "nydusd.json"), "--bootstrap", str(boot),
                         "--mountpoint", str(mnt), "--apisock", sock], mnt,
                        log_path=tmp_path / "nydusd.log", apisock=sock)
        try:
            daemon.start()
            subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                            f"lowerdir={mnt},upperdir={tmp_path / 'upper'},workdir={tmp_path / 'work'}",
                            str(merged)], check=True)
            _runc_bundle(tmp_path / "bundle", merged,
                         ["/bin/sh", "-c", "echo container-ok; cat /etc/motd; ls /opt/data | wc -l"])
            out = subprocess.run(["runc", "--root", str(state), "run", "--bundle", str(tmp_path / "bundle"),
                                  "nydus-e2e"], capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr + daemon.log()
            assert out.stdout.split("\n")[:3] == ["container-ok", "served lazily by nydus", "3"]

            status, backend = ApiClient(sock).request("GET", "/api/v1/metrics/backend")
            assert status == 200, backend
            fetched = backend["read_amount_total"]
            # busybox (about 1 MiB compressed) and nothing of the 12 MiB payload
            print(f"fetched {fetched} of {image_bytes} bytes")
            assert 0 < fetched < 0.25 * image_bytes, (fetched, image_bytes)
        finally:
            subprocess.run(["runc", "--root", str(state), "delete", "--force", "nydus-e2e"],
                           capture_output=True, check=False)
            subprocess.run(["umount", str(merged)], capture_output=True, check=False)
            daemon.terminate()
            force_unmount(mnt)
