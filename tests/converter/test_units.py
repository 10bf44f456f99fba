"""Pure tests of the converter's documents, layer streams and credential lookup."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from nydusd.compress import stream_decompressor
from nydusd.converter import credentials, layer_stream
from nydusd.converter import manifest as m
from nydusd.errors import BuildError, ConfigError, IntegrityError, InvalidArgument, Unsupported
from nydusd.oci import mediatypes as mtypes


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


@pytest.mark.parametrize("comp", ["gzip", "zstd", "none"])
def test_layer_stream_decompresses_and_verifies_both_digests(comp: str) -> None:
    plain = _tar({"a": b"x" * 100_000, "dir/b": b"hello"})
    blob = {"gzip": lambda d: gzip.compress(d, mtime=0), "zstd": _zstd, "none": lambda d: d}[comp](plain)
    stream = layer_stream.LayerStream(io.BytesIO(blob), comp, expected_digest=_sha(blob),
                                expected_diff_id=_sha(plain))
    with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
        names = [t.name for t in tar]
    assert names == ["a", "dir/b"]
    assert stream.finish() == (_sha(blob), _sha(plain))
    assert stream.bytes_in == len(blob) and stream.bytes_out == len(plain)


def test_layer_stream_multi_member_gzip() -> None:
    plain = _tar({"a": b"1" * 5000})
    blob = gzip.compress(plain[:1000], mtime=0) + gzip.compress(plain[1000:], mtime=0)
    stream = layer_stream.LayerStream(io.BytesIO(blob), "gzip")
    out = b""
    while chunk := stream.read(700):
        out += chunk
    assert out == plain
    assert stream.finish()[1] == _sha(plain)


def test_layer_stream_digest_mismatch() -> None:
    blob = gzip.compress(_tar({"a": b"1"}), mtime=0)
    stream = layer_stream.LayerStream(io.BytesIO(blob), "gzip", expected_digest="sha256:" + "0" * 64)
    with pytest.raises(IntegrityError, match="layer digest mismatch"):
        stream.finish()
    stream = layer_stream.LayerStream(io.BytesIO(blob), "gzip", expected_diff_id="sha256:" + "1" * 64)
    with pytest.raises(IntegrityError, match="diff_id mismatch"):
        stream.finish()


def test_layer_stream_corrupt_and_truncated() -> None:
    blob = gzip.compress(_tar({"a": b"abc" * 10000}), mtime=0)
    with pytest.raises(IntegrityError, match="truncated"):
        layer_stream.LayerStream(io.BytesIO(blob[: len(blob) // 2]), "gzip").finish()
    bad = blob[:20] + bytes(b ^ 0xFF for b in blob[20:60]) + blob[60:]
    with pytest.raises(IntegrityError):
        layer_stream.LayerStream(io.BytesIO(bad), "gzip").finish()
    zblob = _zstd(_tar({"a": b"q" * 50000}))
    with pytest.raises(IntegrityError):
        layer_stream.LayerStream(io.BytesIO(zblob[:-10] + b"\0" * 10), "zstd").finish()


def test_layer_stream_trusts_magic_over_media_type() -> None:
    plain = _tar({"a": b"1"})
    stream = layer_stream.LayerStream(io.BytesIO(plain), "gzip")
    assert stream.compression == "none"
    assert stream.finish()[1] == _sha(plain)
    assert stream_decompressor("zstd") is not None


@pytest.mark.parametrize(("name", "want"), [("a/b", "a/b"), ("./a/./b/", "a/b"), ("/abs/x", "abs/x"),
                                            ("a/../b", "b"), (".", ""), ("./", "")])
def test_safe_member_name(name: str, want: str) -> None:
    assert layer_stream.safe_member_name(name) == want


@pytest.mark.parametrize("name", ["../etc/passwd", "a/../../b", "/../x", "./.."])
def test_safe_member_name_rejects_escapes(name: str) -> None:
    with pytest.raises(BuildError, match="escapes"):
        layer_stream.safe_member_name(name)
    with pytest.raises(BuildError):
        layer_stream.safe_link_target("x", name, hard=True)
    assert layer_stream.safe_link_target("x", name, hard=False) == name


def _manifest(media: str = mtypes.OCI_LAYER_GZIP) -> m.Manifest:
    return m.Manifest(mediaType=mtypes.OCI_MANIFEST,
                      config=m.Descriptor(mediaType=mtypes.OCI_CONFIG, digest="sha256:" + "c" * 64, size=10),
                      layers=[m.Descriptor(mediaType=media, digest="sha256:" + "a" * 64, size=5)])


def test_encoding_is_go_shaped_and_stable() -> None:
    doc = m.nydus_manifest(_manifest(), source_digest="sha256:" + "1" * 64, source_ref="r/x:1",
                           config=m.Descriptor(mediaType=mtypes.OCI_CONFIG, digest="sha256:" + "2" * 64,
                                               size=3),
                           blobs=[m.blob_layer("3" * 64, 100)],
                           bootstrap=m.bootstrap_layer("sha256:" + "4" * 64, 50, 6, docker=False),
                           fs_version=6, builder_version="v<1>&", oci=False)
    raw = m.encode(doc)
    obj = json.loads(raw)
    assert list(obj) == ["schemaVersion", "mediaType", "config", "layers", "annotations"]
    assert list(obj["layers"][0]) == ["mediaType", "digest", "size", "annotations"]
    assert list(obj["annotations"]) == sorted(obj["annotations"])
    assert b"\\u003c1\\u003e\\u0026" in raw and b" " not in raw
    assert obj["layers"][0]["annotations"] == {mtypes.ANN_NYDUS_BLOB: "true"}
    assert obj["layers"][1]["annotations"] == {mtypes.ANN_NYDUS_BOOTSTRAP: "true",
                                               mtypes.ANN_NYDUS_FS_VERSION: "6"}
    again = m.parse_document(raw)
    assert isinstance(again, m.Manifest) and m.encode(again) == raw
    assert m.is_nydus_manifest(again) and not m.is_nydus_manifest(_manifest())


def test_docker_source_keeps_docker_media_types_unless_oci() -> None:
    src = _manifest(mtypes.DOCKER_LAYER_GZIP).model_copy(update={"mediaType": mtypes.DOCKER_MANIFEST})
    kw = {"source_digest": "sha256:" + "1" * 64, "source_ref": "x", "blobs": [], "fs_version": 5,
          "builder_version": "v", "config": src.config}
    boot = m.bootstrap_layer("sha256:" + "4" * 64, 5, 5, docker=True)
    assert m.nydus_manifest(src, bootstrap=boot, oci=False, **kw).mediaType == mtypes.DOCKER_MANIFEST
    assert m.nydus_manifest(src, bootstrap=boot, oci=True, **kw).mediaType == mtypes.OCI_MANIFEST
    assert boot.mediaType == mtypes.DOCKER_LAYER_GZIP


def test_platform_alias_round_trip_and_detection() -> None:
    idx = m.parse_document(json.dumps({"schemaVersion": 2, "mediaType": mtypes.OCI_INDEX, "manifests": [
        {"mediaType": mtypes.OCI_MANIFEST, "digest": "sha256:" + "1" * 64, "size": 1,
         "platform": {"architecture": "amd64", "os": "linux", "os.features": [mtypes.NYDUS_FEATURE]}},
        {"mediaType": mtypes.OCI_MANIFEST, "digest": "sha256:" + "2" * 64, "size": 1,
         "artifactType": mtypes.NYDUS_ARTIFACT, "platform": {"architecture": "arm64", "os": "linux",
                                                         "variant": "v8"}}]}).encode())
    assert isinstance(idx, m.Index)
    assert all(m.is_nydus_descriptor(d) for d in idx.manifests)
    assert b'"os.features":["nydus.remoteimage.v1"]' in m.encode(idx)
    assert idx.manifests[1].platform is not None and idx.manifests[1].platform.spec() == "linux/arm64/v8"
    assert m.parse_platform("linux/amd64") == ("linux", "amd64", None)
    with pytest.raises(InvalidArgument):
        m.parse_platform("amd64")


@pytest.mark.parametrize("data", [b"not json", b"[1]", b'{"schemaVersion": 1, "fsLayers": []}',
                                  b'{"layers": "x", "config": {}}'])
def test_non_images_are_rejected(data: bytes) -> None:
    with pytest.raises(Unsupported):
        m.parse_document(data)


def test_artifacts_that_are_not_images() -> None:
    art = _manifest().model_copy(update={"config": m.Descriptor(
        mediaType="application/vnd.cncf.helm.config.v1+json", digest="sha256:" + "c" * 64, size=1)})
    with pytest.raises(Unsupported, match="not a container image"):
        m.ensure_image(art)
    with pytest.raises(Unsupported, match="not an image layer"):
        m.ensure_image(_manifest("application/octet-stream"))
    m.ensure_image(_manifest())


def test_nydus_config_appends_history_and_replaces_diff_ids() -> None:
    src = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["sh"], "ArgsEscaped": True},
           "rootfs": {"type": "layers", "diff_ids": ["sha256:a"]}, "history": [{"created_by": "x"}]}
    out = m.nydus_config(src, ["sha256:b", "sha256:c"])
    assert out["rootfs"]["diff_ids"] == ["sha256:b", "sha256:c"]
    assert out["history"][-1] == {"created_by": "Nydus Converter", "comment": "Nydus Bootstrap Layer"}
    assert src["rootfs"]["diff_ids"] == ["sha256:a"]
    assert m.comparable_config(out) == {"Cmd": ["sh"]}


def test_credentials_lookup(tmp_path: Path) -> None:
    cfg = tmp_path / ".docker" / "config.json"
    cfg.parent.mkdir()
    auth = base64.b64encode(b"alice:s3cr:et").decode()
    hub = {"username": "bob", "password": "pw"}
    cfg.write_text(json.dumps({"auths": {"127.0.0.1:5000": {"auth": auth},
                                         "https://index.docker.io/v1/": hub}}))
    env = {"HOME": str(tmp_path)}
    assert credentials.lookup("127.0.0.1:5000", env) == ("alice", "s3cr:et")
    assert credentials.lookup("docker.io", env) == ("bob", "pw")
    assert credentials.lookup("other:1", env) is None
    assert credentials.basic_auth(("alice", "s3cr:et")) == auth
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"auths": {"other:1": {"auth": "!!notbase64"}}}))
    with pytest.raises(ConfigError, match="invalid base64"):
        credentials.lookup("other:1", {"DOCKER_CONFIG": str(other)})
    (other / "config.json").write_text("{")
    with pytest.raises(ConfigError, match="cannot read docker config"):
        credentials.lookup("x", {"DOCKER_CONFIG": str(other)})


def test_parse_config() -> None:
    raw = json.dumps({"architecture": "arm64", "os": "linux", "variant": "v8", "unknown": {"kept": 1},
                      "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "a" * 64]},
                      "history": [{"created_by": "x", "empty_layer": True}]}).encode()
    model, obj = m.parse_config(raw)
    assert model.rootfs.diff_ids == ["sha256:" + "a" * 64] and obj["unknown"] == {"kept": 1}
    assert model.platform() is not None and model.platform().spec() == "linux/arm64/v8"  # type: ignore[union-attr]
    for bad in (b"{", b"[]", b'{"architecture": "amd64", "os": "linux"}',
                b'{"rootfs": {"diff_ids": "nope"}}'):
        with pytest.raises(Unsupported):
            m.parse_config(bad)


def test_layer_stream_trusts_magic_when_media_type_says_plain() -> None:
    plain = _tar({"a": b"z" * 1000})
    blob = gzip.compress(plain, mtime=0)
    stream = layer_stream.LayerStream(io.BytesIO(blob), "none", expected_diff_id=_sha(plain))
    assert stream.compression == "gzip" and stream.finish()[1] == _sha(plain)
    with pytest.raises(Unsupported):
        layer_stream.LayerStream(io.BytesIO(b""), "lzma")


def test_credential_helpers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs) -> None:  # type: ignore[no-untyped-def]
    bindir = tmp_path / "bin"
    bindir.mkdir()
    helper = bindir / "docker-credential-fake"
    helper.write_text('#!/bin/sh\nread host\nif [ "$host" = "reg.example:5000" ]; then\n'
                      '  echo \'{"ServerURL":"reg.example:5000","Username":"hu","Secret":"hs"}\'\n'
                      'else\n  echo "credentials not found in native keychain"; exit 1\nfi\n')
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    cfg = tmp_path / ".docker"
    cfg.mkdir()
    (cfg / "config.json").write_text(json.dumps({"credHelpers": {"reg.example:5000": "fake"},
                                                 "credsStore": "fake"}))
    env = {"HOME": str(tmp_path)}
    assert credentials.lookup("reg.example:5000", env) == ("hu", "hs")
    assert credentials.lookup("other.example", env) is None  # the store has nothing for it
    (cfg / "config.json").write_text(json.dumps({"credsStore": "missing"}))
    with logs.expect("credential_helper_failed"):
        assert credentials.lookup("x.example", env) is None
