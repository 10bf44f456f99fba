"""End-to-end conversion against a real docker-registry: convert, check, determinism, options."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from nydusd.converter import manifest as m
from nydusd.converter.check import Checker, CheckOptions
from nydusd.converter.convert import Converter, ConvertOptions, ConvertResult
from nydusd.converter.layer_stream import LayerStream
from nydusd.converter.remote import open_remote
from nydusd.converter.rootfs import oci_rootfs
from nydusd.converter.stores import create_store
from nydusd.oci import mediatypes as mtypes
from nydusd.rafs import layout as L
from nydusd.rafs import load_bootstrap
from tests.converter.conftest import Image
from tests.harness.oci_images import run, skopeo_push, tool_env
from tests.harness.oci_registry import Registry

ROOT = Path(__file__).resolve().parents[2]
ACCEPT = ", ".join([mtypes.OCI_MANIFEST, mtypes.OCI_INDEX, mtypes.DOCKER_MANIFEST, mtypes.DOCKER_LIST])


def convert(src: str, dst: str, work: Path, env: dict[str, str] | None = None, **kw: Any) -> ConvertResult:
    source = open_remote(src, plain_http=True, env=env)
    target = open_remote(dst, plain_http=True, env=env)
    try:
        opts = ConvertOptions(work_dir=work, push_retry_delay=0.1, **kw)

        def factory(ref: str) -> Any:
            return open_remote(ref, plain_http=True, env=env)

        return Converter(source, target, opts, remote_factory=factory).convert()
    finally:
        source.close()
        target.close()


def check(dst: str, src: str | None, work: Path, **kw: Any) -> list[str]:
    target = open_remote(dst, plain_http=True, env=kw.pop("env", None))
    source = open_remote(src, plain_http=True) if src else None
    try:
        return Checker(target, source, CheckOptions(work_dir=work, **kw)).check().problems
    finally:
        target.close()
        if source is not None:
            source.close()


def get_manifest(registry: Registry, repo: str, ref: str) -> tuple[bytes, str]:
    req = urllib.request.Request(f"http://{registry.host}/v2/{repo}/manifests/{ref}",
                                 headers={"Accept": ACCEPT})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.read(), resp.headers["Content-Type"]


def manifest_exists(registry: Registry, repo: str, ref: str) -> bool:
    try:
        get_manifest(registry, repo, ref)
        return True
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 404:
            return False
        raise


@pytest.mark.parametrize("fs_version", [5, 6])
def test_convert_then_check_compares_every_file(registry: Registry, source_image: Image, tmp_path: Path,
                                                fs_version: int) -> None:
    dst = f"{registry.host}/dst/texture:v{fs_version}"
    res = convert(source_image.ref, dst, tmp_path / "work", fs_version=fs_version)
    raw, ctype = get_manifest(registry, "dst/texture", f"v{fs_version}")
    assert m.digest_of(raw) == res.digest and ctype == mtypes.OCI_MANIFEST
    mf = m.parse_document(raw)
    assert isinstance(mf, m.Manifest) and m.is_nydus_manifest(mf)
    assert len(mf.layers) == 4  # three blobs and the bootstrap
    assert all(layer.mediaType == mtypes.NYDUS_BLOB for layer in mf.layers[:-1])
    assert mf.layers[-1].annotations == {mtypes.ANN_NYDUS_BOOTSTRAP: "true",
                                         mtypes.ANN_NYDUS_FS_VERSION: str(fs_version)}
    ann = mf.annotations or {}
    assert ann[mtypes.ANN_NYDUS_SOURCE_REFERENCE] == source_image.ref
    assert ann[mtypes.ANN_NYDUS_FS_VERSION] == str(fs_version)
    src_raw, _ = get_manifest(registry, "src/texture", "v1")
    assert ann[mtypes.ANN_NYDUS_SOURCE_DIGEST] == m.digest_of(src_raw)
    problems = check(dst, source_image.ref, tmp_path / "check")
    assert problems == []
    boot = tmp_path / "check" / "nydus_bootstrap" / "image" / "image.boot"
    assert boot.is_file()
    assert res.metrics.source_image_size > 0 and res.metrics.target_image_size > 0
    # v6 blobs carry chunk digests and a ToC (upstream's --features blob-toc) and are still named by
    # the SHA-256 of the whole file, their layer digest
    with load_bootstrap(str(boot)) as rs:
        assert [f"sha256:{b.blob_id}" for b in rs.blobs] == [d.digest for d in mf.layers[:-1]]
        for b in rs.blobs:
            toc = bool(b.features & L.BLOB_HAS_TOC) and bool(b.features & L.BLOB_INLINED_CHUNK_DIGEST)
            assert toc == (fs_version == 6)
            if toc:
                url = f"http://{registry.host}/v2/dst/texture/blobs/sha256:{b.blob_id}"
                with urllib.request.urlopen(url, timeout=10) as resp:
                    data = resp.read()
                assert hashlib.sha256(data).hexdigest() == b.blob_id
                assert data[-512:-512 + len(L.TOC_NAME)] == L.TOC_NAME
                assert hashlib.sha256(data[-b.blob_toc_size:]).digest() == b.blob_toc_digest


def test_check_sees_the_texture(source_image: Image, registry: Registry) -> None:
    """The comparison is not vacuous: the OCI view holds every kind of entry the texture promises."""
    remote = open_remote(source_image.ref, plain_http=True)
    try:
        raw, _, _ = remote.get_manifest("v1")
        mf = m.parse_document(raw)
        assert isinstance(mf, m.Manifest)
        streams = [LayerStream(io.BytesIO(remote.get_blob_bytes(layer.digest)), m.layer_compression(layer))
                   for layer in mf.layers]
        tree = oci_rootfs(streams)
    finally:
        remote.close()
    # (umoci does not record empty xattr values)
    assert tree["/xattr-file"].xattrs == {b"user.nydus": b"value-1"}
    assert tree["/layer3.txt"].xattrs == {b"user.layer": b"3"}
    assert tree["/bin/tool-sym"].link == b"/bin/tool-link"
    assert tree["/usr/lib/escape-sym"].link == b"../../../outside"
    assert "/usr/share/doc" not in tree and "/etc/host-abs" not in tree and "/empty" not in tree
    assert sorted(p for p in tree if p.startswith("/opt/app/")) == ["/opt/app/fresh-hard",
                                                                    "/opt/app/fresh.conf"]
    assert tree["/home/user/notes.txt"].uid == 1000 and tree["/setuid"].mode & 0o4000
    assert tree["/fifo"].mode & 0o170000 == 0o010000
    assert tree["/bin/tool"].mode & 0o777 == 0o700


def test_same_input_gives_the_same_manifest_digest(registry: Registry, source_image: Image,
                                                   tmp_path: Path) -> None:
    a = convert(source_image.ref, f"{registry.host}/dst/repeat:a", tmp_path / "a")
    b = convert(source_image.ref, f"{registry.host}/dst/repeat:b", tmp_path / "b")
    c = convert(source_image.ref, f"{registry.host}/other/repeat:c", tmp_path / "c")
    assert a.digest == b.digest == c.digest
    d = convert(source_image.ref, f"{registry.host}/dst/repeat:d", tmp_path / "d", compressor="lz4_block")
    assert d.digest != a.digest


def test_check_reports_every_difference(registry: Registry, source_image: Image, tmp_path: Path) -> None:
    # A second image: same layers 1-2, a different top layer.
    tmp = source_image.tmp
    layout = source_image.layout
    other = tmp / "other-layer.tar"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        ti = tarfile.TarInfo("etc/hostname")
        ti.size = 6
        tar.addfile(ti, io.BytesIO(b"other\n"))
        ti = tarfile.TarInfo("extra-file")
        ti.size = 1
        tar.addfile(ti, io.BytesIO(b"x"))
    other.write_bytes(buf.getvalue())
    run(["umoci", "raw", "add-layer", "--image", f"{layout}:v1", "--tag", "v2", str(other)], tool_env(tmp))
    src2 = f"{registry.host}/src/texture:v2"
    skopeo_push(tmp, layout, "v2", src2)
    dst2 = f"{registry.host}/dst/texture:from-v2"
    convert(src2, dst2, tmp_path / "work")
    assert check(dst2, src2, tmp_path / "ok") == []
    problems = check(dst2, source_image.ref, tmp_path / "bad")
    assert "filesystem: /extra-file: only in nydus image" in problems
    assert any(p.startswith("filesystem: /etc/hostname: size 13 != 6") for p in problems)


def test_cli_convert_check_and_output_json(registry: Registry, source_image: Image, tmp_path: Path) -> None:
    dst = f"{registry.host}/cli/texture:nydus"
    out = tmp_path / "metrics.json"
    cmd = [sys.executable, "-m", "nydusd.cli.convert", "--log-level", "warn"]
    proc = subprocess.run([*cmd, "convert", "--source", source_image.ref, "--target", dst, "--plain-http",
                           "--work-dir", str(tmp_path / "w"), "--output-json", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(out.read_text())
    for key in ("SourceImageSize", "TargetImageSize", "SourcePullElapsed", "ConversionElapsed",
                "TargetPushElapsed"):
        assert isinstance(metrics[key], int) and metrics[key] > 0, key
    proc = subprocess.run([*cmd, "check", "--source", source_image.ref, "--target", dst, "--plain-http",
                           "--work-dir", str(tmp_path / "c")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "check passed" in proc.stdout
    # checking the OCI image as if it were a nydus image fails with a readable reason
    proc = subprocess.run([*cmd, "check", "--target", source_image.ref, "--plain-http",
                           "--work-dir", str(tmp_path / "c2")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert proc.returncode == 1
    assert "last layer is not a nydus bootstrap layer" in proc.stdout


def test_docker_media_types_kept_unless_oci(registry: Registry, source_image: Image, tmp_path: Path) -> None:
    src = f"{registry.host}/src/docker:v1"
    skopeo_push(source_image.tmp, source_image.layout, "v1", src, fmt="v2s2")
    convert(src, f"{registry.host}/dst/docker:nydus", tmp_path / "a")
    raw, ctype = get_manifest(registry, "dst/docker", "nydus")
    mf = m.parse_document(raw)
    assert isinstance(mf, m.Manifest)
    assert ctype == mtypes.DOCKER_MANIFEST and mf.config.mediaType == mtypes.DOCKER_CONFIG
    assert mf.layers[-1].mediaType == mtypes.DOCKER_LAYER_GZIP
    assert check(f"{registry.host}/dst/docker:nydus", src, tmp_path / "c") == []
    convert(src, f"{registry.host}/dst/docker:oci", tmp_path / "b", oci=True)
    raw, ctype = get_manifest(registry, "dst/docker", "oci")
    assert ctype == mtypes.OCI_MANIFEST and mtypes.OCI_LAYER_GZIP in raw.decode()


def test_with_referrer_sets_subject(registry: Registry, source_image: Image, tmp_path: Path) -> None:
    convert(source_image.ref, f"{registry.host}/dst/referrer:nydus", tmp_path / "w", with_referrer=True)
    raw, _ = get_manifest(registry, "dst/referrer", "nydus")
    src_raw, _ = get_manifest(registry, "src/texture", "v1")
    mf = json.loads(raw)
    assert mf["subject"] == {"mediaType": mtypes.OCI_MANIFEST, "digest": m.digest_of(src_raw),
                             "size": len(src_raw)}


def test_localfs_backend_keeps_only_the_bootstrap_layer(registry: Registry, source_image: Image,
                                                        tmp_path: Path) -> None:
    blobs = tmp_path / "blobs"
    dst = f"{registry.host}/dst/localfs:nydus"
    with create_store("localfs", json.dumps({"dir": str(blobs)})) as store:
        convert(source_image.ref, dst, tmp_path / "w", blob_store=store)
    raw, _ = get_manifest(registry, "dst/localfs", "nydus")
    mf = m.parse_document(raw)
    assert isinstance(mf, m.Manifest) and len(mf.layers) == 1 and m.is_nydus_manifest(mf)
    assert len(list(blobs.iterdir())) == 3
    backend = ("localfs", json.dumps({"dir": str(blobs)}))
    assert check(dst, source_image.ref, tmp_path / "c", backend=backend) == []
    # a blob gone from the backend is reported
    victim = sorted(blobs.iterdir())[0]
    victim.unlink()
    problems = check(dst, None, tmp_path / "c2", backend=backend)
    assert problems == [f"bootstrap: blob {victim.name} missing from the localfs backend"]


@pytest.mark.parametrize(("fs_version", "compressor", "chunk_size", "aligned"), [
    (5, "none", 0x100000, False), (5, "lz4_block", 0x10000, True), (6, "none", 0x40000, False),
    (6, "lz4_block", 0x1000, False), (6, "zstd", 0x400000, False),
])
def test_build_option_matrix(registry: Registry, source_image: Image, tmp_path: Path, fs_version: int,
                             compressor: str, chunk_size: int, aligned: bool) -> None:
    tag = f"m{fs_version}-{compressor}-{chunk_size:x}-{int(aligned)}"
    dst = f"{registry.host}/dst/matrix:{tag}"
    res = convert(source_image.ref, dst, tmp_path / "w", fs_version=fs_version, compressor=compressor,
                  chunk_size=chunk_size, aligned_chunk=aligned)
    assert check(dst, source_image.ref, tmp_path / "c") == []
    from nydusd.converter.publish import extract_bootstrap
    from nydusd.rafs import load_bootstrap

    remote = open_remote(dst, plain_http=True)
    try:
        boot = extract_bootstrap(remote.get_blob_bytes(res.manifests[0].manifest.layers[-1].digest))
    finally:
        remote.close()
    with load_bootstrap(boot) as rs:
        assert (rs.version, rs.chunk_size, rs.compressor.value) == (fs_version, chunk_size, compressor)
