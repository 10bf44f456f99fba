"""Blob-meta codecs: v1 chunk-info records round-trip over their whole range, v2 records decode per
the bit layout of spec §4.3, tar headers match GNU tar's reading, meta headers round-trip."""

from __future__ import annotations

import struct
import tarfile

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nydusd.compress import Compressor
from nydusd.errors import CorruptMetadata
from nydusd.rafs.blobmeta import (
    MetaHeader,
    decode_ci_array,
    encode_ci_v1,
    parse_meta_header,
    parse_tar_header,
    tar_header,
)
from nydusd.storage.chunk import ChunkInfo

MAX = 1 << 24


@given(st.lists(st.tuples(st.integers(0, (1 << 40) - 1), st.integers(1, MAX), st.integers(0, (1 << 28) - 1),
                          st.integers(1, MAX)), max_size=20))
def test_ci_v1_round_trip(recs: list[tuple[int, int, int, int]]) -> None:
    chunks = [ChunkInfo(digest=bytes(32), blob_index=0, flags=int(cs != us), compressed_size=cs,
                        uncompressed_size=us, compressed_offset=co, uncompressed_offset=ub * 4096,
                        file_offset=0, index=k) for k, (co, cs, ub, us) in enumerate(recs)]
    decoded = decode_ci_array(encode_ci_v1(chunks), len(chunks), v2=False)
    assert [(e.compressed_offset, e.compressed_size, e.uncompressed_offset, e.uncompressed_size,
             e.compressed) for e in decoded] == \
        [(c.compressed_offset, c.compressed_size, c.uncompressed_offset, c.uncompressed_size,
          c.compressed_size != c.uncompressed_size) for c in chunks]


def test_ci_v2_bit_layout() -> None:
    uinfo = 0x01 << 56 | (70000 - 1) << 32 | 5  # compressed flag, usize 70000, uoff 5 blocks
    cinfo = 3000 << 40 | 123456789  # csize 3000 (not minus one), coff
    rec = struct.pack("<QQQ", uinfo, cinfo, 0xDEADBEEF)
    [e] = decode_ci_array(rec, 1, v2=True)
    assert (e.uncompressed_offset, e.uncompressed_size, e.compressed_offset, e.compressed_size) == (
        5 * 4096, 70000, 123456789, 3000)
    assert e.compressed and e.flags == 1 and e.data == 0xDEADBEEF
    [raw] = decode_ci_array(struct.pack("<QQQ", 0, 1 << 40, 0), 1, v2=True)
    assert not raw.compressed and raw.uncompressed_size == 1


def test_ci_array_errors() -> None:
    with pytest.raises(CorruptMetadata):
        decode_ci_array(b"\0" * 15, 1, v2=False)
    with pytest.raises(CorruptMetadata):  # reserved bits 0-7 of a v1 record
        decode_ci_array(struct.pack("<QQ", 0x1, 0), 1, v2=False)


@pytest.mark.parametrize("name,size", [("image.blob", 0), ("blob.meta", 123456),
                                       ("rafs.blob.toc", 8 ** 11 - 1)])
def test_tar_header_is_read_by_tarfile(name: str, size: int) -> None:
    h = tar_header(name, size)
    assert parse_tar_header(h) == (name, size)
    info = tarfile.TarInfo.frombuf(h, "utf-8", "strict")
    assert (info.name, info.size, info.type) == (name, size, tarfile.REGTYPE)
    assert parse_tar_header(h[:148] + b"1" + h[149:]) is None  # checksum protects it


def test_meta_header_round_trip() -> None:
    hdr = MetaHeader(0x70000021, Compressor.ZSTD, 7, 8314, 40, 112, 1, 2, 3)
    raw = hdr.pack()
    assert len(raw) == 4096 and raw[:4] == raw[-4:] == b"\x0b\xb1\x0b\xb1"
    assert parse_meta_header(raw) == hdr
    with pytest.raises(CorruptMetadata):
        parse_meta_header(b"\0" * 4096)
