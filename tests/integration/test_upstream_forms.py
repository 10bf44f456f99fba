"""Upstream image forms through real nydusd FUSE mounts: a data blob with an inlined bootstrap
(``nydus-image create --blob-inline-meta``: the v6 blob-toc form, and v5) mounts with ``--bootstrap <blob>``
as upstream nydusd does; an image whose blob uses a feature we cannot read (ZRAN here) is refused
at start-up with the feature named, before any read."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from nydusd.cli.image import main as nydus_image
from nydusd.rafs import layout as L
from tests.harness.daemon import Nydusd, is_mounted
from tests.harness.images import build_daemon_image, sample_tree
from tests.harness.treecmp import compare_trees

pytestmark = pytest.mark.fuse


def _config(tmp: Path, blob_dir: Path) -> str:
    path = tmp / "config.json"
    path.write_text(json.dumps({"device": {"backend": {"type": "localfs", "config": {"dir": str(blob_dir)}},
                                           "cache": {"type": "blobcache",
                                                     "config": {"work_dir": str(tmp / "cache")}}},
                                "mode": "direct", "digest_validate": True, "enable_xattr": True}))
    return str(path)


@pytest.mark.parametrize("version", ["5", "6"])
def test_blob_with_inlined_bootstrap_mounts_as_bootstrap(tmp_path: Path, version: str) -> None:
    src = sample_tree(tmp_path / "src")
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    argv = ["create", "--blob-inline-meta", "--fs-version", version, "-D", str(blobs), str(src)]
    assert nydus_image(argv) == 0
    (blob,) = blobs.iterdir()
    assert not (tmp_path / "image.boot").exists()  # the blob is the only output
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    args = ["--config", _config(tmp_path, blobs), "--mountpoint", str(mnt), "--bootstrap", str(blob)]
    with Nydusd(args, mnt, log_path=tmp_path / "nydusd.log") as d:
        assert compare_trees(src, mnt) > 50
    assert d.proc is not None and d.proc.returncode == 0


def test_image_with_an_unsupported_blob_feature_is_refused_at_start(tmp_path: Path) -> None:
    src = sample_tree(tmp_path / "src", big=False)
    image = build_daemon_image(src, tmp_path / "img", version=6)
    boot = bytearray(Path(image.bootstrap).read_bytes())
    (bt_off,) = struct.unpack_from("<Q", boot, L.V6_EXT_SB_OFFSET + 8)
    (features,) = struct.unpack_from("<I", boot, bt_off + 84)
    struct.pack_into("<I", boot, bt_off + 84, features | L.BLOB_ZRAN)
    Path(image.bootstrap).write_bytes(bytes(boot))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    args = ["--config", _config(tmp_path, Path(image.blob_dir)), "--mountpoint", str(mnt),
            "--bootstrap", image.bootstrap]
    d = Nydusd(args, mnt, log_path=tmp_path / "nydusd.log").start(wait_mount=False)
    try:
        assert d.proc is not None
        rc = d.proc.wait(30)
    finally:
        d.cleanup()
    assert rc != 0 and not is_mounted(mnt)
    log = (tmp_path / "nydusd.log").read_text()
    assert "unsupported blob feature ZRAN" in log, log[-2000:]
