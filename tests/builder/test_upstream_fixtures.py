"""Byte-level compatibility with upstream nydus-image: unpack upstream's repeatable v5 fixtures into a
directory, rebuild them with our builder using the same settings, and compare with the originals.

The data blob must come out byte-identical (same chunk order, same dedup, hence the same blob id);
the bootstrap may differ only in the two documented vintage bytes (spec §8): ``s_inodes_count``
(the 2022 builder did not count the root) and the CAP_TAR_TOC bit current builders set."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from nydusd.rafs import load_bootstrap
from nydusd.rafs.content import LocalBlobs, read_file
from tests.harness.images import build_image

SB_INODES_COUNT = 24  # v5 superblock offset of s_inodes_count (u64)


def _unpack(bootstrap: Path, blob_dir: Path, dest: Path) -> dict:
    first_name: dict[int, Path] = {}
    dirs = []
    with load_bootstrap(str(bootstrap)) as sb, LocalBlobs(str(blob_dir)) as blobs:
        settings = {"version": sb.version, "compressor": sb.compressor.value, "digester": sb.digester.value,
                    "explicit": sb.explicit_uid_gid, "chunk_size": sb.chunk_size,
                    "blobs": [b.blob_id for b in sb.blobs], "root_ino": sb.root_ino}
        for path, ino in sb.walk():
            p = dest / os.fsdecode(path).lstrip("/") if path != b"/" else dest
            if ino.is_dir:
                p.mkdir(exist_ok=True)
                dirs.append((p, ino))
                continue
            if ino.is_symlink:
                os.symlink(sb.readlink(ino.ino), p)
            elif ino.ino in first_name:
                os.link(first_name[ino.ino], p)
                continue
            else:
                p.write_bytes(read_file(sb, ino.ino, blobs))
                first_name[ino.ino] = p
                os.chmod(p, stat.S_IMODE(ino.mode))
            if sb.explicit_uid_gid:
                os.lchown(p, ino.uid, ino.gid)
            os.utime(p, ns=(ino.mtime * 10**9 + ino.mtime_nsec,) * 2, follow_symlinks=False)
        for p, ino in reversed(dirs):
            os.chmod(p, stat.S_IMODE(ino.mode))
            if sb.explicit_uid_gid:
                os.lchown(p, ino.uid, ino.gid)
            os.utime(p, ns=(ino.mtime * 10**9 + ino.mtime_nsec,) * 2)
    return settings


@pytest.mark.parametrize("name", ["sha256-nocompress-repeatable", "blake3-lz4_block-non_repeatable"])
def test_rebuild_upstream_v5_fixture(tmp_path: Path, upstream: Path, name: str) -> None:
    fixture = upstream / "repeatable" / name
    blob_dir = upstream / "repeatable" / "blobs"
    src = tmp_path / "src"
    src.mkdir()
    s = _unpack(fixture, blob_dir, src)
    if s["explicit"] and os.geteuid() != 0:
        pytest.skip("restoring the fixture's owners needs root")
    img = build_image(src, tmp_path / "out", fs_version=s["version"], compressor=s["compressor"],
                      digester=s["digester"], chunk_size=s["chunk_size"], explicit_uidgid=s["explicit"])
    assert img.blobs == s["blobs"]
    assert img.blob_path is not None
    assert img.blob_path.read_bytes() == (blob_dir / s["blobs"][0]).read_bytes()
    ours, theirs = img.bootstrap.read_bytes(), fixture.read_bytes()
    assert len(ours) == len(theirs)
    diff = [i for i in range(len(ours)) if ours[i] != theirs[i]]
    # the extended blob table follows the blob id; its u32 features sit at +4 (high byte +7)
    ext_features_hi = theirs.index(s["blobs"][0].encode()) + 64 + 7
    assert set(diff) <= {SB_INODES_COUNT, ext_features_hi}, diff
    assert ours[ext_features_hi] == theirs[ext_features_hi] | 0x40  # CAP_TAR_TOC
