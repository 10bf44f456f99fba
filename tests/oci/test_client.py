"""RegistryClient against a real docker-registry: uploads (monolithic, chunked, from files),
cross-repository mount, manifests with media types, tags, auth failures."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import pytest

from nydusd.errors import AuthError, BlobNotFound, NotFound
from nydusd.oci.mediatypes import OCI_INDEX, OCI_MANIFEST
from tests.harness.servers.registry import RegistryServer


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("chunk_size", [None, 100_000, 1 << 20])
def test_push_and_read_back(registry_htpasswd: RegistryServer, chunk_size: int | None) -> None:
    data = os.urandom(350_001)
    with registry_htpasswd.client("oci/push") as c:
        digest = c.push_blob(data, chunk_size=chunk_size)
        assert digest == _digest(data)
        assert c.blob_exists(digest) and c.head_blob(digest) == len(data)
        assert c.get_blob(digest) == data
        assert c.get_blob(digest, 1000, 10) == data[1000:1010]
        assert c.get_blob(digest, len(data) - 3, 100) == data[-3:]
        assert c.get_blob(digest, len(data), 10) == b""
        # pushing again is a no-op (HEAD says it exists)
        assert c.push_blob(data) == digest


def test_push_from_file_and_file_object(registry_server: RegistryServer, tmp_path: Path) -> None:
    data = os.urandom(200_000)
    path = tmp_path / "blob"
    path.write_bytes(data)
    with registry_server.client("oci/files") as c:
        assert c.push_blob(str(path)) == _digest(data)
        other = data[::-1]
        assert c.push_blob(io.BytesIO(other), chunk_size=64_000) == _digest(other)
        assert c.get_blob(_digest(other)) == other


def test_cross_repo_mount(registry_htpasswd: RegistryServer) -> None:
    data = os.urandom(50_000)
    with registry_htpasswd.client("oci/src") as src, registry_htpasswd.client("oci/dst") as dst:
        digest = src.push_blob(data)
        assert not dst.blob_exists(digest)
        assert dst.mount_blob(digest, "oci/src")
        assert dst.blob_exists(digest) and dst.get_blob(digest, 0, 10) == data[:10]
        missing = _digest(b"nowhere")
        assert not dst.mount_blob(missing, "oci/src")
        # push_blob tries the mount first
        data2 = os.urandom(1000)
        d2 = src.push_blob(data2)
        assert dst.push_blob(data2, mount_from=["oci/src"]) == d2


def test_token_auth_push_and_mount(registry_token: RegistryServer) -> None:
    data = os.urandom(10_000)
    with registry_token.client("tok/a") as a, registry_token.client("tok/b") as b:
        digest = a.push_blob(data)
        assert b.mount_blob(digest, "tok/a")
        assert b.get_blob(digest) == data
    scopes = [r["scopes"] for r in registry_token.token.requests]
    assert ["repository:tok/b:pull,push", "repository:tok/a:pull"] in scopes
    with registry_token.client("tok/anon", auth=None) as anon, pytest.raises(AuthError):
        anon.push_blob(b"anonymous may not push")


def test_manifests_round_trip(registry_server: RegistryServer) -> None:
    with registry_server.client("oci/image") as c:
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": []}}).encode()
        layer = os.urandom(3000)
        cfg_d, layer_d = c.push_blob(config), c.push_blob(layer)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_d,
                       "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.nydus.blob.v1", "digest": layer_d,
                        "size": len(layer), "annotations": {"containerd.io/snapshot/nydus-blob": "true"}}],
        }).encode()
        digest = c.put_manifest("v1", manifest, OCI_MANIFEST)
        assert digest == _digest(manifest)
        body, media, got = c.get_manifest("v1")
        assert (body, media, got) == (manifest, OCI_MANIFEST, digest)
        assert c.get_manifest(digest)[0] == manifest
        index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(manifest),
             "platform": {"architecture": "amd64", "os": "linux"}}]}).encode()
        c.put_manifest("multi", index, OCI_INDEX)
        assert c.get_manifest("multi")[1] == OCI_INDEX
        assert sorted(c.list_tags()) == ["multi", "v1"]
        with pytest.raises(NotFound):
            c.get_manifest("nope")
        with pytest.raises(BlobNotFound):
            c.head_blob(_digest(b"absent"))


def test_wrong_credentials(registry_htpasswd: RegistryServer) -> None:
    from tests.harness.servers.registry import basic_auth

    with registry_htpasswd.client("oci/x", auth=basic_auth("nydus", "bad")) as c, pytest.raises(AuthError):
        c.ping()
    with registry_htpasswd.client("oci/x") as ok:
        ok.ping()
