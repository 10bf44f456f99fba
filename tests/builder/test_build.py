"""End-to-end builds read back with the real format library: round trips (v5/v6 x compressors x
digesters), tar sources (plain/gzip/zstd, stdin, FIFO), dedup, determinism, inline meta, the CLI,
bad input leaving no output, and the kernel EROFS oracle for v6."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
from pathlib import Path

import pytest

from nydusd.builder import BuildOptions, SourceType, build
from nydusd.errors import BuildError, InvalidArgument
from nydusd.rafs import load_bootstrap
from nydusd.rafs.content import LocalBlobs, read_chunk
from tests.harness.images import build_image, make_tree, snapshot_dir, snapshot_image

ROOT = Path(__file__).resolve().parents[2]
NYDUS_IMAGE = [str(Path(sys.executable).parent / "nydus-image")]
IS_ROOT = os.geteuid() == 0


def _spec(big: bytes) -> dict:
    spec = {
        "a.txt": b"hello world\n", "empty": b"", "big": big, "d/": None, "d/e/": None,
        "d/e/deep": b"x" * 5000,
        "d/link": ("symlink", "../a.txt"), "d/abs": ("symlink", "/etc/passwd"),
        "d/out": ("symlink", "../../../../outside"), "d/hard": ("hardlink", "a.txt"),
        "d/e/hard2": ("hardlink", "a.txt"), "emptydir/": None, "f": ("fifo",),
        "n" * 255: b"long name", "a.txt@user.foo": b"bar", "d@user.dir": b"dirattr",
        "big@user.empty": b"",
    }
    if IS_ROOT:
        spec["dev"] = ("chr", 1, 3)
    return spec


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src") / "tree"
    big = os.urandom(300_000) + b"\0" * 200_000 + os.urandom(100_000)  # several 64 KiB chunks
    make_tree(src, _spec(big))
    os.chmod(src / "d" / "e" / "deep", 0o4751)
    if IS_ROOT:
        os.chown(src / "a.txt", 1234, 5678)
        os.lchown(src / "d" / "link", 42, 43)
    return src


def _compare(img_boot: Path, blob_dir: Path, src: Path, with_owner: bool = True,
             blob_files: dict[str, str] | None = None) -> None:
    got = snapshot_image(img_boot, blob_dir, blob_files=blob_files, with_owner=with_owner)
    want = snapshot_dir(src, with_owner=with_owner)
    diff = {k: (got.get(k), want.get(k)) for k in set(got) | set(want) if got.get(k) != want.get(k)}
    assert not diff


@pytest.mark.parametrize("fs_version", [5, 6])
@pytest.mark.parametrize("compressor", ["none", "lz4_block", "zstd"])
@pytest.mark.parametrize("digester", ["blake3", "sha256"])
def test_directory_roundtrip(tmp_path: Path, source_tree: Path, fs_version: int, compressor: str,
                             digester: str) -> None:
    img = build_image(source_tree, tmp_path / "out", fs_version=fs_version, compressor=compressor,
                      digester=digester, chunk_size=0x10000)
    _compare(img.bootstrap, img.blob_dir, source_tree)
    with load_bootstrap(str(img.bootstrap)) as sb:
        assert (sb.version, sb.compressor.value, sb.digester.value) == (fs_version, compressor, digester)
        assert [b.blob_id for b in sb.blobs] == [img.blob_id]
    # blob id = sha256 of the blob file (v6 without blob-toc has no blob.digest segment)
    assert img.blob_path is not None
    assert hashlib.sha256(img.blob_path.read_bytes()).hexdigest() == img.blob_id


def test_v5_aligned_chunk_and_symlinked_source(tmp_path: Path, source_tree: Path) -> None:
    link = tmp_path / "link-to-src"
    os.symlink(source_tree, link)
    img = build_image(link, tmp_path / "out", fs_version=5, compressor="lz4_block", aligned_chunk=True,
                      chunk_size=0x10000)
    _compare(img.bootstrap, img.blob_dir, source_tree)
    with load_bootstrap(str(img.bootstrap)) as sb:
        assert sb.blobs[0].features & 0x1  # ALIGNED
        offsets = [c.uncompressed_offset for _, i in sb.walk() if i.is_reg for c in sb.chunks(i.ino)]
        assert offsets and all(o % 4096 == 0 for o in offsets)


def test_repeatable_drops_owner(tmp_path: Path, source_tree: Path) -> None:
    img = build_image(source_tree, tmp_path / "out", explicit_uidgid=False)
    with load_bootstrap(str(img.bootstrap)) as sb:
        assert not sb.explicit_uid_gid
        assert {i.uid for _, i in sb.walk()} == {0}
    _compare(img.bootstrap, img.blob_dir, source_tree, with_owner=False)


def test_blob_toc_and_id_excludes_digest_payload(tmp_path: Path, source_tree: Path) -> None:
    img = build_image(source_tree, tmp_path / "out", blob_toc=True, chunk_size=0x10000)
    _compare(img.bootstrap, img.blob_dir, source_tree)
    assert img.blob_path is not None
    blob = img.blob_path.read_bytes()
    with load_bootstrap(str(img.bootstrap)) as sb:
        info = sb.blobs[0]
        assert info.features & 0x70000021 == 0x70000021
        n = info.chunk_count
    start = info.ci_offset + info.ci_compressed_size + 4096 + 512
    assert hashlib.sha256(blob[:start] + blob[start + 32 * n:]).hexdigest() == img.blob_id
    assert hashlib.sha256(blob[-info.blob_toc_size:]).digest() == info.blob_toc_digest
    # nydusify's naming: the same bytes, named by the SHA-256 of the whole file (its layer digest)
    whole = build_image(source_tree, tmp_path / "whole", blob_toc=True, chunk_size=0x10000,
                        blob_id_from_file=True)
    assert whole.blob_path is not None and whole.blob_path.read_bytes() == blob
    assert whole.blob_id == hashlib.sha256(blob).hexdigest() != img.blob_id
    with load_bootstrap(str(whole.bootstrap)) as sb:
        assert sb.blobs[0].blob_id == whole.blob_id
    _compare(whole.bootstrap, whole.blob_dir, source_tree)


def _tar_of(src: Path, dest: Path) -> Path:
    subprocess.run(["tar", "--xattrs", "--xattrs-include=user.*", "--format=pax", "--sort=name",
                    "-C", str(src), "-cf", str(dest), "."], check=True)
    return dest


@pytest.mark.parametrize("codec", ["plain", "gzip", "zstd"])
def test_tar_roundtrip(tmp_path: Path, source_tree: Path, codec: str) -> None:
    tar = _tar_of(source_tree, tmp_path / "layer.tar")
    if codec == "gzip":
        tar.with_suffix(".gz").write_bytes(gzip.compress(tar.read_bytes()))
        tar = tar.with_suffix(".gz")
    elif codec == "zstd":
        subprocess.run(["zstd", "-q", str(tar), "-o", str(tar) + ".zst"], check=True)
        tar = Path(str(tar) + ".zst")
    img = build_image(tar, tmp_path / "out", tar=True, chunk_size=0x10000)
    _compare(img.bootstrap, img.blob_dir, source_tree)


def test_tar_from_stdin_and_fifo_via_cli(tmp_path: Path, source_tree: Path) -> None:
    tar = _tar_of(source_tree, tmp_path / "layer.tar")
    out1 = tmp_path / "o1"
    out1.mkdir()
    with open(tar, "rb") as stdin:
        subprocess.run([*NYDUS_IMAGE, "create", "--type", "tar-rafs", "--log-level", "warn",
                        "--blob-dir", str(out1), "--bootstrap", str(out1 / "b.boot"), "-"],
                       stdin=stdin, check=True, cwd=ROOT)
    _compare(out1 / "b.boot", out1, source_tree)
    # FIFO in, FIFO out (the converter's invocation), blob read concurrently
    fifo_in, fifo_out = tmp_path / "in.fifo", tmp_path / "out.fifo"
    os.mkfifo(fifo_in)
    os.mkfifo(fifo_out)
    got = bytearray()

    def feed() -> None:
        with open(fifo_in, "wb") as w:
            w.write(tar.read_bytes())

    def drain() -> None:
        with open(fifo_out, "rb") as r:
            got.extend(r.read())

    threads = [threading.Thread(target=feed), threading.Thread(target=drain)]
    for t in threads:
        t.start()
    res = subprocess.run([*NYDUS_IMAGE, "create", "--log-level", "warn", "--prefetch-policy", "fs",
                          "--blob", str(fifo_out), "--whiteout-spec", "none", "--fs-version", "6",
                          "--type", "tar-rafs", "--blob-inline-meta", "--features", "blob-toc",
                          "--output-json", str(tmp_path / "out.json"), str(fifo_in)],
                         input=b"/\n", cwd=ROOT, capture_output=True)
    for t in threads:
        t.join(10)
    assert res.returncode == 0, res.stderr
    doc = json.loads((tmp_path / "out.json").read_text())
    assert doc["blobs"] == [hashlib.sha256(bytes(got)).hexdigest()]  # inline: id = layer digest
    assert doc["fs_version"] == "6" and doc["compressor"] == "zstd"
    blob = tmp_path / doc["blobs"][0]
    blob.write_bytes(bytes(got))
    from nydusd.rafs.blobmeta import extract_inlined_bootstrap

    with open(blob, "rb") as f:
        boot = extract_inlined_bootstrap(lambda off, size: os.pread(f.fileno(), size, off), len(got))
    (tmp_path / "inline.boot").write_bytes(boot)
    _compare(tmp_path / "inline.boot", tmp_path, source_tree, blob_files={"x" * 64: str(blob)})


def _without_digest(blob: bytes) -> bytes:
    from nydusd.rafs.blobmeta import read_toc

    toc = read_toc(lambda off, size: blob[off:off + size], len(blob))
    for e in toc:
        if e.name == "blob.digest":
            return blob[:e.compressed_offset] + blob[e.compressed_offset + e.compressed_size:]
    return blob


def test_library_api_streams_in_and_out(tmp_path: Path, source_tree: Path) -> None:
    """What the converter does: a gzip layer stream in, the blob to a caller-owned stream out,
    the bootstrap only as bytes."""
    tar = _tar_of(source_tree, tmp_path / "layer.tar")
    layer = io.BytesIO(gzip.compress(tar.read_bytes()))
    blob = io.BytesIO()
    out = build(layer, BuildOptions(source_type=SourceType.TARBALL, whiteout_spec="none", blob_toc=True),
                blob_file=blob)
    assert out.bootstrap_path is None and out.blob_path is None and not blob.closed
    assert out.blob_id == hashlib.sha256(_without_digest(blob.getvalue())).hexdigest()
    assert out.blobs == [out.blob_id]
    (tmp_path / "b.boot").write_bytes(out.bootstrap)
    (tmp_path / out.blob_id).write_bytes(blob.getvalue())
    _compare(tmp_path / "b.boot", tmp_path, source_tree)
    assert list(tmp_path.iterdir()) and not [p for p in tmp_path.iterdir() if p.name.startswith(".nydus-tmp")]


def test_dedup_within_image_and_against_parent(tmp_path: Path) -> None:
    data = os.urandom(4 << 20)
    src = make_tree(tmp_path / "src", {"one": data, "sub/two": data})
    img = build_image(src, tmp_path / "out", compressor="none")
    assert img.blob_path is not None
    with load_bootstrap(str(img.bootstrap)) as sb:
        blob = sb.blobs[0]
        assert blob.chunk_count == 4 and blob.compressed_size == img.blob_path.stat().st_size
        assert (4 << 20) < blob.compressed_size < (4 << 20) + 8192  # one copy + blob meta
        one, two = sb.resolve("/one"), sb.resolve("/sub/two")
        assert sb.chunks(one.ino) == sb.chunks(two.ino)
    # a layer on top: an old file copied + a new one -> only the new chunks land in its blob
    up = make_tree(tmp_path / "up", {"three": data, "new": b"n" * 10})
    layer = build_image(up, tmp_path / "out2", compressor="none", parent=img.bootstrap)
    with load_bootstrap(str(layer.bootstrap)) as sb:
        ids = [b.blob_id for b in sb.blobs]
        assert ids == [img.blob_id, layer.blob_id]
        assert sb.blobs[1].chunk_count == 1
        assert {c.blob_index for c in sb.chunks(sb.resolve("/three").ino)} == {0}
    both = tmp_path / "both"
    both.mkdir()
    for p in (img.blob_path, layer.blob_path):
        assert p is not None
        os.link(p, both / p.name)
    got = snapshot_image(layer.bootstrap, both)
    assert set(got) == {b"/", b"/one", b"/sub", b"/sub/two", b"/three", b"/new"}
    assert got[b"/three"].sha256 == hashlib.sha256(data).hexdigest()
    # nothing new at all: no blob is written
    same = build_image(make_tree(tmp_path / "same", {"again": data}), tmp_path / "out3",
                       compressor="none", parent=img.bootstrap)
    assert same.blob_id is None and same.blobs == [img.blob_id]


def test_chunk_dict(tmp_path: Path) -> None:
    data = os.urandom(1 << 20)
    base = build_image(make_tree(tmp_path / "a", {"x": data}), tmp_path / "oa")
    img = build_image(make_tree(tmp_path / "b", {"y": data, "z": b"zz"}), tmp_path / "ob",
                      chunk_dict=str(base.bootstrap))
    with load_bootstrap(str(img.bootstrap)) as sb:
        assert [b.blob_id for b in sb.blobs] == [base.blob_id, img.blob_id]
        assert sb.blobs[1].chunk_count == 1
    with pytest.raises(InvalidArgument, match="incompatible"):
        build_image(make_tree(tmp_path / "c", {"y": data}), tmp_path / "oc", digester="sha256",
                    chunk_dict=str(base.bootstrap))


def test_deterministic(tmp_path: Path, source_tree: Path) -> None:
    outs = []
    for i in range(2):
        img = build_image(source_tree, tmp_path / f"o{i}", blob_toc=True, workers=i + 1)
        outs.append(img)
    assert outs[0].bootstrap.read_bytes() == outs[1].bootstrap.read_bytes()
    assert outs[0].blob_id == outs[1].blob_id


def test_prefetch_files_lead_the_blob(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", {"a/1": os.urandom(10000), "z/2": os.urandom(10000)})
    img = build_image(src, tmp_path / "out", prefetch_patterns=("/z",))
    with load_bootstrap(str(img.bootstrap)) as sb:
        z = sb.resolve("/z/2")
        assert sb.chunks(z.ino)[0].compressed_offset == 0
        assert [sb.path_of(i) for i in sb.prefetch_inodes()] == [b"/z"]


def _cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*NYDUS_IMAGE, *args], input=stdin, capture_output=True, cwd=ROOT)


def test_cli_create_json_and_help(tmp_path: Path, source_tree: Path) -> None:
    help_text = _cli("create", "-h").stdout.decode()
    for needle in ("--type", "tar-rafs", "--batch-size", "--encrypt"):
        assert needle in help_text
    out = tmp_path / "out"
    out.mkdir()
    res = _cli("create", "--log-level", "warn", "--fs-version", "5", "--compressor", "lz4_block",
               "--blob-dir", str(out), "--output-json", str(tmp_path / "j.json"), str(source_tree))
    assert res.returncode == 0, res.stderr
    doc = json.loads((tmp_path / "j.json").read_text())
    assert doc["fs_version"] == "5" and doc["compressor"] == "lz4_block" and len(doc["blobs"]) == 1
    assert sorted(p.name for p in out.iterdir()) == sorted([doc["blobs"][0], Path(doc["bootstrap"]).name])
    _compare(Path(doc["bootstrap"]), out, source_tree)


@pytest.mark.parametrize("args, code", [
    (["--chunk-size", "0x3000"], 2),
    (["--compressor", "brotli"], 2),
    (["--fs-version", "5", "--features", "blob-toc"], 2),
    (["--type", "tar-rafs"], 1),          # a directory is not a tar
    (["--type", "targz-ref"], 2),
    (["--blob-inline-meta", "--blob-id", "x"], 2),
])
def test_cli_bad_options_leave_nothing(tmp_path: Path, source_tree: Path, args: list[str], code: int) -> None:
    out = tmp_path / "out"
    out.mkdir()
    res = _cli("create", *args, "--blob-dir", str(out), "--bootstrap", str(out / "b"), str(source_tree))
    assert res.returncode == code, res.stderr
    assert res.stderr.startswith(b"error: ")
    assert list(out.iterdir()) == []


def _malicious_tars(tmp_path: Path) -> dict[str, Path]:
    out = {}

    def mk(name: str, members: list[tuple[str, bytes, str | None]]) -> None:
        p = tmp_path / f"{name}.tar"
        with tarfile.open(p, "w", format=tarfile.GNU_FORMAT) as tf:
            for mname, data, link in members:
                ti = tarfile.TarInfo(mname)
                if link is not None:
                    ti.type, ti.linkname = tarfile.LNKTYPE, link
                    tf.addfile(ti)
                else:
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
        out[name] = p

    mk("dotdot", [("ok", b"1" * 100000, None), ("../../etc/shadow", b"x", None)])
    mk("dup", [("a", b"1", None), ("a", b"2", None)])
    mk("hardlink_later", [("h", b"", "later"), ("later", b"x", None)])
    mk("longname", [("d/" + "x" * 300, b"x", None)])
    (tmp_path / "truncated.tar").write_bytes((tmp_path / "dotdot.tar").read_bytes()[:5000])
    out["truncated"] = tmp_path / "truncated.tar"
    return out


def test_malicious_tars_fail_cleanly(tmp_path: Path) -> None:
    threads = threading.active_count()
    for name, tar in _malicious_tars(tmp_path).items():
        out = tmp_path / f"out-{name}"
        out.mkdir()
        opts = BuildOptions(source_type=SourceType.TARBALL, blob_dir=str(out),
                            bootstrap_path=str(out / "boot"))
        with pytest.raises(BuildError):
            build(str(tar), opts)
        assert list(out.iterdir()) == [], name
        assert threading.active_count() == threads  # the worker pool is gone
        res = _cli("create", "--type", "tar-rafs", "--blob-dir", str(out), "--bootstrap", str(out / "b"),
                   str(tar))
        assert res.returncode == 1 and b"error: " in res.stderr and b"Traceback" not in res.stderr
        assert list(out.iterdir()) == [], name


def test_unreadable_file(tmp_path: Path) -> None:
    top = Path(tempfile.mkdtemp(prefix="nydus-unreadable-"))  # outside pytest's 0700 tmp root
    try:
        top.chmod(0o755)
        src = make_tree(top / "src", {"ok": b"fine", "secret": b"s"})
        (src / "secret").chmod(0)
        out = top / "out"
        out.mkdir(mode=0o777)
        out.chmod(0o777)
        cmd = [*NYDUS_IMAGE, "create", "--blob-dir", str(out), str(src)]
        if IS_ROOT:  # root reads anything: run the builder as nobody
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        res = subprocess.run(cmd, capture_output=True)
        assert res.returncode == 1
        assert b"cannot read file: Permission denied" in res.stderr and b"secret" in res.stderr
        assert list(out.iterdir()) == []
    finally:
        shutil.rmtree(top)


def test_v5_inline_meta_and_blob_file(tmp_path: Path, source_tree: Path) -> None:
    """The old converter invocation for v5: inline bootstrap into a single --blob file."""
    blob = tmp_path / "layer.blob"
    res = _cli("create", "--log-level", "warn", "--fs-version", "5", "--source-type", "directory",
               "--inline-bootstrap", "--compressor", "lz4_block", "--blob", str(blob), str(source_tree))
    assert res.returncode == 0, res.stderr
    from nydusd.rafs.blobmeta import extract_inlined_bootstrap

    data = blob.read_bytes()
    boot = tmp_path / "inline.boot"
    boot.write_bytes(extract_inlined_bootstrap(lambda off, size: data[off:off + size], len(data)))
    _compare(boot, tmp_path, source_tree, blob_files={"*": str(blob)})


def test_stat_reports_dedup(tmp_path: Path) -> None:
    data = os.urandom(4 << 20)
    img = build_image(make_tree(tmp_path / "src", {"one": data, "two": data}), tmp_path / "out",
                      compressor="none")
    res = subprocess.run([*NYDUS_IMAGE, "stat", "-B", str(img.bootstrap), "-J", str(tmp_path / "s.json")],
                         capture_output=True)
    if res.returncode == 2 and b"invalid choice" in res.stderr:
        pytest.skip("nydus-image stat is not available")
    assert res.returncode == 0, res.stderr
    doc = json.loads((tmp_path / "s.json").read_text())["base_image"]
    assert doc["chunks"] == 8 and doc["file_size"] == 8 << 20
    assert img.blob_path is not None and img.blob_path.stat().st_size < (4 << 20) + 8192


def test_tar_sparse_and_special_links(tmp_path: Path) -> None:
    """GNU sparse members read back as their full contents; a hard link to a symlink is a copy."""
    sparse = tmp_path / "s" / "sparse"
    sparse.parent.mkdir()
    with open(sparse, "wb") as f:
        f.seek(3 << 20)
        f.write(b"tail")
    os.symlink("sparse", tmp_path / "s" / "sym")
    os.link(tmp_path / "s" / "sym", tmp_path / "s" / "sym2", follow_symlinks=False)
    tar = tmp_path / "s.tar"
    subprocess.run(["tar", "--sparse", "--format=gnu", "-C", str(tmp_path / "s"), "-cf", str(tar), "."],
                   check=True)
    img = build_image(tar, tmp_path / "out", tar=True)
    got = snapshot_image(img.bootstrap, img.blob_dir)
    want = hashlib.sha256(b"\0" * (3 << 20) + b"tail").hexdigest()
    assert got[b"/sparse"].sha256 == want and got[b"/sparse"].size == (3 << 20) + 4
    assert got[b"/sym"].symlink == got[b"/sym2"].symlink == b"sparse"
    assert img.blob_path is not None and img.blob_path.stat().st_size < 64 << 10  # zero chunks dedup


def _raw_device(boot: Path, blob_dir: Path, dest: Path) -> None:
    """The blob's uncompressed view: every chunk's bytes at its uncompressed offset."""
    with load_bootstrap(str(boot)) as sb, LocalBlobs(str(blob_dir)) as blobs, open(dest, "wb") as f:
        blob = sb.blobs[0]
        f.truncate(blob.uncompressed_size)
        for _, ino in sb.walk():
            if ino.is_reg:
                for c in sb.chunks(ino.ino):
                    f.seek(c.uncompressed_offset)
                    f.write(read_chunk(blobs, c, blob))


@pytest.mark.root
def test_v6_kernel_erofs_mount(tmp_path: Path, source_tree: Path) -> None:
    img = build_image(source_tree, tmp_path / "out", compressor="none", chunk_size=0x10000)
    raw = tmp_path / "blob.raw"
    _raw_device(img.bootstrap, img.blob_dir, raw)
    subprocess.run(["fsck.erofs", f"--device={raw}", str(img.bootstrap)], check=True, capture_output=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    # this kernel wants a block device for device=: attach the raw view to a loop device
    loop = subprocess.run(["losetup", "-f", "--show", "-r", str(raw)], check=True, capture_output=True,
                          text=True).stdout.strip()
    try:
        subprocess.run(["mount", "-t", "erofs", "-o", f"ro,device={loop}", str(img.bootstrap), str(mnt)],
                       check=True, capture_output=True)
        try:
            got, want = snapshot_dir(mnt), snapshot_dir(source_tree)
            diff = {k: (got.get(k), want.get(k)) for k in set(got) | set(want) if got.get(k) != want.get(k)}
            assert not diff
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
