"""nydusd over object storage: S3 (the moto server, signatures checked) and OSS (the OSS-protocol
test server); one shared daemon mounts both images and each mounted tree equals its source."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from tests.harness.apiclient import ApiClient
from tests.harness.daemon import Nydusd
from tests.harness.images import build_daemon_image, sample_tree
from tests.harness.treecmp import compare_trees

pytestmark = pytest.mark.fuse


def test_shared_daemon_over_s3_and_oss(tmp_path, moto_s3, oss_server):
    src = sample_tree(tmp_path / "src", big=False)
    image = build_daemon_image(src, tmp_path / "img", version=6)
    blob = next(Path(image.blob_dir).iterdir())
    bucket = f"nydus-{uuid.uuid4().hex[:8]}"
    moto_s3.create_bucket(bucket)
    moto_s3.put_object(bucket, "blobs/" + blob.name, blob.read_bytes())
    oss_server.put_object(bucket, "oss/" + blob.name, blob.read_bytes())
    configs = {
        "/s3": {"type": "s3", "config": moto_s3.backend_config(bucket, "blobs/")},
        "/oss": {"type": "oss", "config": oss_server.backend_config(bucket, "oss/")},
    }
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sock = str(tmp_path / "api.sock")
    with Nydusd(["--mountpoint", str(mnt), "--apisock", sock], mnt, log_path=tmp_path / "log",
                apisock=sock):
        api = ApiClient(sock)
        for mp, backend in configs.items():
            cfg = json.dumps({"device": {"backend": backend, "cache": {"type": ""}}, "mode": "direct",
                              "digest_validate": True, "enable_xattr": True})
            status, body = api.mount(mp, image.bootstrap, cfg)
            assert status == 204, body
        for mp in configs:
            assert compare_trees(src, mnt / mp.strip("/")) > 50
            status, metrics = api.request("GET", "/api/v1/metrics/backend", id=mp)
            assert status == 200 and metrics["read_count"] > 0 and metrics["read_errors"] == 0
            assert metrics["backend_type"] == "oss"  # upstream reports s3 as "oss" too
