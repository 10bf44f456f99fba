"""Image features whose data this implementation cannot read (ZRAN, BATCH, ENCRYPTED, SEPARATE,
TARFS) are refused up front with a message naming the feature -- by ``check_servable`` (nydusd's
mount path and ``nydus-image unpack``), while metadata tools still read such images -- and the
pre-release (2021) v5 inode layout is named as such, not reported as corruption."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from nydusd.cli.image import main
from nydusd.errors import CorruptMetadata, Unsupported
from nydusd.rafs import check_servable, load_bootstrap
from nydusd.rafs import layout as L
from tests.rafs.test_fixtures import V5_IMAGES, V6_BLOB, V6_BOOT

FEATURES = {"ZRAN": L.BLOB_ZRAN, "BATCH": L.BLOB_BATCH, "ENCRYPTED": L.BLOB_ENCRYPTED,
            "SEPARATE": L.BLOB_SEPARATE, "TARFS": L.BLOB_TARFS}


def with_blob_feature(upstream: Path, version: int, bit: int) -> bytes:
    """An upstream fixture with ``bit`` added to its (first) blob's features."""
    if version == 6:
        buf = bytearray((upstream / V6_BOOT).read_bytes())
        (bt_off,) = struct.unpack_from("<Q", buf, L.V6_EXT_SB_OFFSET + 8)  # s_blob_table_offset
        assert buf[bt_off:bt_off + 64] == V6_BLOB.split("/")[1].encode()
        pos = bt_off + 84
    else:
        buf = bytearray((upstream / V5_IMAGES[0]).read_bytes())
        (ext_off,) = struct.unpack_from("<Q", buf, 72)
        pos = ext_off + 4
    (features,) = struct.unpack_from("<I", buf, pos)
    struct.pack_into("<I", buf, pos, features | bit)
    return bytes(buf)


@pytest.mark.parametrize("version", [5, 6])
@pytest.mark.parametrize("name", sorted(FEATURES))
def test_unsupported_blob_feature_is_refused_by_name(upstream: Path, version: int, name: str) -> None:
    data = with_blob_feature(upstream, version, FEATURES[name])
    with load_bootstrap(data) as sb:  # the metadata itself is fine: inspect/check still work
        assert len(list(sb.walk())) > 2
        with pytest.raises(Unsupported, match=f"unsupported blob feature {name}"):
            check_servable(sb)
    with load_bootstrap(upstream / (V6_BOOT if version == 6 else V5_IMAGES[0])) as sb:
        check_servable(sb)  # the unmodified fixtures are servable


def test_encrypted_superblock_is_refused_by_name(upstream: Path) -> None:
    buf = bytearray((upstream / V6_BOOT).read_bytes())
    ext = L.V6_EXT_SB_OFFSET
    (flags,) = struct.unpack_from("<Q", buf, ext)
    struct.pack_into("<Q", buf, ext, flags | L.SB_ENCRYPTION_AES_128_XTS)
    with load_bootstrap(bytes(buf)) as sb, pytest.raises(Unsupported, match="ENCRYPTED"):
        check_servable(sb)


def test_tarfs_mode_superblock_is_unsupported_not_corrupt(upstream: Path) -> None:
    buf = bytearray((upstream / V6_BOOT).read_bytes())
    (flags,) = struct.unpack_from("<Q", buf, L.V6_EXT_SB_OFFSET)
    struct.pack_into("<Q", buf, L.V6_EXT_SB_OFFSET, flags | L.SB_TARFS_MODE)
    with pytest.raises(Unsupported, match="unsupported feature TARFS"):
        load_bootstrap(bytes(buf))


def test_unpack_refuses_before_creating_the_output(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                   upstream: Path) -> None:
    boot = tmp_path / "zran.boot"
    boot.write_bytes(with_blob_feature(upstream, 6, L.BLOB_ZRAN))
    out = tmp_path / "out.tar"
    assert main(["unpack", str(boot), "-D", str(upstream / "blobs"), "--output", str(out)]) != 0
    assert "unsupported blob feature ZRAN" in capsys.readouterr().err
    assert not out.exists()
    assert main(["check", str(boot)]) == 0  # metadata tools still read it
    capsys.readouterr()


def prerelease_root(upstream: Path) -> bytes:
    """A v5 fixture whose root record is rewritten to the pre-release layout of spec §8 (mode at
    +52, size u64 at +56, zero at +48): what nydus-image wrote in early 2021."""
    buf = bytearray((upstream / V5_IMAGES[0]).read_bytes())
    (it_off,) = struct.unpack_from("<Q", buf, 32)
    (slot,) = struct.unpack_from("<I", buf, it_off)
    off = slot << 3
    (mode,) = struct.unpack_from("<I", buf, off + 60)
    struct.pack_into("<IIQ", buf, off + 48, 0, mode, 0)
    return bytes(buf)


def test_prerelease_v5_inode_layout_is_named_not_called_corrupt(capsys: pytest.CaptureFixture[str],
                                                                tmp_path: Path, upstream: Path) -> None:
    with pytest.raises(Unsupported, match=r"pre-release \(2021\) RAFS v5 inode layout"):
        load_bootstrap(prerelease_root(upstream))
    boot = tmp_path / "old.boot"
    boot.write_bytes(prerelease_root(upstream))
    assert main(["check", str(boot)]) != 0
    err = capsys.readouterr().err
    assert "pre-release (2021) RAFS v5 inode layout" in err and "corrupt" not in err.lower()
    # a root that is merely broken is still corruption
    buf = bytearray((upstream / V5_IMAGES[0]).read_bytes())
    (it_off,) = struct.unpack_from("<Q", buf, 32)
    off = struct.unpack_from("<I", buf, it_off)[0] << 3
    struct.pack_into("<I", buf, off + 60, 0o100644)
    with pytest.raises(CorruptMetadata):
        load_bootstrap(bytes(buf))
