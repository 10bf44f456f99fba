"""``openapi.yaml`` (repository root) is the wire contract: it must equal ``create_app(...).openapi()``
and describe both the upstream and the seed mount forms."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from api.app import create_app
from tests.harness.fakes.daemon import FakeDaemon

ROOT = Path(__file__).resolve().parents[2]
REGENERATE = "regenerate it with: .venv/bin/python -m api.app > openapi.yaml"


def load_contract() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "openapi.yaml").read_text())


def test_openapi_yaml_matches_the_app() -> None:
    contract = load_contract()
    actual = create_app(FakeDaemon()).openapi()
    assert set(contract["paths"]) == set(actual["paths"]), REGENERATE
    for path, item in actual["paths"].items():
        assert set(contract["paths"][path]) == set(item), f"{path}: methods differ; {REGENERATE}"
    assert contract["components"]["schemas"] == actual["components"]["schemas"], REGENERATE
    assert contract == actual, REGENERATE


def test_contract_lists_the_upstream_endpoints() -> None:
    paths = load_contract()["paths"]
    want = {
        "/api/v1/daemon": {"get", "put"}, "/api/v1/daemon/events": {"get"},
        "/api/v1/daemon/backend": {"get"}, "/api/v1/daemon/start": {"put"}, "/api/v1/daemon/exit": {"put"},
        "/api/v1/daemon/fuse/sendfd": {"put"}, "/api/v1/daemon/fuse/takeover": {"put"},
        "/api/v1/mount": {"post", "put", "delete"}, "/api/v1/metrics": {"get"},
        "/api/v1/metrics/files": {"get"}, "/api/v1/metrics/pattern": {"get"},
        "/api/v1/metrics/backend": {"get"}, "/api/v1/metrics/blobcache": {"get"},
        "/api/v1/metrics/inflight": {"get"}, "/api/v2/daemon": {"get", "put"},
        "/api/v2/blobs": {"get", "put", "delete"}, "/api/v1/config": {"get", "put"}, "/metrics": {"get"},
    }
    for path, methods in want.items():
        assert set(paths[path]) == methods, path


def test_contract_describes_both_mount_forms() -> None:
    doc = load_contract()
    mount = doc["components"]["schemas"]["MountRequest"]
    fields = {"source", "fs_type", "config", "prefetch_files", "fstype", "mountpoint"}
    assert fields <= set(mount["properties"])
    assert set(mount["required"]) == {"source", "config"}
    put = doc["paths"]["/api/v1/mount"]["put"]
    query = [p for p in put["parameters"] if p["name"] == "mountpoint"][0]
    assert query["required"] is False and "seed" in put["description"]
    post = doc["paths"]["/api/v1/mount"]["post"]
    assert [p for p in post["parameters"] if p["name"] == "mountpoint"][0]["required"] is True
