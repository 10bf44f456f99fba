"""The Linux kernel as an oracle: a RAFS v6 image is mounted both by nydusd (FUSE) and by the
kernel's EROFS driver (bootstrap + the blob's uncompressed data on a loop device); every attribute,
link count, xattr and byte must agree between the two mounts, and with the source tree."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from nydusd.rafs import load_bootstrap
from tests.harness.daemon import force_unmount
from tests.harness.images import build_daemon_image, sample_tree
from tests.harness.treecmp import compare_trees
from tests.integration.test_mount import start_dedicated

pytestmark = [pytest.mark.fuse, pytest.mark.root]


def raw_device(bootstrap: str, blob: Path, out: Path) -> None:
    """The blob's chunks at their uncompressed offsets (uncompressed build: payload == data)."""
    sb = load_bootstrap(bootstrap)
    try:
        data = blob.read_bytes()
        raw = bytearray(sb.blobs[0].uncompressed_size)
        for _path, inode in sb.walk():
            if inode.is_reg:
                for c in sb.chunks(inode.ino):
                    raw[c.uncompressed_offset:c.uncompressed_offset + c.uncompressed_size] = \
                        data[c.compressed_offset:c.compressed_offset + c.compressed_size]
    finally:
        sb.close()
    out.write_bytes(raw)


def test_fuse_mount_agrees_with_kernel_erofs(tmp_path):
    if "erofs" not in Path("/proc/filesystems").read_text() or not shutil.which("losetup"):
        pytest.skip("kernel EROFS or losetup not available")
    src = sample_tree(tmp_path / "src")
    image = build_daemon_image(src, tmp_path / "img", version=6, compressor="none")
    raw = tmp_path / "blob.raw"
    raw_device(image.bootstrap, next(Path(image.blob_dir).iterdir()), raw)
    emnt = tmp_path / "erofs"
    emnt.mkdir()
    loop = subprocess.run(["losetup", "-f", "--show", "-r", str(raw)], capture_output=True, text=True)
    if loop.returncode != 0:
        pytest.skip(f"no loop device: {loop.stderr.strip()}")
    dev = loop.stdout.strip()
    try:
        subprocess.run(["mount", "-t", "erofs", "-o", f"ro,device={dev}", image.bootstrap, str(emnt)],
                       check=True, capture_output=True)
        with start_dedicated(tmp_path, image) as d:
            fuse = Path(d.mountpoint)
            # kernel vs nydusd (not st_blocks: upstream nydus reports 512-byte units of the size,
            # EROFS whole 4 KiB blocks)
            assert compare_trees(emnt, fuse) > 50
            assert compare_trees(src, fuse) > 50  # and both vs the source
    finally:
        force_unmount(emnt)
        subprocess.run(["umount", str(emnt)], capture_output=True)
        subprocess.run(["losetup", "-d", dev], capture_output=True)
