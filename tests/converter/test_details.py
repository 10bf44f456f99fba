"""Details of the nydus image layout and of conversion robustness: the v6 bootstrap layer with
blob.meta files, prefetch tables, empty and zstd/plain layers, re-converting a nydus image, flaky
registries (fault shim), check noticing missing blobs, push retries and progress output."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from nydusd.converter import manifest as m
from nydusd.converter.progress import Progress
from nydusd.converter.publish import BLOB_META_HEADER_SIZE, bootstrap_layer_tar, with_retry
from nydusd.converter.remote import open_remote
from nydusd.converter.rootfs import oci_rootfs
from nydusd.errors import BackendError, BuildError, Unsupported
from nydusd.oci import mediatypes as mtypes
from nydusd.oci.client import RegistryClient
from nydusd.rafs import load_bootstrap
from tests.converter.conftest import Image
from tests.converter.test_bad_input import layer_tar, push_image
from tests.converter.test_convert import check, convert, get_manifest
from tests.harness.oci_images import skopeo_push
from tests.harness.oci_registry import Registry

ROOT = Path(__file__).resolve().parents[2]


def _blob(registry: Registry, repo: str, digest: str) -> bytes:
    remote = open_remote(f"{registry.host}/{repo}:x", plain_http=True)
    try:
        return remote.get_blob_bytes(digest)
    finally:
        remote.close()


def test_v6_bootstrap_layer_carries_blob_meta(registry: Registry, source_image: Image,
                                              tmp_path: Path) -> None:
    res = convert(source_image.ref, f"{registry.host}/dst/meta:v6", tmp_path / "w", fs_version=6)
    mf = res.manifests[0].manifest
    layer = _blob(registry, "dst/meta", mf.layers[-1].digest)
    assert layer[:2] == b"\x1f\x8b" and layer[4:8] == b"\0\0\0\0"  # gzip, mtime 0
    with tarfile.open(fileobj=io.BytesIO(layer), mode="r:gz") as tar:
        members = {t.name: t for t in tar.getmembers()}
        boot = tar.extractfile("image/image.boot").read()  # type: ignore[union-attr]
        metas = {n: tar.extractfile(t).read() for n, t in members.items()  # type: ignore[union-attr]
                 if n.endswith(".blob.meta")}
    assert list(members)[:2] == ["image", "image/image.boot"]
    assert members["image"].isdir() and members["image"].mode == 0o755
    assert members["image/image.boot"].mode == 0o444
    with load_bootstrap(boot) as rs:
        blobs = list(rs.blobs)
    assert {f"image/{b.blob_id}.blob.meta" for b in blobs} == set(metas)
    for b in blobs:
        meta = metas[f"image/{b.blob_id}.blob.meta"]
        data = _blob(registry, "dst/meta", "sha256:" + b.blob_id)
        header = data[b.ci_offset + b.ci_compressed_size:][:BLOB_META_HEADER_SIZE]
        assert len(meta) % 4096 == 0 and meta.endswith(header)
        assert len(meta) - BLOB_META_HEADER_SIZE >= b.ci_uncompressed_size
    # readiness check of the snapshotter: v6 magic at 1024
    assert int.from_bytes(boot[1024:1028], "little") == 0xE0F5E1E2


def test_bootstrap_layer_is_reproducible() -> None:
    a = bootstrap_layer_tar(b"boot" * 100, [("ab" * 32, b"m" * 8192)])
    b = bootstrap_layer_tar(b"boot" * 100, [("ab" * 32, b"m" * 8192)])
    assert a == b
    plain = gzip.decompress(a[0])
    assert a[1] == m.digest_of(plain)


def test_prefetch_patterns_reach_the_bootstrap(registry: Registry, source_image: Image,
                                               tmp_path: Path) -> None:
    res = convert(source_image.ref, f"{registry.host}/dst/prefetch:v1", tmp_path / "w",
                  prefetch_patterns=("/usr/lib", "/bin/tool"))
    mf = res.manifests[0].manifest
    layer = _blob(registry, "dst/prefetch", mf.layers[-1].digest)
    from nydusd.converter.publish import extract_bootstrap

    with load_bootstrap(extract_bootstrap(layer)) as rs:
        paths = sorted(rs.path_of(ino) for ino in rs.prefetch_inodes())
    assert paths == [b"/bin/tool", b"/usr/lib"]


def test_empty_zstd_and_plain_layers(registry: Registry, tmp_path: Path) -> None:
    import zstandard

    tars = [layer_tar([("etc/", b"", ""), ("etc/a", b"a" * 10_000, "")]),
            layer_tar([("etc/", b"", "")]),                         # no file data at all
            layer_tar([("etc/b", b"b" * 3000, ""), ("etc/.wh.a", b"", "")])]
    blobs = [gzip.compress(tars[0], mtime=0), tars[1], zstandard.ZstdCompressor().compress(tars[2])]
    types = [mtypes.OCI_LAYER_GZIP, mtypes.OCI_LAYER, mtypes.OCI_LAYER_ZSTD]
    client = RegistryClient(registry.host, "src/mixed", scheme="http")
    try:
        rootfs = {"type": "layers", "diff_ids": [m.digest_of(t) for t in tars]}
        config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                             "rootfs": rootfs}).encode()
        for data in [*blobs, config]:
            client.push_blob(data, m.digest_of(data))
        mf = m.Manifest(mediaType=mtypes.OCI_MANIFEST, config=m.descriptor_for(mtypes.OCI_CONFIG, config),
                        layers=[m.descriptor_for(t, b) for t, b in zip(types, blobs, strict=True)])
        client.put_manifest("v1", m.encode(mf), mtypes.OCI_MANIFEST)
    finally:
        client.close()
    src, dst = f"{registry.host}/src/mixed:v1", f"{registry.host}/dst/mixed:v1"
    res = convert(src, dst, tmp_path / "w")
    nmf = res.manifests[0].manifest
    config = json.loads(_blob(registry, "dst/mixed", nmf.config.digest))
    assert len(config["rootfs"]["diff_ids"]) == len(nmf.layers)
    assert check(dst, src, tmp_path / "c") == []
    # a nydus image is not converted again
    with pytest.raises(Unsupported, match="already a nydus image"):
        convert(dst, f"{registry.host}/dst/mixed:again", tmp_path / "w2")


def test_flaky_source_registry_is_retried(registry_server, fault_shim, source_image: Image,  # type: ignore[no-untyped-def]
                                          tmp_path: Path) -> None:
    src = f"{registry_server.host}/nydusify-flaky/texture:v1"
    skopeo_push(source_image.tmp, source_image.layout, "v1", src)
    fault_shim.inject("500", "reset", "truncate", "503", "429")
    via_shim = f"{fault_shim.netloc}/nydusify-flaky/texture:v1"
    dst = f"{registry_server.host}/nydusify-flaky/texture:nydus"
    convert(via_shim, dst, tmp_path / "w")
    assert sum(fault_shim.applied[f] for f in ("500", "reset", "truncate", "503", "429")) == 5
    assert check(dst, src, tmp_path / "c") == []


def test_check_reports_a_missing_blob(registry: Registry, source_image: Image, tmp_path: Path) -> None:
    dst = f"{registry.host}/dst/holes:v1"
    res = convert(source_image.ref, dst, tmp_path / "w")
    victim = res.manifests[0].manifest.layers[1].digest
    client = RegistryClient(registry.host, "dst/holes", scheme="http")
    try:
        assert client._request("DELETE", client.blob_url(victim), scopes=()).status == 202
    finally:
        client.close()
    problems = check(dst, source_image.ref, tmp_path / "c")
    blob_id = victim.split(":")[1]
    assert problems == [f"bootstrap: blob {blob_id} does not exist in {registry.host}/dst/holes:v1"]


def test_with_retry(logs) -> None:  # type: ignore[no-untyped-def]
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise BackendError("HTTP 503", transient=True)
        return "ok"

    with logs.expect("push_retried", count=3):
        assert with_retry("x", flaky, count=3, delay=0) == "ok" and len(calls) == 3
        calls.clear()
        with pytest.raises(BackendError, match="503"):
            with_retry("x", flaky, count=1, delay=0)
    assert len(calls) == 2

    def denied() -> None:
        calls.append(1)
        raise BackendError("HTTP 400")

    calls.clear()
    with pytest.raises(BackendError):
        with_retry("x", denied, count=5, delay=0)
    assert len(calls) == 1


def test_push_retried_on_transient_errors(logs) -> None:  # type: ignore[no-untyped-def]
    n = {"i": 0}

    def push() -> bool:
        n["i"] += 1
        if n["i"] == 1:
            raise BackendError("HTTP 502", transient=True)
        return True

    with logs.expect("push_retried", count=1):
        assert with_retry("blob", push, count=2, delay=0)


def test_progress_bars_and_log_lines(capsys: pytest.CaptureFixture[str], logs) -> None:  # type: ignore[no-untyped-def]
    from nydusd.cli.progress import TerminalDisplay

    task = Progress(TerminalDisplay()).task("push", "abc", 100)
    task.update(60)
    task.update(40)
    task.finish()
    err = capsys.readouterr().err
    assert "push" in err and "100" in err
    Progress().task("convert", "def", 5).finish()
    assert logs.count("layer_phase_started") == 2 and logs.count("layer_phase_finished") == 2


def test_cli_target_suffix_localfs_and_bad_flags(registry: Registry, source_image: Image,
                                                 tmp_path: Path) -> None:
    cfg = tmp_path / "backend.json"
    cfg.write_text(json.dumps({"dir": str(tmp_path / "blobs")}))
    cmd = [sys.executable, "-m", "nydusd.cli.convert", "-l", "warn", "convert", "--source", source_image.ref,
           "--target-suffix=-nydus", "--plain-http", "--work-dir", str(tmp_path / "w"),
           "--backend-type", "localfs", "--backend-config-file", str(cfg), "--prefetch-patterns"]
    proc = subprocess.run(cmd, input="/usr/lib\nrelative\n", capture_output=True, text=True, cwd=ROOT,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    raw, _ = get_manifest(registry, "src/texture", "v1-nydus")
    mf = m.parse_document(raw)
    assert isinstance(mf, m.Manifest) and len(mf.layers) == 1
    assert len(list((tmp_path / "blobs").iterdir())) == 3
    proc = subprocess.run([*cmd[:8], "--target", f"{registry.host}/x/y:z", "--plain-http",
                           "--backend-type", "s3", "--backend-config", "{}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert proc.returncode == 1
    assert "error: invalid s3 backend config: backend.s3.bucket_name: required" in proc.stderr
    proc = subprocess.run([*cmd[:8], "--target", "UPPER/case:x"], capture_output=True, text=True, cwd=ROOT,
                          timeout=60, check=False)
    assert proc.returncode == 1 and "invalid image reference" in proc.stderr


def test_bottom_layer_whiteouts_are_dropped(registry: Registry, tmp_path: Path) -> None:
    """A runtime ignores whiteouts in the first layer; so does the nydus image (the builder alone
    would keep them as files, upstream's merge quirk)."""
    push_image(registry, "src/wh", "v1", [layer_tar([("a", b"1", ""), (".wh.ghost", b"", ""), ("d/", b"", ""),
                                                     ("d/.wh..wh..opq", b"", ""), ("d/x", b"x", "")])])
    convert(f"{registry.host}/src/wh:v1", f"{registry.host}/dst/wh:v1", tmp_path / "w")
    assert check(f"{registry.host}/dst/wh:v1", f"{registry.host}/src/wh:v1", tmp_path / "c") == []


def test_work_dirs_are_cleaned_but_not_wiped(registry: Registry, source_image: Image, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "mine.txt").write_text("keep")
    convert(source_image.ref, f"{registry.host}/dst/clean:v1", work)
    assert sorted(p.name for p in work.iterdir()) == ["mine.txt"]
    check(f"{registry.host}/dst/clean:v1", source_image.ref, work)
    check(f"{registry.host}/dst/clean:v1", None, work)
    assert (work / "mine.txt").read_text() == "keep"
    assert (work / "nydus_bootstrap/image/image.boot").is_file() and (work / "nydus_manifest.json").is_file()
    assert not (work / "oci_manifest.json").exists()  # the second check had no source


def test_check_without_source_detects_rotten_blobs(registry: Registry, source_image: Image,
                                                   tmp_path: Path) -> None:
    dst = f"{registry.host}/dst/rot:v1"
    res = convert(source_image.ref, dst, tmp_path / "w", compressor="none")
    assert check(dst, None, tmp_path / "ok") == []
    # Rot one byte of a stored blob behind the registry's back (same size, so HEAD still agrees).
    digest = res.manifests[0].manifest.layers[0].digest
    hexd = digest.split(":")[1]
    path = registry.root / "data/docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"
    good = path.read_bytes()
    path.write_bytes(good[:100] + bytes([good[100] ^ 0xFF]) + good[101:])
    try:
        problems = check(dst, None, tmp_path / "bad")
    finally:
        path.write_bytes(good)
    assert len(problems) == 1 and problems[0].startswith(f"bootstrap: blob {hexd} cannot be read")
    assert "digest mismatch" in problems[0]


def test_check_reports_a_broken_bootstrap_layer(registry: Registry, tmp_path: Path) -> None:
    """A manifest that claims a bootstrap layer which is not a gzip tar with image/image.boot."""
    client = RegistryClient(registry.host, "dst/fake", scheme="http")
    try:
        junk = gzip.compress(b"not a tar at all" * 10, mtime=0)
        cfg = json.dumps({"architecture": "amd64", "os": "linux",
                          "rootfs": {"type": "layers", "diff_ids": [m.digest_of(junk)]}}).encode()
        for data in (junk, cfg):
            client.push_blob(data, m.digest_of(data))
        mf = m.Manifest(mediaType=mtypes.OCI_MANIFEST, config=m.descriptor_for(mtypes.OCI_CONFIG, cfg),
                        layers=[m.bootstrap_layer(m.digest_of(junk), len(junk), 6, docker=False)])
        client.put_manifest("v1", m.encode(mf), mtypes.OCI_MANIFEST)
    finally:
        client.close()
    problems = check(f"{registry.host}/dst/fake:v1", None, tmp_path / "c")
    assert len(problems) == 1 and "bootstrap: layer" in problems[0] and "cannot be used" in problems[0]


HARDLINK_LAYERS = [
    [("a", b"lower file a" * 3000, ""), ("dir/", b"", ""), ("dir/c", b"c" * 5000, ""),
     ("dir/g1", b"group", ""), ("dir/g2", b"", "hard:dir/g1")],
    # links into the layer below: a new name for a, a third member for the g1/g2 group, and a link
    # made before this layer replaces its target (keeps the old content)
    [("b", b"", "hard:a"), ("dir/g3", b"", "hard:dir/g1"), ("x", b"", "hard:dir/c"),
     ("dir/c", b"replaced", "")],
]


def test_hard_links_into_a_lower_layer(registry: Registry, tmp_path: Path) -> None:
    """`nydusify convert` + `check` (CLI) of an image whose upper layer hard-links files of its base
    layer (docker save produces such layers): the links share the lower file's inode and data."""
    push_image(registry, "src/xlink", "v1", [layer_tar(t) for t in HARDLINK_LAYERS])
    src, dst = f"{registry.host}/src/xlink:v1", f"{registry.host}/dst/xlink:v1"
    cmd = [sys.executable, "-m", "nydusd.cli.convert", "-l", "warn"]
    for args in (["convert", "--source", src, "--target", dst, "--work-dir", str(tmp_path / "w")],
                 ["check", "--source", src, "--target", dst, "--work-dir", str(tmp_path / "c")]):
        proc = subprocess.run([*cmd, *args, "--plain-http"], capture_output=True, text=True, cwd=ROOT,
                              timeout=120, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    with load_bootstrap(str(tmp_path / "c/nydus_bootstrap/image/image.boot")) as rs:
        a, b = rs.resolve("/a"), rs.resolve("/b")
        assert (a.ino, a.nlink, b.size) == (b.ino, 2, len(HARDLINK_LAYERS[0][0][1]))
        assert {rs.resolve(f"/dir/g{i}").ino for i in (1, 2, 3)} == {rs.resolve("/dir/g1").ino}
        assert rs.resolve("/dir/g3").nlink == 3
        x, c = rs.resolve("/x"), rs.resolve("/dir/c")
        assert x.ino != c.ino and (x.size, c.size, x.nlink) == (5000, len(b"replaced"), 1)


@pytest.mark.fuse
def test_hard_links_into_a_lower_layer_read_through_nydusd(registry: Registry, tmp_path: Path) -> None:
    push_image(registry, "src/xlink-fuse", "v1", [layer_tar(t) for t in HARDLINK_LAYERS])
    src, dst = f"{registry.host}/src/xlink-fuse:v1", f"{registry.host}/dst/xlink-fuse:v1"
    convert(src, dst, tmp_path / "w")
    assert check(dst, src, tmp_path / "c", nydusd=f"{sys.executable} -m nydusd") == []


def test_check_reads_hard_links_in_tar_order(tmp_path: Path) -> None:
    """check's OCI reference applies a layer as containerd does: a link made before the layer's
    whiteout of its lower target keeps the data; one made after it dangles."""
    base = layer_tar([("a", b"lower", "")])
    tree = oci_rootfs([io.BytesIO(base), io.BytesIO(layer_tar([("b", b"", "hard:a"), (".wh.a", b"", "")]))])
    assert "/a" not in tree and tree["/b"].size == 5
    with pytest.raises(BuildError, match="hard link"):
        oci_rootfs([io.BytesIO(base), io.BytesIO(layer_tar([(".wh.a", b"", ""), ("b", b"", "hard:a")]))])
