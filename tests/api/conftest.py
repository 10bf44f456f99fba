"""Fixtures of the API tests: a FakeDaemon behind TestClient, configs and a bootstrap path."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from tests.harness.fakes.daemon import FakeDaemon


@pytest.fixture
def daemon() -> FakeDaemon:
    return FakeDaemon()


@pytest.fixture
def client(daemon: FakeDaemon) -> Iterator[TestClient]:
    with TestClient(create_app(daemon), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def blob_dir(tmp_path: Path) -> Path:
    d = tmp_path / "blobs"
    d.mkdir()
    return d


@pytest.fixture
def config_text(blob_dir: Path) -> str:
    """A v1 config as the snapshotter writes it (localfs instead of registry)."""
    return json.dumps({"device": {"backend": {"type": "localfs", "config": {"dir": str(blob_dir)}},
                                  "cache": {"type": "blobcache", "config": {"work_dir": str(blob_dir)}}},
                       "mode": "direct", "digest_validate": False, "iostats_files": True,
                       "enable_xattr": True, "access_pattern": True, "latest_read_files": True})


@pytest.fixture
def bootstrap(tmp_path: Path) -> Path:
    p = tmp_path / "image.boot"
    p.write_bytes(b"RAFS" + b"\0" * 8188)
    return p
