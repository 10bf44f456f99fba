"""Builder sources without the bootstrap writer: tar streaming + validation, directory walk,
blob trailer bytes against upstream's fixture, options, overlay rules."""

from __future__ import annotations

import gzip
import io
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from nydusd.builder.blob_writer import BlobWriter, tar_header
from nydusd.builder.directory import walk_directory
from nydusd.builder.options import BuildOptions, WhiteoutSpec, parse_chunk_size, parse_prefetch_patterns
from nydusd.builder.tarball import open_tar_stream, read_tarball
from nydusd.builder.tree import FileData, Node, drop_whiteouts, iter_nodes, new_dir, overlay
from nydusd.compress import Compressor
from nydusd.digest import DigestAlgorithm
from nydusd.errors import BuildError, InvalidArgument

FIXTURE_BLOB = "blobs/be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"


def _collect(stream) -> tuple[Node, dict[str, bytes]]:
    contents: dict[str, bytes] = {}

    def on_file(data: FileData, reader, path: str) -> None:
        contents[path] = reader.read(data.size)

    return read_tarball(stream, on_file), contents


def _tar(entries: list[tuple[tarfile.TarInfo, bytes | None]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _ti(name: str, kind: bytes = tarfile.REGTYPE, **kw) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


def test_blob_trailer_matches_upstream_fixture(upstream: Path) -> None:
    """Rebuild the v6 blob tail of upstream's 2.2 fixture from its two chunk payloads: identical
    except the two documented 2.2 ToC quirks (image.blob offset, 4 garbage padding bytes)."""
    blob = (upstream / FIXTURE_BLOB).read_bytes()
    digests = blob[12954:12954 + 64]
    out = io.BytesIO()
    w = BlobWriter(out, fs_version=6, compressor=Compressor.ZSTD, digester=DigestAlgorithm.BLAKE3,
                   chunk_size=1 << 20, aligned=True, blob_toc=True)
    w.add_chunk(digests[:32], blob[0:4828], True, 16931)
    w.add_chunk(digests[32:], blob[4828:7802], True, 13400)
    w.finish_data()
    w.finish()
    got = out.getvalue()
    assert len(got) == len(blob)
    toc = 13530
    diffs = [i for i in range(len(blob)) if got[i] != blob[i]]
    assert all(toc <= i < toc + 512 and (i - toc) % 128 in (56, 57, 124, 125, 126, 127) for i in diffs)
    info = w.blob_info("x")
    assert (info.features, info.ci_offset, info.ci_compressed_size, info.blob_toc_size) == (
        0x70000021, 8314, 32, 1024)
    # the blob table of rafs-v6-2.2.boot records the whole file size and the aligned data size
    assert (info.compressed_size, info.uncompressed_size) == (14554, 36864)
    assert tar_header(b"image.blob", 7802) == blob[7802:8314]


def test_tar_plain_gzip_zstd_and_attributes(tmp_path: Path) -> None:
    data = os.urandom(5000)
    ti = _ti("./dir/f", mode=0o640, uid=7, gid=8, mtime=1_600_000_000)
    ti.pax_headers = {"SCHILY.xattr.user.k": "v", "mtime": "1600000000.123456789"}
    raw = _tar([(_ti("./dir", tarfile.DIRTYPE, mode=0o711), None), (ti, data),
                (_ti("dir/l", tarfile.SYMTYPE, linkname="../../etc/passwd"), None),
                (_ti("dir/h", tarfile.LNKTYPE, linkname="dir/f"), None),
                (_ti("dev", tarfile.CHRTYPE, devmajor=1, devminor=3), None),
                (_ti("implicit/sub/x", mode=0o600), b"x")])
    (tmp_path / "a.tar").write_bytes(raw)
    (tmp_path / "a.tar.gz").write_bytes(gzip.compress(raw))
    subprocess.run(["zstd", "-q", "-3", str(tmp_path / "a.tar"), "-o", str(tmp_path / "a.tar.zst")],
                   check=True)
    for name in ("a.tar", "a.tar.gz", "a.tar.zst"):
        with open_tar_stream(tmp_path / name) as s:
            root, contents = _collect(s)
        d = root.children[b"dir"]
        f = d.children[b"f"]
        assert contents["./dir/f"] == data
        assert (stat.S_IMODE(d.mode), stat.S_IMODE(f.mode), f.uid, f.gid) == (0o711, 0o640, 7, 8)
        assert (f.mtime, f.mtime_nsec, f.xattrs) == (1_600_000_000, 123456789, {b"user.k": b"v"})
        assert d.children[b"l"].symlink == b"../../etc/passwd"
        assert d.children[b"h"].data is f.data
        assert root.children[b"dev"].rdev == os.makedev(1, 3)
        assert root.children[b"implicit"].children[b"sub"].children[b"x"].size == 1


@pytest.mark.parametrize("entries, why", [
    ([("../evil", b"x")], "'..'"),
    ([("a/../../evil", b"x")], "'..'"),
    ([("f", b"1"), ("f", b"2")], "duplicate"),
    ([("h", None, "missing")], "missing or later"),
    ([("h", None, "f"), ("f", b"1")], "missing or later"),
    ([("d/", "dir"), ("h", None, "d")], "directory"),
    ([("f", b"1"), ("f/x", b"2")], "below a non-directory"),
    ([("a" * 256, b"x")], "longer than 255"),
])
def test_tar_bad_entries(entries: list, why: str) -> None:
    items = []
    for e in entries:
        if len(e) == 3:
            items.append((_ti(e[0], tarfile.LNKTYPE, linkname=e[2]), None))
        elif e[1] == "dir":
            items.append((_ti(e[0], tarfile.DIRTYPE), None))
        else:
            items.append((_ti(e[0]), e[1]))
    with pytest.raises(BuildError, match=why):
        _collect(io.BytesIO(_tar(items)))


def test_tar_absolute_names_are_stripped() -> None:
    root, _ = _collect(io.BytesIO(_tar([(_ti("/etc/hosts"), b"h")], tarfile.GNU_FORMAT)))
    assert root.children[b"etc"].children[b"hosts"].size == 1


def test_not_a_tar(tmp_path: Path) -> None:
    (tmp_path / "junk").write_bytes(os.urandom(3000))
    with pytest.raises(BuildError), open_tar_stream(tmp_path / "junk") as s:
        _collect(s)
    with pytest.raises(BuildError, match="regular file, FIFO"), open_tar_stream(tmp_path):
        pass
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"x" * 10000)[:50])
    with pytest.raises(BuildError), open_tar_stream(tmp_path / "bad.gz") as s:
        _collect(s)


def test_directory_walk(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "b").mkdir(parents=True)
    (src / "a").write_bytes(b"aa")
    os.link(src / "a", src / "b" / "a2")
    os.symlink("/nowhere", src / "s")
    os.mkfifo(src / "p")
    os.setxattr(src / "a", "user.x", b"1")
    tree = walk_directory(src)
    names = [p for p, _ in iter_nodes(tree.root)]
    assert names == [b"/", b"/a", b"/b", b"/b/a2", b"/p", b"/s"]
    assert len(tree.files) == 1 and tree.files[0].rel == b"/a"
    assert tree.root.children[b"b"].children[b"a2"].data is tree.root.children[b"a"].data
    assert tree.root.children[b"a"].xattrs == {b"user.x": b"1"}
    assert tree.root.children[b"s"].symlink == b"/nowhere"
    with pytest.raises(BuildError, match="not a directory"):
        walk_directory(src / "a")
    with pytest.raises(BuildError):
        walk_directory(tmp_path / "missing")


def test_options() -> None:
    assert parse_chunk_size("0x1000") == 4096 and parse_chunk_size("1048576") == 1 << 20
    for bad in ("0x800", "0x2000000", "3000", "zz"):
        with pytest.raises(InvalidArgument):
            parse_chunk_size(bad)
    with pytest.raises(InvalidArgument):
        BuildOptions(fs_version=5, blob_toc=True)
    assert parse_prefetch_patterns(["/usr/bin/", "rel", "/usr/bin/ls", "/etc", ""]) == ("/etc", "/usr/bin")


def _f(name: bytes, body: bytes = b"") -> Node:
    return Node(name=name, mode=stat.S_IFREG | 0o644, data=FileData(size=len(body)))


def test_overlay_oci_and_overlayfs() -> None:
    lower = new_dir(b"/")
    lower.children = {b"keep": _f(b"keep"), b"gone": _f(b"gone"), b"d": new_dir(b"d"), b"o": new_dir(b"o")}
    lower.children[b"d"].children = {b"x": _f(b"x")}
    lower.children[b"o"].children = {b"old": _f(b"old")}
    upper = new_dir(b"/", mode=0o700)
    upper.children = {b".wh.gone": _f(b".wh.gone"), b"o": new_dir(b"o"), b"d": _f(b"d")}
    upper.children[b"o"].children = {b".wh..wh..opq": _f(b".wh..wh..opq"), b"new": _f(b"new")}
    overlay(lower, upper, WhiteoutSpec.OCI)
    assert [p for p, _ in iter_nodes(lower)] == [b"/", b"/d", b"/keep", b"/o", b"/o/new"]
    assert stat.S_IMODE(lower.mode) == 0o700 and not lower.children[b"d"].is_dir

    lower2 = new_dir(b"/")
    lower2.children = {b"a": _f(b"a"), b"o": new_dir(b"o")}
    lower2.children[b"o"].children = {b"old": _f(b"old")}
    up2 = new_dir(b"/")
    wh = Node(name=b"a", mode=stat.S_IFCHR, rdev=0)
    op = new_dir(b"o")
    op.xattrs = {b"trusted.overlay.opaque": b"y"}
    op.children = {b"n": _f(b"n")}
    up2.children = {b"a": wh, b"o": op}
    overlay(lower2, up2, WhiteoutSpec.OVERLAYFS)
    assert [p for p, _ in iter_nodes(lower2)] == [b"/", b"/o", b"/o/n"]
    assert lower2.children[b"o"].xattrs == {}

    alone = new_dir(b"/")
    alone.children = {b".wh.x": _f(b".wh.x"), b"y": _f(b"y")}
    drop_whiteouts(alone, WhiteoutSpec.OCI)
    assert list(alone.children) == [b"y"]


def test_pipeline_short_stream_and_inflight_bound() -> None:
    from nydusd.builder.chunker import ChunkDict, ChunkPipeline
    from nydusd.builder.tree import BlobRef

    out = io.BytesIO()
    w = BlobWriter(out, fs_version=6, compressor=Compressor.LZ4_BLOCK, digester=DigestAlgorithm.BLAKE3,
                   chunk_size=4096, aligned=True)
    with ChunkPipeline(chunk_size=4096, compressor=Compressor.LZ4_BLOCK, digester=DigestAlgorithm.BLAKE3,
                       writer=w, new_blob=BlobRef(None), chunk_dict=ChunkDict(), workers=2) as pipe:
        data = FileData(size=100 * 4096)
        body = b"".join(bytes([i]) * 4096 for i in range(50)) * 2  # second half repeats the first
        pipe.add_stream(data, io.BytesIO(body), "f")
        assert len(pipe._inflight) < pipe.max_inflight
        pipe.finish()
        assert (pipe.stats.new_chunks, pipe.stats.dedup_chunks) == (50, 50)
        assert [c.chunk for c in data.chunks[:50]] == [c.chunk for c in data.chunks[50:]]
        with pytest.raises(BuildError, match="shorter than its recorded size"):
            pipe.add_stream(FileData(size=10), io.BytesIO(b"abc"), "short")
