"""A blob cache damaged between two mounts, through real nydusd FUSE mounts: a truncated data file
is refetched (never zeros), a data file replaced by a directory fails reads with EIO and a clear
log line."""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path

import pytest

from tests.harness.daemon import Nydusd
from tests.harness.images import build_daemon_image, sample_tree
from tests.harness.treecmp import compare_trees

pytestmark = pytest.mark.fuse


def _mount(tmp: Path, image, name: str) -> Nydusd:
    mnt = tmp / f"mnt-{name}"
    mnt.mkdir()
    config = image.write_config(tmp / "config.json", tmp / "cache", digest_validate=False)
    return Nydusd(["--config", config, "--mountpoint", str(mnt), "--bootstrap", image.bootstrap],
                  mnt, log_path=tmp / f"nydusd-{name}.log")


def _data_file(tmp: Path) -> Path:
    (path,) = (tmp / "cache").glob("*.blob.data")
    return path


def test_truncated_cache_data_file_is_refetched_not_served_as_zeros(tmp_path):
    src = sample_tree(tmp_path / "src")
    image = build_daemon_image(src, tmp_path / "img", version=6)
    with _mount(tmp_path, image, "warm") as d:
        compare_trees(src, Path(d.mountpoint))
    data = _data_file(tmp_path)
    assert data.stat().st_size > 4 << 20
    with data.open("r+b") as f:
        f.truncate(2 << 20)
    with _mount(tmp_path, image, "again") as d:
        big = Path(d.mountpoint) / "dir" / "multi_chunk"
        assert hashlib.sha256(big.read_bytes()).digest() == \
            hashlib.sha256((src / "dir" / "multi_chunk").read_bytes()).digest()
        assert compare_trees(src, Path(d.mountpoint)) > 50
    assert "cached_chunk_missing" in (tmp_path / "nydusd-again.log").read_text()


def test_cache_data_file_replaced_by_a_directory_is_eio_with_a_clear_log(tmp_path):
    src = sample_tree(tmp_path / "src", big=False)
    image = build_daemon_image(src, tmp_path / "img", version=6)
    with _mount(tmp_path, image, "warm") as d:
        compare_trees(src, Path(d.mountpoint))
    data = _data_file(tmp_path)
    data.unlink()
    data.mkdir()
    with _mount(tmp_path, image, "again") as d:
        with pytest.raises(OSError) as err:
            (Path(d.mountpoint) / "dir" / "exact_chunk").read_bytes()
        assert err.value.errno == errno.EIO
    assert "cannot open the blob cache files: Is a directory" in (tmp_path / "nydusd-again.log").read_text()
