"""``RafsSuper.summary``: the superblock summary ``GET /api/v1/daemon/backend`` reports."""

from __future__ import annotations

import os

import pytest

from nydusd.rafs import load_bootstrap
from nydusd.rafs.rafs_super import SUMMARY_KEYS
from nydusd.rafs.writer import bootstrap_bytes
from tests.rafs.imagegen import Spec, build_image


@pytest.mark.parametrize("version", [5, 6])
def test_summary_describes_the_superblock(version: int) -> None:
    tree = Spec("dir", perm=0o755, children={
        b"a": Spec("file", data=os.urandom(5000)),
        b"d": Spec("dir", perm=0o755, children={b"f": Spec("file", data=b"hello")}),
    })
    image = build_image(tree, version=version)
    with load_bootstrap(bootstrap_bytes(image.model, version=version)) as sb:
        info = sb.summary(batch_size=4096, timeout=2.5)
        assert set(info) == set(SUMMARY_KEYS)
        assert info["magic"] == (0x52414653 if version == 5 else 0xE0F5E1E2)
        assert info["version"] == version << 8 and info["sb_size"] == (8192 if version == 5 else 128)
        assert info["root_inode"] == sb.root_ino and info["root_nid"] == (sb.root_ino if version == 6 else 0)
        assert info["chunk_size"] == sb.chunk_size > 0 and info["batch_size"] == 4096
        assert info["inodes_count"] == sb.inode_count and info["flags"] == sb.flags
        assert info["blob_table_size"] == len(sb.blobs) == 1
        assert info["attr_timeout"] == info["entry_timeout"] == {"secs": 2, "nanos": 0}
