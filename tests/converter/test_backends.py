"""`--backend-type s3|oss`: blobs go to object storage (moto S3 server, OSS protocol test server),
the registry keeps only the bootstrap layer; check reads the blobs back from the store, and nydusd
mounts the image through its own s3/oss backend."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from nydusd.converter import manifest as m
from nydusd.converter.stores import create_store
from nydusd.errors import AuthError
from tests.converter.conftest import Image
from tests.converter.registry import Registry
from tests.converter.test_convert import check, convert, get_manifest


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
