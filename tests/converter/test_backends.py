"""`--backend-type s3|oss`: blobs go to object storage (moto S3 server, OSS protocol test server),
the registry keeps only the bootstrap layer; check reads the blobs back from the store, and nydusd
mounts the image through its own s3/oss backend."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from nydusd.converter import manifest as m
from nydusd.converter.stores import create_store
from nydusd.errors import AuthError, BlobNotFound, ConfigError
from tests.converter.conftest import Image
from tests.converter.test_convert import check, convert, get_manifest
from tests.harness.oci_registry import Registry


def _store_config(request: pytest.FixtureRequest, kind: str, bucket: str) -> dict[str, Any]:
    if kind == "s3":
        server = request.getfixturevalue("moto_s3")
        server.create_bucket(bucket)
    else:
        server = request.getfixturevalue("oss_server")
        server.buckets.setdefault(bucket, {})
    return dict(server.backend_config(bucket, prefix="nydus/"))


@pytest.mark.parametrize("kind", ["s3", "oss"])
def test_blobs_in_object_storage(request: pytest.FixtureRequest, kind: str, registry: Registry,
                                 source_image: Image, tmp_path: Path) -> None:
    cfg = _store_config(request, kind, f"nydusify-{kind}")
    store = create_store(kind, json.dumps(cfg))
    dst = f"{registry.host}/dst/{kind}:nydus"
    try:
        res = convert(source_image.ref, dst, tmp_path / "w", blob_store=store)
    finally:
        store.close()
    raw, _ = get_manifest(registry, f"dst/{kind}", "nydus")
    mf = m.parse_document(raw)
    assert isinstance(mf, m.Manifest) and len(mf.layers) == 1 and m.is_nydus_manifest(mf)
    assert res.metrics.target_image_size > mf.layers[0].size
    backend = (kind, json.dumps(cfg))
    assert check(dst, source_image.ref, tmp_path / "c", backend=backend) == []
    if kind == "s3":
        bad = dict(cfg, access_key_secret="wrong")
        with pytest.raises(AuthError):
            convert(source_image.ref, f"{registry.host}/dst/{kind}:bad", tmp_path / "w2",
                    blob_store=create_store(kind, json.dumps(bad), force=True))


@pytest.mark.fuse
@pytest.mark.parametrize("kind", ["s3", "oss"])
def test_check_mount_with_object_storage_backend(request: pytest.FixtureRequest, kind: str,
                                                 registry: Registry, source_image: Image,
                                                 tmp_path: Path) -> None:
    cfg = _store_config(request, kind, f"nydusify-mnt-{kind}")
    store = create_store(kind, json.dumps(cfg))
    dst = f"{registry.host}/dst/mnt-{kind}:nydus"
    try:
        convert(source_image.ref, dst, tmp_path / "w", blob_store=store)
    finally:
        store.close()
    assert check(dst, source_image.ref, tmp_path / "c", backend=(kind, json.dumps(cfg)),
                 nydusd=f"{sys.executable} -m nydusd") == []


@pytest.mark.parametrize("kind", ["localfs", "s3", "oss"])
def test_store_put_skips_existing_blobs_unless_forced(request: pytest.FixtureRequest, kind: str,
                                                     tmp_path: Path) -> None:
    """The store writes through the storage backend (oss2 / botocore signatures checked by the
    servers): an existing object is not uploaded again unless forced, a download hashes the bytes."""
    if kind == "localfs":
        cfg: dict[str, Any] = {"dir": str(tmp_path / "blobs")}
    else:
        cfg = _store_config(request, kind, f"nydusify-put-{kind}")
    data = bytes(range(256)) * 40000  # > one download piece
    blob_id = hashlib.sha256(data).hexdigest()
    src = tmp_path / "blob"
    src.write_bytes(data)
    with create_store(kind, json.dumps(cfg)) as store:
        assert not store.exists(blob_id)
        assert store.put(blob_id, src) is True
        assert store.exists(blob_id)
        assert store.put(blob_id, src) is False
        assert store.download(blob_id, tmp_path / "back") == blob_id
        assert (tmp_path / "back").read_bytes() == data
        assert store.backend_config() == cfg
        with pytest.raises(BlobNotFound):
            store.download("0" * 64, tmp_path / "missing")
        assert not (tmp_path / "missing").exists()
    src.write_bytes(b"replaced")
    with create_store(kind, json.dumps(cfg), force=True) as forced:
        assert forced.put(blob_id, src) is True
        assert forced.download(blob_id, tmp_path / "again") == hashlib.sha256(b"replaced").hexdigest()


@pytest.mark.parametrize(("kind", "cfg", "field"), [
    ("s3", {"bucket_name": "b", "endpoint": "127.0.0.1:1"}, "backend.s3.region"),
    ("s3", {"region": "r"}, "backend.s3.bucket_name"),
    ("oss", {"endpoint": "127.0.0.1:1"}, "backend.oss.bucket_name"),
    ("localfs", {}, "backend.localfs.dir"),
    ("localfs", {"dir": 5}, "backend.localfs.dir"),
    ("registry", {}, "backend-type"),
    ("s3", [], "backend-config"),
])
def test_store_config_errors_name_the_field(kind: str, cfg: Any, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        create_store(kind, json.dumps(cfg))
    assert info.value.context["field"] == field


def test_s3_store_without_endpoint_means_aws() -> None:
    with create_store("s3", json.dumps({"bucket_name": "b", "region": "eu-west-1"})) as store:
        assert store.backend.base_url == "https://s3.eu-west-1.amazonaws.com"  # type: ignore[attr-defined]
        assert store.backend_config()["endpoint"] == ""
