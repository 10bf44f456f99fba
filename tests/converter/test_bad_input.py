"""Bad input to nydusify convert / check: clear errors, and nothing half-pushed left referenced."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest

from nydusd.converter import manifest as m
from nydusd.errors import AuthError, BlobNotFound, BuildError, IntegrityError, NotFound, Unsupported
from nydusd.oci import mediatypes as mtypes
from nydusd.oci.client import RegistryClient
from tests.converter.conftest import Image, docker_config
from tests.converter.test_convert import check, convert, manifest_exists
from tests.harness.oci_registry import Registry


def layer_tar(entries: list[tuple[str, bytes, str]]) -> bytes:
    """(name, data, link) entries; link starting with 'hard:' / 'sym:' makes a link."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, link in entries:
            ti = tarfile.TarInfo(name)
            if link.startswith("hard:"):
                ti.type, ti.linkname = tarfile.LNKTYPE, link[5:]
            elif link.startswith("sym:"):
                ti.type, ti.linkname = tarfile.SYMTYPE, link[4:]
            elif name.endswith("/"):
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            else:
                ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data) if ti.size else None)
    return buf.getvalue()


def push_image(registry: Registry, repo: str, tag: str, layers: list[bytes], *,
               config_media_type: str = mtypes.OCI_CONFIG, arch: str = "amd64") -> m.Manifest:
    """Push an image made of uncompressed layer tars (gzipped here) straight through the client."""
    client = RegistryClient(registry.host, repo, scheme="http")
    try:
        blobs = [gzip.compress(t, mtime=0) for t in layers]
        config = {"architecture": arch, "os": "linux", "config": {"Cmd": ["/bin/sh"]},
                  "rootfs": {"type": "layers", "diff_ids": [m.digest_of(t) for t in layers]}}
        config_bytes = json.dumps(config).encode()
        for data in [*blobs, config_bytes]:
            client.push_blob(data, m.digest_of(data))
        mf = m.Manifest(mediaType=mtypes.OCI_MANIFEST,
                        config=m.descriptor_for(config_media_type, config_bytes),
                        layers=[m.descriptor_for(mtypes.OCI_LAYER_GZIP, b) for b in blobs])
        client.put_manifest(tag, m.encode(mf), mtypes.OCI_MANIFEST)
        return mf
    finally:
        client.close()


def test_missing_image(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="manifest nope not found"):
        convert(f"{registry.host}/src/none:nope", f"{registry.host}/dst/none:x", tmp_path)
    with pytest.raises(NotFound):
        check(f"{registry.host}/dst/none:x", None, tmp_path / "c")


def test_non_image_artifact(registry: Registry, tmp_path: Path) -> None:
    push_image(registry, "src/helm", "v1", [layer_tar([("a", b"1", "")])],
               config_media_type="application/vnd.cncf.helm.config.v1+json")
    with pytest.raises(Unsupported, match="not a container image"):
        convert(f"{registry.host}/src/helm:v1", f"{registry.host}/dst/helm:v1", tmp_path)
    assert not manifest_exists(registry, "dst/helm", "v1")


@pytest.mark.parametrize("entries", [
    [("ok", b"1", ""), ("../evil", b"x", "")],
    [("a/../../evil", b"x", "")],
    [("ok", b"1", ""), ("esc", b"", "hard:../../etc/passwd")],
], ids=["dotdot", "nested-dotdot", "hardlink-escape"])
def test_path_traversal_is_refused_and_nothing_is_referenced(registry: Registry, tmp_path: Path,
                                                             entries: list[tuple[str, bytes, str]]) -> None:
    base = layer_tar([("etc/", b"", ""), ("etc/x", b"base", "")])
    push_image(registry, "src/evil", "v1", [base, layer_tar(entries)])
    with pytest.raises(BuildError):
        convert(f"{registry.host}/src/evil:v1", f"{registry.host}/dst/evil:v1", tmp_path)
    assert not manifest_exists(registry, "dst/evil", "v1")


def test_symlinks_pointing_outside_are_kept_verbatim(registry: Registry, tmp_path: Path) -> None:
    # A symlink is resolved inside the container's root at run time; its target is data, not a path
    # the converter follows, so it is converted as is.
    push_image(registry, "src/sym", "v1", [layer_tar([("abs", b"", "sym:/etc/passwd"),
                                                      ("up", b"", "sym:../../../../x")])])
    convert(f"{registry.host}/src/sym:v1", f"{registry.host}/dst/sym:v1", tmp_path / "w")
    assert check(f"{registry.host}/dst/sym:v1", f"{registry.host}/src/sym:v1", tmp_path / "c") == []


def _blob_data_path(registry: Registry, digest: str) -> Path:
    hexd = digest.split(":", 1)[1]
    return registry.root / "data/docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"


def test_layer_digest_mismatch(registry: Registry, tmp_path: Path) -> None:
    mf = push_image(registry, "src/corrupt", "v1", [layer_tar([("f", b"A" * 5000, "")]),
                                                    layer_tar([("g", b"B" * 5000, "")])])
    # Same length, other content: the registry serves it, the converter must notice.
    victim = _blob_data_path(registry, mf.layers[1].digest)
    good = victim.read_bytes()
    evil = gzip.compress(layer_tar([("g", b"C" * 5000, "")]), mtime=0)
    evil = evil[: len(good)] + b"\0" * (len(good) - len(evil))
    victim.write_bytes(evil)
    try:
        with pytest.raises(IntegrityError, match="mismatch|corrupt|not valid"):
            convert(f"{registry.host}/src/corrupt:v1", f"{registry.host}/dst/corrupt:v1", tmp_path)
    finally:
        victim.write_bytes(good)
    assert not manifest_exists(registry, "dst/corrupt", "v1")


def test_diff_id_mismatch(registry: Registry, tmp_path: Path) -> None:
    client = RegistryClient(registry.host, "src/diffid", scheme="http")
    try:
        tar = layer_tar([("f", b"1", "")])
        blob = gzip.compress(tar, mtime=0)
        config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                             "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "0" * 64]}}).encode()
        client.push_blob(blob, m.digest_of(blob))
        client.push_blob(config, m.digest_of(config))
        mf = m.Manifest(mediaType=mtypes.OCI_MANIFEST, config=m.descriptor_for(mtypes.OCI_CONFIG, config),
                        layers=[m.descriptor_for(mtypes.OCI_LAYER_GZIP, blob)])
        client.put_manifest("v1", m.encode(mf), mtypes.OCI_MANIFEST)
    finally:
        client.close()
    with pytest.raises(IntegrityError, match="diff_id mismatch"):
        convert(f"{registry.host}/src/diffid:v1", f"{registry.host}/dst/diffid:v1", tmp_path)
    assert not manifest_exists(registry, "dst/diffid", "v1")


def test_missing_layer_blob(registry: Registry, tmp_path: Path) -> None:
    mf = push_image(registry, "src/gone", "v1", [layer_tar([("f", b"1", "")])])
    client = RegistryClient(registry.host, "src/gone", scheme="http")
    try:
        resp = client._request("DELETE", client.blob_url(mf.layers[0].digest), scopes=())
        assert resp.status == 202
    finally:
        client.close()
    with pytest.raises(BlobNotFound):
        convert(f"{registry.host}/src/gone:v1", f"{registry.host}/dst/gone:v1", tmp_path)
    assert not manifest_exists(registry, "dst/gone", "v1")


def test_htpasswd_registry_with_docker_config(auth_registry: Registry, source_image: Image,
                                              tmp_path: Path) -> None:
    from tests.harness.oci_images import skopeo_push

    src = f"{auth_registry.host}/src/texture:v1"
    skopeo_push(source_image.tmp, source_image.layout, "v1", src, auth_registry.creds)
    env = docker_config(tmp_path / "home", auth_registry.host, "user", "pass")
    dst = f"{auth_registry.host}/dst/texture:v1"
    convert(src, dst, tmp_path / "w", env=env)
    from nydusd.converter.check import Checker, CheckOptions
    from nydusd.converter.remote import open_remote

    target = open_remote(dst, plain_http=True, env=env)
    source = open_remote(src, plain_http=True, env=env)
    try:
        assert Checker(target, source, CheckOptions(work_dir=tmp_path / "c")).check().problems == []
    finally:
        target.close()
        source.close()
    bad = docker_config(tmp_path / "bad", auth_registry.host, "user", "wrong")
    with pytest.raises(AuthError, match=r"authentication failed for .* \(check ~/.docker/config.json\)"):
        convert(src, f"{auth_registry.host}/dst/texture:bad", tmp_path / "w2", env=bad)
    with pytest.raises(AuthError, match="no credentials for it in ~/.docker/config.json"):
        convert(src, f"{auth_registry.host}/dst/texture:anon", tmp_path / "w3", env={})


def test_tls_registry_needs_insecure(source_image: Image, tmp_path: Path) -> None:
    """A registry with a self-signed certificate: refused with a TLS error unless insecure."""
    from nydusd.converter.convert import Converter, ConvertOptions
    from nydusd.converter.remote import open_remote
    from nydusd.errors import BackendError
    from tests.harness.oci_images import skopeo_push

    with Registry(tmp_path / "tls-registry", tls=True) as reg:
        src = f"{reg.host}/src/texture:v1"
        skopeo_push(source_image.tmp, source_image.layout, "v1", src)
        with pytest.raises(BackendError, match="tls|certificate|SSL"):
            open_remote(src)
        source = open_remote(src, insecure=True)
        target = open_remote(f"{reg.host}/dst/texture:v1", insecure=True)
        try:
            assert source.client.scheme == "https"
            Converter(source, target, ConvertOptions(work_dir=tmp_path / "w")).convert()
        finally:
            source.close()
            target.close()
        target = open_remote(f"{reg.host}/dst/texture:v1", insecure=True)
        source = open_remote(src, insecure=True)
        try:
            from nydusd.converter.check import Checker, CheckOptions

            assert Checker(target, source, CheckOptions(work_dir=tmp_path / "c")).check().problems == []
        finally:
            source.close()
            target.close()
