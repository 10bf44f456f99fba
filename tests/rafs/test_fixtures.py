"""Upstream nydus's real images (shared/fixtures/upstream, read in place) through our reader:
trees equal the recorded ``.result`` listings, every file's MD5 matches, every chunk digest
verifies, the v6 blob's chunk-info array / ToC / blob.digest agree with the bootstrap, and our
writers re-create the bootstraps (byte-identical up to documented vintage differences)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from nydusd.errors import CorruptMetadata
from nydusd.rafs import load_bootstrap
from nydusd.rafs.blobmeta import (
    blob_trailer,
    ci_to_chunk,
    extract_inlined_bootstrap,
    load_chunk_infos,
    read_toc,
    tar_segments,
)
from nydusd.rafs.content import LocalBlobs, read_chunk, read_file
from nydusd.rafs.stats import check_image
from nydusd.rafs.writer import bootstrap_bytes

V5_IMAGES = ["repeatable/sha256-nocompress-repeatable", "repeatable/blake3-lz4_block-non_repeatable"]
V6_BOOT = "bootstrap/rafs-v6-2.2.boot"
V6_BLOB = "blobs/be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"


def parse_result(path: Path) -> tuple[dict[bytes, tuple[str, str | None]], dict[bytes, str]]:
    """``.result`` = a `tree -J` listing, then ``md5  path`` lines."""
    text = path.read_text()
    listing, end = json.JSONDecoder().raw_decode(text)
    tree: dict[bytes, tuple[str, str | None]] = {}

    def visit(node: dict[str, object], prefix: str) -> None:
        path = prefix + "/" + str(node["name"]) if node["name"] else ""
        tree[path.encode() or b"/"] = (str(node["type"]), node.get("target"))  # type: ignore[arg-type]
        for child in node.get("contents", []):  # type: ignore[attr-defined]
            visit(child, path)

    visit(listing[0], "")
    md5s = {}
    for line in text[end:].splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            md5s[name.encode()] = digest
    return tree, md5s


def image_tree(sb) -> dict[bytes, tuple[str, str | None]]:  # type: ignore[no-untyped-def]
    out: dict[bytes, tuple[str, str | None]] = {}
    for path, inode in sb.walk():
        if inode.is_dir:
            out[path] = ("directory", None)
        elif inode.is_symlink:
            out[path] = ("link", sb.readlink(inode.ino).decode())
        else:
            out[path] = ("file", None)
    return out


@pytest.mark.parametrize("name", V5_IMAGES)
def test_v5_tree_and_content_match_result(upstream: Path, name: str) -> None:
    tree, md5s = parse_result(upstream / (name + ".result"))
    with load_bootstrap(upstream / name) as sb, LocalBlobs(str(upstream / "repeatable/blobs")) as blobs:
        assert sb.version == 5
        assert image_tree(sb) == tree
        got = {p: hashlib.md5(read_file(sb, sb.resolve(p).ino, blobs)).hexdigest() for p in md5s}
        assert got == md5s
        stats = check_image(sb, blobs)  # also recomputes all v5 Merkle digests
        assert stats == {"entries": 54, "files": 23, "chunks_verified": 23}


def test_v5_hardlinks_and_attributes(upstream: Path) -> None:
    with load_bootstrap(upstream / V5_IMAGES[0]) as sb:
        names = [b"/hardlink-test/foo", b"/hardlink-test/test.sh", b"/normal-file-test/test.sh"]
        inodes = [sb.resolve(p) for p in names]
        assert {i.ino for i in inodes} == {inodes[0].ino}
        assert all(i.nlink == 3 and i.size == 944 for i in inodes)
        assert sb.path_of(inodes[0].ino) == b"/hardlink-test/foo"
        version = sb.resolve("/normal-file-test/busybox/"
                             "1f777dbdd68d1c4d554bc0d20e027bfef9ed2dfe2d8d5f029e958552a0e12475/VERSION")
        assert (version.mode, version.size, version.mtime) == (0o100644, 3, 1668232305)
        [chunk] = sb.chunks(version.ino)
        assert (chunk.compressed_offset, chunk.compressed_size, chunk.index) == (2734, 3, 4)
        assert sb.digester.value == "sha256" and sb.compressor.value == "none"
        assert sb.lookup(sb.root_ino, b"..").ino == sb.root_ino


def test_v6_tree_content_and_both_chunk_routes(upstream: Path) -> None:
    blob_bytes = (upstream / V6_BLOB).read_bytes()
    with load_bootstrap(upstream / V6_BOOT) as sb, LocalBlobs(str(upstream / "blobs")) as blobs:
        assert (sb.version, sb.root_ino, sb.inode_count) == (6, 128, 3)
        assert [(n, i) for n, i, _ in sb.iter_dir(sb.root_ino)] == [
            (b".", 128), (b"..", 128), (b"lib.rs", 133), (b"sync_io.rs", 136)]
        lib = sb.resolve("/lib.rs")
        data = read_file(sb, lib.ino, blobs)
        assert len(data) == 16931 and data.startswith(b"// Copyright (C) 2020 Alibaba Cloud")
        assert len(read_file(sb, sb.resolve("/sync_io.rs").ino, blobs)) == 13400
        blob = sb.blobs[0]
        read = lambda off, n: blob_bytes[off:off + n]  # noqa: E731
        entries = load_chunk_infos(read, blob)
        segments = tar_segments(read, len(blob_bytes))
        start, size = segments["blob.digest"]
        digests = [blob_bytes[start + 32 * k:start + 32 * k + 32] for k in range(size // 32)]
        for path in (b"/lib.rs", b"/sync_io.rs"):
            for c in sb.chunks(sb.resolve(path).ino):
                via_meta = ci_to_chunk(entries[c.index], c.index, digests[c.index], 0, c.file_offset)
                assert via_meta == c  # route 1 (chunk table) == route 2 (blob meta)
                assert read_chunk(blobs, via_meta, blob)  # digest-verified decode
        toc = {e.name: e for e in read_toc(read, len(blob_bytes))}
        assert set(toc) == {"image.blob", "blob.meta", "blob.meta.header", "blob.digest"}
        for name in ("blob.meta", "blob.meta.header", "blob.digest"):
            e = toc[name]
            assert hashlib.sha256(read(e.compressed_offset, e.compressed_size)).digest() == e.digest
        assert hashlib.sha256(blob_bytes[:7802 + 512]).digest() == toc["image.blob"].digest
        assert hashlib.sha256(blob_bytes[len(blob_bytes) - blob.blob_toc_size:]).digest() == \
            blob.blob_toc_digest
        # blob id = sha256 of the blob without the blob.digest payload (§4.1)
        assert hashlib.sha256(blob_bytes[:start] + blob_bytes[start + size:]).hexdigest() == blob.blob_id


def test_v6_blob_trailer_rebuilt_from_chunks(upstream: Path) -> None:
    """Our trailer writer reproduces upstream's, except the two documented 2.2 quirks."""
    blob_bytes = (upstream / V6_BLOB).read_bytes()
    with load_bootstrap(upstream / V6_BOOT) as sb:
        chunks = sorted({c.index: c for p in ("/lib.rs", "/sync_io.rs")
                         for c in sb.chunks(sb.resolve(p).ino)}.values(), key=lambda c: c.index)
        blob = sb.blobs[0]
    t = blob_trailer(chunks, data_size=7802, compressor=blob.compressor, digester=blob.digester,
                     data_hasher=hashlib.sha256(blob_bytes[:7802]))
    upstream_tail = blob_bytes[7802:]
    assert len(t.data) == len(upstream_tail)
    diff = [i for i in range(len(t.data)) if t.data[i] != upstream_tail[i]]
    toc_start = len(upstream_tail) - 1024
    # 2.2 wrote the data size as image.blob's offset (entry 0 bytes 56..57) and left garbage in
    # bytes 124..127 of every ToC entry
    quirks = {toc_start + 56, toc_start + 57} | {toc_start + 128 * k + b for k in range(4)
                                                 for b in range(124, 128)}
    assert set(diff) <= quirks and diff
    assert (t.features, t.ci_offset, t.ci_compressed_size) == (blob.features, blob.ci_offset,
                                                               blob.ci_compressed_size)


@pytest.mark.parametrize("name", V5_IMAGES)
def test_v5_writer_rebuilds_fixture(upstream: Path, name: str) -> None:
    original = (upstream / name).read_bytes()
    with load_bootstrap(upstream / name) as sb:
        rebuilt = bootstrap_bytes(sb.to_model(), version=5)
    assert len(rebuilt) == len(original)
    # only s_inodes_count differs: the 2022 builder did not count the root (spec §8)
    assert [i for i in range(len(original)) if original[i] != rebuilt[i]] == [24]
    assert original[24] + 1 == rebuilt[24]


def test_v6_writer_rebuilds_fixture(upstream: Path) -> None:
    original = (upstream / V6_BOOT).read_bytes()
    with load_bootstrap(upstream / V6_BOOT) as sb:
        rebuilt = bootstrap_bytes(sb.to_model(), version=6)
    diff = [i for i in range(len(original)) if original[i] != rebuilt[i]]
    # ENCRYPTION_NONE flag (1155), mapped_blkaddr (1476..1477), root i_u / i_ino (12304, 12308)
    assert len(rebuilt) == len(original) and diff == [1155, 1476, 1477, 12304, 12308]


def test_inlined_bootstrap_extraction(tmp_path: Path, upstream: Path) -> None:
    """A blob with image.boot (raw, tar header, no ToC) yields its bootstrap; ids are replaced."""
    from nydusd.rafs.blobmeta import tar_header
    from nydusd.rafs.reader import load_from_blob

    boot = (upstream / V5_IMAGES[0]).read_bytes()
    blob = (upstream / "repeatable/blobs/7334a2594e133cf8ae364189c2276b090fc490c627bcc3fb1077f0419a538e00"
            ).read_bytes()
    combined = blob + tar_header("image.blob", len(blob)) + boot + tar_header("image.boot", len(boot))
    assert extract_inlined_bootstrap(lambda o, n: combined[o:o + n], len(combined)) == boot
    path = tmp_path / "abc123.blob"
    path.write_bytes(combined)
    with load_from_blob(path) as sb:
        assert [b.blob_id for b in sb.blobs] == ["abc123"]
        assert sb.resolve("/hardlink-test/foo").size == 944


def test_inlined_bootstrap_through_toc(upstream: Path) -> None:
    """Current builders: image.boot is zstd-compressed and found through the ToC."""
    from nydusd.compress import Compressor, compress
    from nydusd.rafs import layout as L
    from nydusd.rafs.blobmeta import tar_header
    from nydusd.rafs.reader import open_buffer

    boot = (upstream / V6_BOOT).read_bytes()
    packed, compressed = compress(boot, Compressor.ZSTD)
    assert compressed
    blob = b"chunk data" + packed + tar_header("image.boot", len(packed))
    entry = L.TOC_ENTRY.pack(0x2, 0, b"image.boot", hashlib.sha256(boot).digest(), 10, len(packed), len(boot))
    blob += entry + tar_header("rafs.blob.toc", len(entry))
    read = lambda o, n: blob[o:o + n]  # noqa: E731
    assert extract_inlined_bootstrap(read, len(blob)) == boot
    assert open_buffer(extract_inlined_bootstrap(read, len(blob))).resolve("/lib.rs").size == 16931
    broken = blob.replace(packed[-8:], bytes(8))
    with pytest.raises(CorruptMetadata):
        extract_inlined_bootstrap(lambda o, n: broken[o:o + n], len(broken))
