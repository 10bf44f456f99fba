"""Reader details not covered by the fixtures: prefetch tables, compact v6 inodes, deterministic
re-serialisation, blob-meta cross-checks in ``check``, and the error contract of ``load_bootstrap``."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from nydusd.compress import Compressor
from nydusd.errors import CorruptMetadata, IntegrityError, InvalidArgument, NotFound
from nydusd.rafs import layout as L
from nydusd.rafs import load_bootstrap
from nydusd.rafs.stats import check_image
from nydusd.rafs.writer import bootstrap_bytes
from tests.rafs.imagegen import Spec, build_image


def _tree() -> Spec:
    return Spec("dir", perm=0o755, children={
        b"a": Spec("file", data=os.urandom(10000), xattrs={b"user.x": b"1"}),
        b"d": Spec("dir", perm=0o755, children={b"f": Spec("file", data=b"hello"), b"p": Spec("fifo")}),
        b"s": Spec("symlink", target=b"a"),
        b"h": Spec("link", target=b"/a"),
    })


@pytest.mark.parametrize("version", [5, 6])
def test_prefetch_table_round_trip(version: int) -> None:
    image = build_image(_tree(), version=version)
    image.model.prefetch = [b"/d", b"/a"]
    with load_bootstrap(bootstrap_bytes(image.model, version=version)) as sb:
        assert [sb.path_of(i) for i in sb.prefetch_inodes()] == [b"/d", b"/a"]
        assert sb.to_model().prefetch == [b"/d", b"/a"]


@pytest.mark.parametrize("version", [5, 6])
def test_reserialisation_is_deterministic(version: int) -> None:
    image = build_image(_tree(), version=version)
    with load_bootstrap(image.bootstrap) as sb:
        assert bootstrap_bytes(sb.to_model(), version=version) == image.bootstrap


def test_compact_v6_inode_is_read() -> None:
    image = build_image(_tree(), version=6)
    buf = bytearray(image.bootstrap)
    with load_bootstrap(bytes(buf)) as sb:
        fifo = sb.resolve("/d/p")
        off = fifo.meta_offset
    # rewrite the fifo's extended inode as a 32-byte compact one (format bit 0 clear)
    compact = L.V6_COMPACT_INODE.pack(0, 0, 0o010640, 1, 0, 0, 0, 77, 501, 502, 0)
    buf[off:off + 64] = compact + bytes(32)
    with load_bootstrap(bytes(buf)) as sb:
        inode = sb.resolve("/d/p")
        assert (inode.mode, inode.uid, inode.gid, inode.nlink, inode.mtime) == (0o010640, 501, 502, 1, 0)


def test_check_cross_checks_blob_meta_and_digests() -> None:
    image = build_image(_tree(), version=6, compressor=Compressor.NONE)
    blob = bytearray(image.blob)
    source = lambda b, off, n: bytes(blob[off:off + n])  # noqa: E731
    with load_bootstrap(image.bootstrap) as sb:
        assert check_image(sb, source)["chunks_verified"] == 4
        info = sb.blobs[0]
        assert info.ci_compressed_size == info.ci_uncompressed_size  # stored raw: easy to patch
        # chunk 0's compressed offset in the ci array (bits 0-39 of the second word)
        pos = info.ci_offset + 8
        word = struct.unpack_from("<Q", blob, pos)[0]
        struct.pack_into("<Q", blob, pos, word + 1)
        with pytest.raises(CorruptMetadata, match="chunk-info"):
            check_image(sb, source)
        struct.pack_into("<Q", blob, pos, word)
        blob[len(blob) - 1024 - 512 - 64] ^= 1  # first byte of blob.digest's last entry
        with pytest.raises(CorruptMetadata, match="blob.digest"):
            check_image(sb, source)
        c = sb.chunks(sb.resolve("/a").ino)[0]
        blob[c.compressed_offset] ^= 0xFF
        with pytest.raises(IntegrityError):
            check_image(sb, source)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        load_bootstrap(tmp_path / "missing")
    with pytest.raises(InvalidArgument):
        load_bootstrap(tmp_path)  # a directory
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(CorruptMetadata):
        load_bootstrap(tmp_path / "empty")
    for junk in (b"x", os.urandom(10000), bytes(20000)):
        with pytest.raises(CorruptMetadata) as e:
            load_bootstrap(junk)
        assert e.value.field == "magic"  # type: ignore[attr-defined]


@pytest.mark.parametrize("version", [5, 6])
def test_superblock_flags_follow_the_model(version: int) -> None:
    spec = Spec("dir", perm=0o755, children={b"f": Spec("file", data=b"x", uid=5, gid=6)})
    image = build_image(spec, version=version, compressor=Compressor.LZ4_BLOCK)
    with load_bootstrap(image.bootstrap) as sb:
        assert sb.explicit_uid_gid and not sb.has_xattr
        f = sb.resolve("/f")
        assert sb.compressor is Compressor.LZ4_BLOCK and (f.uid, f.gid) == (5, 6)
    image.model.explicit_uid_gid = False  # --repeatable: owners are not recorded
    image.model.root.children[0].xattrs = {b"user.k": b"v"}
    with load_bootstrap(bootstrap_bytes(image.model, version=version)) as sb:
        assert not sb.explicit_uid_gid and sb.has_xattr
        assert (sb.resolve("/f").uid, sb.resolve("/f").gid) == (0, 0)
        assert sb.xattrs(sb.resolve("/f").ino) == {b"user.k": b"v"}
