"""`nydus-image check | inspect | stat | unpack` end to end on upstream fixtures and generated
images: exit codes, upstream JSON keys, and unpacked tars that extract to the recorded trees."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from nydusd.cli.image import main
from nydusd.rafs import load_bootstrap
from tests.rafs.imagegen import Spec, build_image
from tests.rafs.test_fixtures import V5_IMAGES, V6_BLOB, V6_BOOT, parse_result

BLOB5 = "repeatable/blobs/7334a2594e133cf8ae364189c2276b090fc490c627bcc3fb1077f0419a538e00"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("name", [*V5_IMAGES, V6_BOOT])
def test_check_fixtures(capsys: pytest.CaptureFixture[str], tmp_path: Path, upstream: Path,
                        name: str) -> None:
    blob_dir = upstream / ("blobs" if name == V6_BOOT else "repeatable/blobs")
    out_json = tmp_path / "check.json"
    rc, out, _ = run(capsys, "check", str(upstream / name), "-D", str(blob_dir), "-J", str(out_json), "-v")
    assert rc == 0
    assert "RAFS filesystem metadata is valid, referenced data blobs: " in out
    doc = json.loads(out_json.read_text())
    assert {"blobs", "fs_version", "compressor", "version", "bootstrap"} <= doc.keys()
    assert doc["fs_version"] == ("6" if name == V6_BOOT else "5")
    assert doc["compressor"] == ("zstd" if name == V6_BOOT else "none")
    assert doc["blobs"] == [Path(V6_BLOB if name == V6_BOOT else BLOB5).name]
    assert out_json.read_text() == json.dumps(doc, separators=(",", ":"))  # compact, as upstream


def test_check_rejects_corrupt_and_missing(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                           upstream: Path) -> None:
    data = bytearray((upstream / V5_IMAGES[0]).read_bytes())
    data[0x2120 + 4:0x2120 + 8] = b"\0\xf0\0\0"  # unknown incompatible blob feature
    bad = tmp_path / "bad"
    bad.write_bytes(bytes(data))
    rc, _, err = run(capsys, "check", "--bootstrap", str(bad))
    assert rc != 0 and "features" in err and "offset=" in err
    rc, _, err = run(capsys, "check", str(tmp_path / "missing"))
    assert rc != 0 and "not found" in err
    good = bytearray((upstream / V5_IMAGES[0]).read_bytes())
    good[8544] ^= 0xFF  # the root's Merkle digest
    bad.write_bytes(bytes(good))
    rc, _, err = run(capsys, "check", str(bad))
    assert rc != 0 and "digest" in err


def test_inspect_requests(capsys: pytest.CaptureFixture[str], upstream: Path) -> None:
    boot = str(upstream / V5_IMAGES[0])

    def ask(req: str) -> object:
        rc, out, _ = run(capsys, "inspect", boot, "-R", req)
        assert rc == 0
        return json.loads(out)

    # as upstream's inspect: the superblock's s_inodes_count (51 here), not the 54 inode-table slots
    assert ask("stats")["inodes_count"] == 51  # type: ignore[index]
    blobs = ask("blobs")
    assert blobs[0]["blob_id"] == Path(BLOB5).name  # type: ignore[index]
    assert {"readahead_offset", "readahead_size", "decompressed_size", "compressed_size"} <= blobs[0].keys()  # type: ignore[index]
    assert ask("prefetch") == []
    assert [e["name"] for e in ask("ls /")] == ["hardlink-test", "normal-file-test", "symlink-test"]  # type: ignore[union-attr,index]
    st = ask("stat /hardlink-test/foo")
    assert st["nlink"] == 3 and st["size"] == 944  # type: ignore[index]
    chunks = ask("chunks /hardlink-test/foo")
    assert chunks[0]["blob_id"] == Path(BLOB5).name and chunks[0]["uncompressed_size"] == 944  # type: ignore[index]
    where = chunks[0]["compressed_offset"]  # type: ignore[index]
    assert "/hardlink-test/foo" in [h["path"] for h in ask(f"chunk {where}")]  # type: ignore[union-attr,index]
    assert ask(f"icheck {st['inode']}")["path"] == "/hardlink-test/foo"  # type: ignore[index]
    rc, _, err = run(capsys, "inspect", boot, "-R", "frobnicate")
    assert rc == 2 and "unknown request" in err
    rc, _, err = run(capsys, "inspect", boot, "-R", "stat /nope")
    assert rc != 0 and "no such entry" in err


def test_stat_json(capsys: pytest.CaptureFixture[str], tmp_path: Path, upstream: Path) -> None:
    out_json = tmp_path / "stat.json"
    rc, out, _ = run(capsys, "stat", "-B", str(upstream / V5_IMAGES[0]), "-J", str(out_json),
                     "-T", str(upstream / V5_IMAGES[1]))
    assert rc == 0 and out == ""  # as upstream: the JSON instead of the text dump
    doc = json.loads(out_json.read_text())
    base = doc["base_image"]
    assert list(doc) == ["dedup_enabled", "target_enabled", "base_image", "target_image"]
    assert doc["target_enabled"] and not doc["dedup_enabled"]
    # files: every name of a regular file (23, of 21 inodes); --bootstrap: own_*, no dedup_*
    counts = (base["files"], base["dirs"], base["symlinks"], base["chunks"], base["own_chunks"],
              base["dedup_chunks"])
    assert counts == (23, 24, 7, 27, 23, 0)
    assert len(base["chunk_sizes"]) == 9 and len(base["file_sizes"]) == 45
    # same content, other digester: no chunk of the target is found in the base
    assert doc["target_image"]["own_chunks"] == 23 and doc["target_image"]["ref_chunks"] == 0


def _extract(tar_path: Path, dest: Path) -> None:
    with tarfile.open(tar_path) as tar:
        tar.extractall(dest, filter="tar" if hasattr(tarfile, "tar_filter") else None)


def _disk_tree(root: Path) -> tuple[dict[bytes, tuple[str, str | None]], dict[bytes, str]]:
    tree: dict[bytes, tuple[str, str | None]] = {b"/": ("directory", None)}
    md5s: dict[bytes, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            rel = b"/" + os.fsencode(p.relative_to(root))
            if p.is_symlink():
                tree[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                tree[rel] = ("directory", None)
            else:
                tree[rel] = ("file", None)
                md5s[rel] = hashlib.md5(p.read_bytes()).hexdigest()
    return tree, md5s


@pytest.mark.parametrize("name", V5_IMAGES)
def test_unpack_fixture_extracts_to_result_tree(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                upstream: Path, name: str) -> None:
    out = tmp_path / "out.tar"
    rc, _, err = run(capsys, "unpack", str(upstream / name), "--blob", str(upstream / BLOB5),
                     "--output", str(out))
    assert rc == 0, err
    _extract(out, tmp_path / "x")
    tree, md5s = parse_result(upstream / (name + ".result"))
    got_tree, got_md5 = _disk_tree(tmp_path / "x")
    assert got_tree == tree
    assert {p: got_md5[p] for p in md5s} == md5s
    a, b = (tmp_path / "x/hardlink-test/foo").stat(), (tmp_path / "x/normal-file-test/test.sh").stat()
    assert a.st_ino == b.st_ino and a.st_nlink == 3


def test_unpack_v6_fixture_via_backend_config(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                               upstream: Path) -> None:
    out = tmp_path / "out.tar"
    rc, _, err = run(capsys, "unpack", "--bootstrap", str(upstream / V6_BOOT), "--backend-type", "localfs",
                     "--backend-config", json.dumps({"dir": str(upstream / "blobs")}), "--output", str(out))
    assert rc == 0, err
    with tarfile.open(out) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == {"lib.rs", "sync_io.rs"}
        lib = tar.extractfile(members["lib.rs"]).read()  # type: ignore[union-attr]
    assert len(lib) == 16931 and lib.startswith(b"// Copyright (C) 2020 Alibaba Cloud")
    rc, _, err = run(capsys, "unpack", str(upstream / V6_BOOT), "--output", str(out))
    assert rc == 2 and "exactly one of" in err
    rc, _, err = run(capsys, "unpack", str(upstream / V6_BOOT), "--blob-dir", str(tmp_path),
                     "--output", str(out))
    assert rc != 0 and V6_BLOB.split("/")[1] in err


def test_unpack_special_files_xattrs_and_times(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    spec = Spec("dir", perm=0o755, children={
        b"f": Spec("file", data=os.urandom(9000), perm=0o4755, uid=1000, gid=50, mtime=1234567890,
                   nsec=123456789, xattrs={b"user.k": b"\xff\x00bin", b"security.capability": b"cap"}),
        b"h": Spec("link", target=b"/f"),
        b"c": Spec("chr", rdev=os.makedev(4, 64)),
        b"b": Spec("blk", rdev=os.makedev(259, 70000)),
        b"p": Spec("fifo", perm=0o600),
        b"s": Spec("symlink", target=b"f"),
        b"d": Spec("dir", perm=0o711, children={b"e": Spec("file")}),
    })
    for version in (5, 6):
        image = build_image(spec, version=version)
        boot, blob = tmp_path / f"boot{version}", tmp_path / image.blob_id
        boot.write_bytes(image.bootstrap)
        blob.write_bytes(image.blob)
        out = tmp_path / f"v{version}.tar"
        rc, _, err = run(capsys, "unpack", str(boot), "-D", str(tmp_path), "--output", str(out))
        assert rc == 0, err
        with tarfile.open(out) as tar:
            m = {x.name: x for x in tar.getmembers()}
            f = m["f"]
            assert (f.mode, f.uid, f.gid, f.size) == (0o4755, 1000, 50, 9000)
            assert f.pax_headers["mtime"] == "1234567890.123456789"
            assert f.pax_headers["SCHILY.xattr.user.k"].encode("utf-8", "surrogateescape") == b"\xff\x00bin"
            assert m["h"].islnk() and m["h"].linkname == "f"
            assert m["c"].ischr() and (m["c"].devmajor, m["c"].devminor) == (4, 64)
            assert m["b"].isblk() and (m["b"].devmajor, m["b"].devminor) == (259, 70000)
            assert m["p"].isfifo() and m["s"].issym() and m["s"].linkname == "f"
            assert m["d"].isdir() and m["d"].mode == 0o711 and m["d/e"].size == 0
            assert tar.extractfile(f).read() == spec.children[b"f"].data  # type: ignore[union-attr]
        with load_bootstrap(boot) as sb:
            assert stat.S_ISCHR(sb.resolve("/c").mode)


def test_unpack_bad_blob_leaves_no_tar(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                       upstream: Path) -> None:
    blob = bytearray((upstream / BLOB5).read_bytes())
    blob[2734] ^= 0xFF  # the VERSION file's only chunk: digest mismatch
    bad = tmp_path / "blob"
    bad.write_bytes(bytes(blob))
    out = tmp_path / "out.tar"
    rc, _, err = run(capsys, "unpack", str(upstream / V5_IMAGES[0]), "--blob", str(bad), "--output", str(out))
    assert rc != 0 and "digest mismatch" in err
    assert not out.exists()


def test_inspect_prompt_reads_requests_from_stdin(capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch, upstream: Path) -> None:
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("stats\nls /\nstat /missing\nhelp\nexit\nblobs\n"))
    rc, out, _ = run(capsys, "inspect", str(upstream / V6_BOOT))
    assert rc == 0
    assert '"inodes_count": 3' in out and '"name": "lib.rs"' in out
    assert "error: no such entry" in out and "requests: " in out
    assert "decompressed_size" not in out  # nothing after "exit" is answered


def test_check_with_backend_config_and_stat_blob_dir(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                     upstream: Path) -> None:
    cfg = tmp_path / "nydusd.json"
    cfg.write_text(json.dumps({"device": {"backend": {"type": "localfs", "config": {
        "dir": str(upstream / "blobs")}}}, "mode": "direct"}))
    rc, out, err = run(capsys, "check", str(upstream / V6_BOOT), "-C", str(cfg))
    assert rc == 0, err
    cfg.write_text(json.dumps({"device": {"backend": {"type": "localfs", "config": {"dir": str(tmp_path)}}}}))
    rc, _, err = run(capsys, "check", str(upstream / V6_BOOT), "-C", str(cfg))
    assert rc != 0
    # both repeatable bootstraps (links, read in place): same blob, different digesters
    images = tmp_path / "images"
    images.mkdir()
    for i, name in enumerate(V5_IMAGES):
        (images / f"boot{i}").symlink_to(upstream / name)
    out_json = tmp_path / "stat.json"
    rc, _, err = run(capsys, "stat", "-D", str(images), "-J", str(out_json))
    assert rc == 0, err
    doc = json.loads(out_json.read_text())
    # own: each image's distinct chunks, summed; dedup: only the blake3 image's chunks enter the
    # dictionary (--digester defaults to blake3, as upstream)
    base = doc["base_image"]
    assert doc["dedup_enabled"] and base["own_chunks"] == 46 and base["dedup_chunks"] == 23
    assert base["chunks"] == 54 and base["dirs"] == 48 and base["files"] == 46
    rc, _, err = run(capsys, "stat", "-D", str(images), "-J", str(out_json), "--digester", "sha256")
    assert rc == 0, err
    assert json.loads(out_json.read_text())["base_image"]["dedup_chunks"] == 23


def test_bad_paths_are_clean_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                    upstream: Path) -> None:
    missing = str(tmp_path / "no" / "such")
    for argv in (["unpack", str(upstream / V6_BOOT), "-D", str(upstream / "blobs"), "--output", missing],
                 ["stat", "-D", missing],
                 ["check", str(upstream / V6_BOOT), "-J", missing]):
        rc, _, err = run(capsys, *argv)
        assert rc == 2 and err.startswith("error: ") and missing in err


@pytest.mark.parametrize("version", [5, 6])
def test_unpack_extracts_with_every_directory_mtime(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                    version: int) -> None:
    """Entries come depth first in name order, so a real ``tar -xpf`` restores every directory's
    mtime (children written after a sibling directory used to bump it to the extraction time)."""
    import subprocess

    from nydusd.builder import BuildOptions, build

    src = tmp_path / "src"
    for d in ("a/b/c", "a/d", "e", "f/g"):
        (src / d).mkdir(parents=True)
    for f in ("a/x", "a/b/y", "a/b/c/z", "a/d/w", "e/v", "f/g/u", "top"):
        (src / f).write_bytes(f.encode() * 100)
    for i, (dirpath, dirnames, filenames) in enumerate(sorted(os.walk(src), reverse=True)):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), ns=(1_600_000_000 * 10**9, 1_500_000_000_123_456_700 + i))
    os.utime(src, ns=(1_600_000_000_000_000_000, 1_500_000_000_000_000_000))
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    boot = tmp_path / "boot"
    build(str(src), BuildOptions(fs_version=version, bootstrap_path=str(boot), blob_dir=str(blobs)))
    out = tmp_path / "out.tar"
    rc, _, err = run(capsys, "unpack", str(boot), "-D", str(blobs), "--output", str(out))
    assert rc == 0, err
    with tarfile.open(out) as tar:
        names = tar.getnames()
    assert names == ["a", "a/b", "a/b/c", "a/b/c/z", "a/b/y", "a/d", "a/d/w", "a/x", "e", "e/v",
                     "f", "f/g", "f/g/u", "top"]
    dest = tmp_path / "dest"
    dest.mkdir()
    subprocess.run(["tar", "-xpf", str(out), "-C", str(dest)], check=True)
    for dirpath, dirnames, filenames in os.walk(src):
        for name in dirnames + filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), src)
            assert os.lstat(dest / rel).st_mtime_ns == os.lstat(src / rel).st_mtime_ns, rel


@pytest.mark.parametrize("name", [*V5_IMAGES, V6_BOOT])
def test_stat_fields_have_upstreams_meaning(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                            upstream: Path, name: str) -> None:
    """Every ``stat`` field against figures computed independently: from the tree a real ``tar``
    extracts out of the unpacked image (names, sizes, hard links) and from the raw chunk records."""
    import subprocess

    blobs = ["-D", str(upstream / "blobs")] if name == V6_BOOT else ["--blob", str(upstream / BLOB5)]
    rc, _, err = run(capsys, "unpack", str(upstream / name), *blobs, "--output", str(tmp_path / "t.tar"))
    assert rc == 0, err
    tree = tmp_path / "tree"
    tree.mkdir()
    subprocess.run(["tar", "-xpf", str(tmp_path / "t.tar"), "-C", str(tree)], check=True)
    names = inodes = 0
    seen: set[int] = set()
    sizes: list[int] = []
    dirs, symlinks = 1, 0  # the root
    for dirpath, dirnames, filenames in os.walk(tree):
        dirs += sum(not os.path.islink(os.path.join(dirpath, d)) for d in dirnames)
        for n in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            st = os.lstat(os.path.join(dirpath, n))
            if stat.S_ISLNK(st.st_mode):
                symlinks += 1
            elif stat.S_ISREG(st.st_mode):
                names += 1
                if st.st_ino not in seen:
                    seen.add(st.st_ino)
                    sizes.append(st.st_size)
    inodes = len(seen)
    with load_bootstrap(upstream / name) as sb:
        per_file = [sb.chunks(i.ino) for p, i in sb.walk() if i.is_reg]
        unique_inodes = {i.ino: sb.chunks(i.ino) for p, i in sb.walk() if i.is_reg}
    distinct = {c.digest: c for chunks in per_file for c in chunks}
    out_json = tmp_path / "stat.json"
    rc, _, err = run(capsys, "stat", "-B", str(upstream / name), "-J", str(out_json))
    assert rc == 0, err
    base = json.loads(out_json.read_text())["base_image"]
    padding = sum(-s % 4096 for s in sizes)
    file_chunks = [c for chunks in unique_inodes.values() for c in chunks]
    assert inodes < names or name == V6_BOOT
    assert base["files"] == names and base["dirs"] == dirs and base["symlinks"] == symlinks
    assert base["file_size"] == sum(sizes) and base["padding_size"] == padding
    assert base["chunks"] == len(file_chunks)
    assert base["comp_size"] == sum(c.compressed_size for c in file_chunks)
    assert base["uncomp_size"] == sum(c.uncompressed_size for c in file_chunks) + padding
    assert base["chunk_sizes"] == [sum(-(-s // (1 << b)) for s in sizes) for b in range(12, 21)]
    assert base["file_sizes"] == [sum(min(s.bit_length(), 44) == b for s in sizes) for b in range(45)]
    assert (base["own_chunks"], base["own_comp_size"], base["own_uncomp_size"]) == (
        len(distinct), sum(c.compressed_size for c in distinct.values()),
        sum(c.uncompressed_size for c in distinct.values()))
    assert base["dedup_chunks"] == base["ref_chunks"] == 0
    # the text dump carries the same figures, in upstream's layout
    rc, out, _ = run(capsys, "stat", "-B", str(upstream / name))
    assert rc == 0 and "Base Image Statistics:" in out and "Target Image Statistics:" not in out
    assert f"Files:                  {names}\n" in out
    assert f"Padding Size:           {padding}\n" in out
    assert f"Owned Chunk Count:\t{len(distinct)}" in out


def test_stat_target_and_dedup_roles(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                    upstream: Path) -> None:
    blake3 = str(upstream / V5_IMAGES[1])  # a BLAKE3 image: its chunks enter the (blake3) dictionary
    out_json = tmp_path / "stat.json"
    rc, _, err = run(capsys, "stat", "-B", blake3, "-T", blake3, "-J", str(out_json))
    assert rc == 0, err
    doc = json.loads(out_json.read_text())
    base, target = doc["base_image"], doc["target_image"]
    assert (base["own_chunks"], base["dedup_chunks"], base["ref_chunks"]) == (23, 0, 0)
    assert (target["own_chunks"], target["ref_chunks"]) == (0, 23)
    assert target["ref_uncomp_size"] == base["own_uncomp_size"]
    assert target["uncomp_size"] == base["uncomp_size"]  # padding added to both at finalize
    images = tmp_path / "images"
    images.mkdir()
    for n in ("a", "b"):
        (images / n).symlink_to(blake3)
    (images / "c.json").write_text("{}")  # files with an extension are not images
    rc, out, err = run(capsys, "stat", "-D", str(images))
    assert rc == 0, err
    rows = out.split("Chunk Deduplication Statistics:")[1].splitlines()[2:]
    assert len(rows) == 20
    assert rows[0].split()[:3] == ["1", "0x2e", "0x17"]  # 46 raw chunks, 23 kept at threshold 1
    assert rows[2].split()[:3] == ["3", "0x2e", "0x2e"]  # above 2 copies nothing is deduplicated
    assert "Dedup Chunk Count:\t23" in out and "Owned Chunk Count:\t46" in out
