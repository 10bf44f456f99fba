"""Layering: a 3-layer sequence (base; add/modify; delete a file, opaque dir, whiteout a subtree,
replace a file by a dir) built four ways -- dir layers with --parent-bootstrap (oci and overlayfs
whiteouts), tar layers with --parent-bootstrap, per-layer tar builds + merge -- must equal the
layers applied with overlay semantics (a reference applier here, and a real overlayfs mount)."""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from nydusd.builder.merge import MergeOptions, merge
from nydusd.errors import BuildError, InvalidArgument
from nydusd.rafs import load_bootstrap
from tests.harness.images import Entry, build_image, make_tree, snapshot_dir, snapshot_image

TOOL = os.urandom(1 << 20) + os.urandom(300_000)

LAYERS: list[dict] = [
    {"etc/": None, "etc/conf": b"v1", "bin/": None, "bin/tool": TOOL, "data/": None, "data/a": b"a",
     "data/b": b"b", "data/sub/": None, "data/sub/c": b"c", "opq/": None, "opq/x": b"x", "opq/y/": None,
     "opq/y/deep": b"deep", "tree/": None, "tree/deep/": None, "tree/deep/1": b"1", "tree/f": b"f",
     "keep": b"keep-file", "lnk": ("symlink", "etc/conf")},
    {"etc/": None, "etc/conf": b"v2-modified", "etc/new": b"new", "bin/": None, "bin/tool2": TOOL,
     "data/": None, "data/sub/": None, "data/sub/d": b"d"},
    {"data/": None, "data/.wh.a": b"", "opq/": None, "opq/.wh..wh..opq": b"", "opq/z": b"z",
     ".wh.tree": b"", "keep/": None, "keep/inner": b"inner"},
]


def _to_overlayfs(oci: Path, dest: Path) -> Path:
    """The same layer with overlayfs whiteouts: 0/0 char devices and trusted.overlay.opaque."""
    shutil.copytree(oci, dest, symlinks=True)
    for dirpath, _dirs, files in os.walk(dest):
        for name in files:
            if name == ".wh..wh..opq":
                os.unlink(os.path.join(dirpath, name))
                os.setxattr(dirpath, "trusted.overlay.opaque", b"y")
            elif name.startswith(".wh."):
                os.unlink(os.path.join(dirpath, name))
                os.mknod(os.path.join(dirpath, name[4:]), stat.S_IFCHR | 0o600, os.makedev(0, 0))
    # the edits above touched directory mtimes: restore the source's
    for dirpath, _dirs, _files in os.walk(dest):
        st = os.stat(oci / os.path.relpath(dirpath, dest))
        os.utime(dirpath, ns=(st.st_atime_ns, st.st_mtime_ns))
    return dest


def _tar(src: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tf:
        tf.add(src, arcname=".")
    return dest


def apply_layers(snaps: list[dict[bytes, Entry]]) -> dict[bytes, Entry]:
    """Reference OCI applier over snapshots: per layer, whiteouts first, then its entries."""
    out: dict[bytes, Entry] = {}

    def drop_under(path: bytes, keep_self: bool) -> None:
        prefix = path.rstrip(b"/") + b"/"
        for k in [k for k in out if k.startswith(prefix) or (not keep_self and k == path)]:
            del out[k]

    for snap in snaps:
        for path in sorted(snap):
            base = posixpath.basename(path)
            parent = posixpath.dirname(path)
            if base == b".wh..wh..opq":
                drop_under(parent, keep_self=True)
            elif base.startswith(b".wh."):
                drop_under(posixpath.join(parent, base[4:]), keep_self=False)
        for path, entry in sorted(snap.items()):
            if posixpath.basename(path).startswith(b".wh."):
                continue
            old = out.get(path)
            if old is not None and stat.S_ISDIR(old.mode) and not stat.S_ISDIR(entry.mode):
                drop_under(path, keep_self=True)
            out[path] = entry
    return out


@pytest.fixture(scope="module")
def layers(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    base = tmp_path_factory.mktemp("layers")
    return [make_tree(base / f"l{i}", spec, mtime=1_700_000_000 + i) for i, spec in enumerate(LAYERS)]


@pytest.fixture(scope="module")
def expected(layers: list[Path]) -> dict[bytes, Entry]:
    return apply_layers([snapshot_dir(p) for p in layers])


def _all_blobs(dirs: list[Path], dest: Path) -> Path:
    dest.mkdir(exist_ok=True)
    for d in dirs:
        for f in d.iterdir():
            if len(f.name) == 64 and not (dest / f.name).exists():
                os.link(f, dest / f.name)
    return dest


def _diff(got: dict[bytes, Entry], want: dict[bytes, Entry]) -> dict:
    return {k: (got.get(k), want.get(k)) for k in set(got) | set(want) if got.get(k) != want.get(k)}


@pytest.mark.parametrize("mode", ["dir-oci", "dir-overlayfs", "tar-oci"])
def test_parent_chain(tmp_path: Path, layers: list[Path], expected: dict, mode: str) -> None:
    parent = None
    outs = []
    for i, layer in enumerate(layers):
        src, spec, tar = layer, "oci", False
        if mode == "dir-overlayfs":
            src, spec = _to_overlayfs(layer, tmp_path / f"ovl{i}"), "overlayfs"
        elif mode == "tar-oci":
            src, tar = _tar(layer, tmp_path / f"l{i}.tar"), True
        img = build_image(src, tmp_path / f"o{i}", parent=parent, whiteout_spec=spec, tar=tar,
                          chunk_size=0x10000)
        outs.append(img.blob_dir)
        parent = img.bootstrap
    assert parent is not None
    got = snapshot_image(parent, _all_blobs(outs, tmp_path / "blobs"))
    assert not _diff(got, expected)
    with load_bootstrap(str(parent)) as sb:
        # layer 2 only re-added a copy of bin/tool: its chunks point into the base blob
        tool2 = sb.chunks(sb.resolve("/bin/tool2").ino)
        assert {c.blob_index for c in tool2} == {0}


def test_per_layer_tar_builds_and_merge(tmp_path: Path, layers: list[Path], expected: dict) -> None:
    boots = []
    for i, layer in enumerate(layers):
        img = build_image(_tar(layer, tmp_path / f"l{i}.tar"), tmp_path / f"o{i}", tar=True,
                          whiteout_spec="none", chunk_size=0x10000, blob_toc=True)
        assert img.blob_id is not None
        named = tmp_path / f"{img.blob_id}.boot"  # the converter names layer bootstraps by digest
        os.replace(img.bootstrap, named)
        boots.append(named)
    out = tmp_path / "merged.boot"
    res = merge([str(b) for b in boots], MergeOptions(bootstrap_path=str(out), prefetch_patterns=("/bin",)))
    got = snapshot_image(out, _all_blobs([tmp_path / f"o{i}" for i in range(3)], tmp_path / "blobs"))
    assert not _diff(got, expected)
    with load_bootstrap(str(out)) as sb:
        ids = [b.blob_id for b in sb.blobs]
        assert res.blobs == ids and sorted(ids) == sorted(b.name.split(".")[0] for b in boots)
        assert [sb.path_of(i) for i in sb.prefetch_inodes()] == [b"/bin"]
    # the CLI: same result, exit 2 on inconsistent layers
    cli = [str(Path(sys.executable).parent / "nydus-image"), "merge", "--log-level", "warn"]
    out2 = tmp_path / "merged2.boot"
    r = subprocess.run([*cli, "--prefetch-policy", "fs", "--bootstrap", str(out2), "--output-json",
                        str(tmp_path / "m.json"), *map(str, boots)], capture_output=True, input=b"/bin\n")
    assert r.returncode == 0, r.stderr
    assert out2.read_bytes() == out.read_bytes()
    v5 = build_image(layers[0], tmp_path / "v5", fs_version=5)
    bad = tmp_path / f"{v5.blob_id}.boot"
    os.replace(v5.bootstrap, bad)
    r = subprocess.run([*cli, "--bootstrap", str(tmp_path / "bad.boot"), str(boots[0]), str(bad)],
                       capture_output=True)
    assert r.returncode == 2 and b"inconsistent" in r.stderr
    assert not (tmp_path / "bad.boot").exists()
    with pytest.raises(InvalidArgument):
        merge([str(boots[0])], MergeOptions(bootstrap_path=str(out), blob_sizes=(1, 2)))


@pytest.mark.root
def test_overlayfs_mount_agrees(tmp_path: Path, layers: list[Path], expected: dict) -> None:
    """The kernel's overlayfs over the overlayfs-format layers gives the same tree as the applier."""
    ovl = [_to_overlayfs(p, tmp_path / f"ovl{i}") for i, p in enumerate(layers)]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    lower = ":".join(str(p) for p in reversed(ovl))
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower}", str(mnt)], check=True)
    try:
        got = snapshot_dir(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    # overlayfs reports the lower files' own inode attributes; directories carry the upper-most
    # attributes except that the root of a lowerdir-only mount is the top layer's root as well
    assert not _diff(got, expected)


def test_converter_flow_inline_layers_and_merge(tmp_path: Path, layers: list[Path], expected: dict) -> None:
    """nydusify's flow: each layer tar -> one blob with its bootstrap inlined (+ blob-toc); the
    bootstrap is taken out of the blob, named by the blob's digest, and the layers are merged with
    the registry digests/sizes passed explicitly."""
    from nydusd.builder import BuildOptions, SourceType, build
    from nydusd.rafs.blobmeta import extract_inlined_bootstrap

    blobs_dir = tmp_path / "blobs"
    blobs_dir.mkdir()
    boots, digests, sizes = [], [], []
    for i, layer in enumerate(layers):
        blob = tmp_path / f"layer{i}.blob"
        out = build(str(_tar(layer, tmp_path / f"l{i}.tar")), BuildOptions(
            source_type=SourceType.TARBALL, whiteout_spec="none", blob_inline_meta=True, blob_toc=True,
            blob_path=str(blob), prefetch_patterns=("/",)))
        data = blob.read_bytes()
        assert out.blob_id == hashlib.sha256(data).hexdigest()
        os.replace(blob, blobs_dir / out.blob_id)
        boot = tmp_path / f"{out.blob_id}.bootstrap"
        boot.write_bytes(extract_inlined_bootstrap(lambda off, size, d=data: d[off:off + size], len(data)))
        boots.append(str(boot))
        digests.append(f"sha256:{out.blob_id}")
        sizes.append(str(len(data)))
    merged = tmp_path / "merged.boot"
    res = merge(boots, MergeOptions(bootstrap_path=str(merged), blob_digests=tuple(digests),
                                    blob_sizes=tuple(int(s) for s in sizes)))
    assert not _diff(snapshot_image(merged, blobs_dir), expected)
    with load_bootstrap(str(merged)) as sb:
        assert sorted(b.blob_id for b in sb.blobs) == sorted(d.split(":")[1] for d in digests)
        assert {b.compressed_size for b in sb.blobs} <= {int(s) for s in sizes}
    assert res.blobs == [b.removeprefix("sha256:") for b in res.blobs]
    with pytest.raises(InvalidArgument, match="invalid digest"):
        merge(boots, MergeOptions(bootstrap_path=str(merged), blob_digests=("x", "y", "z")))


def test_implied_directories_keep_lower_attributes(tmp_path: Path) -> None:
    """A tar layer listing only ``usr/lib/x`` must not reset the lower ``/`` and ``/usr`` (as a
    container runtime applying the layer would not); a directory it creates gets 0755 root:root."""
    base = make_tree(tmp_path / "base", {"usr/": None, "usr/a": b"a"}, mtime=1_650_000_000)
    os.chmod(base / "usr", 0o750)
    os.chmod(base, 0o711)
    lower = build_image(base, tmp_path / "o0")
    tar = tmp_path / "up.tar"
    with tarfile.open(tar, "w") as tf:
        ti = tarfile.TarInfo("usr/lib/x")
        ti.size, ti.mtime = 1, 1_660_000_000
        tf.addfile(ti, io.BytesIO(b"x"))
    img = build_image(tar, tmp_path / "o1", tar=True, parent=lower.bootstrap)
    got = snapshot_image(img.bootstrap, _all_blobs([tmp_path / "o0", tmp_path / "o1"], tmp_path / "b"))
    assert (stat.S_IMODE(got[b"/"].mode), got[b"/"].mtime) == (0o711, (1_650_000_000, 0))
    assert (stat.S_IMODE(got[b"/usr"].mode), got[b"/usr"].mtime) == (0o750, (1_650_000_000, 0))
    assert stat.S_IMODE(got[b"/usr/lib"].mode) == 0o755 and got[b"/usr/lib/x"].size == 1


@pytest.mark.root
def test_merged_image_mounts_in_kernel_erofs(tmp_path: Path, layers: list[Path], expected: dict) -> None:
    """A merged v6 bootstrap referencing three blobs, mounted by the kernel with one device each."""
    from nydusd.rafs.content import LocalBlobs, read_chunk

    boots = []
    for i, layer in enumerate(layers):
        img = build_image(_tar(layer, tmp_path / f"l{i}.tar"), tmp_path / "blobs", tar=True,
                          whiteout_spec="none", compressor="none", chunk_size=0x10000,
                          bootstrap_name=f"layer{i}.boot")
        named = tmp_path / f"{img.blob_id}.boot"
        os.replace(img.bootstrap, named)
        boots.append(str(named))
    merged = tmp_path / "merged.boot"
    merge(boots, MergeOptions(bootstrap_path=str(merged)))
    raws = []
    with load_bootstrap(str(merged)) as sb, LocalBlobs(str(tmp_path / "blobs")) as blobs:
        for blob in sb.blobs:
            raw = tmp_path / f"{blob.blob_id}.raw"
            with open(raw, "wb") as f:
                f.truncate(blob.uncompressed_size)
            raws.append(raw)
        for _, ino in sb.walk():
            if ino.is_reg:
                for c in sb.chunks(ino.ino):
                    with open(raws[c.blob_index], "r+b") as f:
                        f.seek(c.uncompressed_offset)
                        f.write(read_chunk(blobs, c, sb.blobs[c.blob_index]))
    loops: list[str] = []
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        for raw in raws:
            loops.append(subprocess.run(["losetup", "-f", "--show", "-r", str(raw)], check=True,
                                        capture_output=True, text=True).stdout.strip())
        devices = ",".join(f"device={lp}" for lp in loops)
        subprocess.run(["mount", "-t", "erofs", "-o", f"ro,{devices}", str(merged), str(mnt)],
                       check=True, capture_output=True)
        try:
            assert not _diff(snapshot_dir(mnt), expected)
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        for lp in loops:
            subprocess.run(["losetup", "-d", lp], check=True)


# ---------------------------------------------------------------------------------------------------
# hard links from a layer to files of the layers below it

A_DATA = os.urandom(70_000)
G_DATA = b"group" * 5000
C_OLD, C_NEW = b"old c" * 100, b"new c"


def _layer_tar(dest: Path, members: list[tuple]) -> Path:
    """(name, data) regular files (mode 0640, uid 1000), (name, None) directories, (name, "->",
    target) hard links, in this order."""
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data, *link in members:
            ti = tarfile.TarInfo(name)
            ti.mtime, ti.uid, ti.gid, ti.mode = 1_700_000_000, 1000, 100, 0o640
            if link:
                ti.type, ti.linkname = tarfile.LNKTYPE, link[0]
                tf.addfile(ti)
            elif data is None:
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(ti)
            else:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return dest


BASE_MEMBERS = [("a", A_DATA), ("dir", None), ("dir/c", C_OLD), ("dir/g1", G_DATA),
                ("dir/g2", "->", "dir/g1")]
UPPER_MEMBERS = [
    ("b", "->", "a"),                 # a file of the base layer gets a second name
    ("dir/g3", "->", "dir/g1"),      # joins a hard-link group of the base layer
    ("x", "->", "dir/c"),            # links the base's dir/c, which this layer replaces afterwards
    ("dir/c", C_NEW),
    ("new", b"n"), ("new2", "->", "new"),  # an ordinary link inside the layer
]


def _stack(tmp_path: Path, upper: list[tuple]) -> tuple[Path, Path]:
    base = build_image(_layer_tar(tmp_path / "base.tar", BASE_MEMBERS), tmp_path / "o0", tar=True,
                       chunk_size=0x10000)
    top = build_image(_layer_tar(tmp_path / "upper.tar", upper), tmp_path / "o1", tar=True,
                      parent=base.bootstrap, chunk_size=0x10000)
    return top.bootstrap, _all_blobs([tmp_path / "o0", tmp_path / "o1"], tmp_path / "blobs")


def test_hard_link_to_a_parent_layer_file(tmp_path: Path) -> None:
    """A tar layer built with --parent-bootstrap may hard-link files of the parent image: the new
    name shares the lower file's inode and data (nlink grows), as linking the copied-up lower file
    on overlayfs does; no data is stored again."""
    boot, blobs = _stack(tmp_path, UPPER_MEMBERS)
    got = snapshot_image(boot, blobs)
    sha = {k: hashlib.sha256(v).hexdigest() for k, v in
           {"a": A_DATA, "g": G_DATA, "old": C_OLD, "new": C_NEW}.items()}
    assert got[b"/b"].sha256 == got[b"/a"].sha256 == sha["a"]
    assert got[b"/b"].link_group == got[b"/a"].link_group == b"/a"
    assert {got[p].link_group for p in (b"/dir/g1", b"/dir/g2", b"/dir/g3")} == {b"/dir/g1"}
    assert got[b"/x"].sha256 == sha["old"] and got[b"/x"].link_group is None
    assert got[b"/dir/c"].sha256 == sha["new"] and got[b"/dir/c"].link_group is None
    assert got[b"/new2"].link_group == b"/new"
    with load_bootstrap(str(boot)) as sb:
        a, b = sb.resolve("/a"), sb.resolve("/b")
        assert a.ino == b.ino and a.nlink == 2 and stat.S_IMODE(b.mode) == 0o640 and b.uid == 1000
        assert sb.resolve("/dir/g3").nlink == 3 and sb.resolve("/x").nlink == 1
        # the linked names read the base layer's blob: the upper blob holds only the new files
        assert {c.blob_index for c in sb.chunks(b.ino)} == {sb.blobs.index(
            next(x for x in sb.blobs if x.blob_id == _base_blob(tmp_path)))}
        assert sum(c.uncompressed_size for c in sb.chunks(b.ino)) == len(A_DATA)


def _base_blob(tmp_path: Path) -> str:
    with load_bootstrap(str(tmp_path / "o0" / "image.boot")) as sb:
        return sb.blobs[0].blob_id


@pytest.mark.parametrize(("upper", "why"), [
    ([(".wh.a", b""), ("b", "->", "a")], "deleted"),
    ([("dir", None), ("dir/.wh..wh..opq", b""), ("b", "->", "dir/c")], "deleted"),
    ([("dir", b"now a file"), ("b", "->", "dir/c")], "deleted"),
    ([("b", "->", "nowhere")], "not in the parent image"),
    ([("b", "->", "dir")], "directory"),
])
def test_hard_link_to_a_parent_layer_file_errors(tmp_path: Path, upper: list[tuple], why: str) -> None:
    with pytest.raises(BuildError, match=why):
        _stack(tmp_path, upper)
    assert not (tmp_path / "o1" / "image.boot").exists()


def test_hard_link_to_a_parent_file_then_whiteout_keeps_the_data(tmp_path: Path) -> None:
    """Entries act in tar order (as containerd applies a layer): the link made before ``.wh.a``
    keeps a's data under the new name."""
    boot, blobs = _stack(tmp_path, [("b", "->", "a"), (".wh.a", b"")])
    got = snapshot_image(boot, blobs)
    assert b"/a" not in got and got[b"/b"].sha256 == hashlib.sha256(A_DATA).hexdigest()
    with load_bootstrap(str(boot)) as sb:
        assert sb.resolve("/b").nlink == 1


@pytest.mark.root
def test_hard_link_to_a_parent_layer_file_matches_overlayfs(tmp_path: Path) -> None:
    """Oracle: the base tar extracted into an overlayfs lower dir, the upper tar extracted by GNU tar
    into the mounted overlay (link(2) copies the lower file up; -U replaces files as container
    runtimes do). Every non-directory entry, link groups included, equals the nydus image's.
    ``index=on`` makes copy-up keep the lower hard-link group whole (dir/g1, g2 and the new g3 stay
    one inode), the semantics of link(2) on one filesystem; without it overlayfs splits g2 off."""
    if shutil.which("tar") is None:
        pytest.skip("GNU tar is not installed")
    boot, blobs = _stack(tmp_path, UPPER_MEMBERS)
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    subprocess.run(["tar", "-x", "-p", "--numeric-owner", "-f", str(tmp_path / "base.tar"), "-C", str(lower)],
                   check=True)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lower},upperdir={upper},workdir={work},index=on", str(mnt)], check=True)
    try:
        subprocess.run(["tar", "-x", "-p", "-U", "--numeric-owner", "-f", str(tmp_path / "upper.tar"),
                        "-C", str(mnt)], check=True)
        want = snapshot_dir(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    got = snapshot_image(boot, blobs)
    files = {k for k, v in want.items() if not stat.S_ISDIR(v.mode)}
    assert files == {k for k, v in got.items() if not stat.S_ISDIR(v.mode)}
    assert not _diff({k: got[k] for k in files}, {k: want[k] for k in files})
