"""Bad input gets a clear 4xx/5xx ``{"code", "message"}`` body, never a crash (spec §3.2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.harness.fakes.daemon import FakeDaemon


def post_mount(client: TestClient, body: object, mp: str = "/x", raw: bytes | None = None,
               headers: dict[str, str] | None = None) -> object:
    url = f"/api/v1/mount?mountpoint={mp}"
    if raw is not None:
        return client.post(url, content=raw, headers=headers or {})
    return client.post(url, json=body)


def test_malformed_json(client: TestClient, daemon: FakeDaemon) -> None:
    r = post_mount(client, None, raw=b'{"source": "/a", ')
    assert r.status_code == 400
    body = r.json()
    assert body["code"] == "UNDEFINED" and body["message"].startswith('ParseBody(Error("invalid JSON')
    assert daemon.calls == []


def test_body_without_content_type_is_parsed_as_json(client: TestClient, daemon: FakeDaemon,
                                                     bootstrap: Path, config_text: str) -> None:
    # curl -d sends application/x-www-form-urlencoded; Go's client sends no type; upstream ignores it
    raw = json.dumps({"source": str(bootstrap), "fs_type": "rafs", "config": config_text}).encode()
    r = post_mount(client, None, raw=raw, headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 204, r.text
    assert "/x" in daemon.mounts()


@pytest.mark.parametrize("body, missing", [({"fs_type": "rafs", "config": "{}"}, "source"),
                                           ({"source": "/b", "fs_type": "rafs"}, "config")])
def test_missing_fields(client: TestClient, body: dict[str, str], missing: str) -> None:
    r = post_mount(client, body)
    assert r.status_code == 400
    assert r.json()["message"] == f'ParseBody(Error("missing field `{missing}`"))'


def test_missing_body(client: TestClient) -> None:
    r = client.post("/api/v1/mount?mountpoint=/x")
    assert r.status_code == 400 and r.json()["message"].startswith("ParseBody(")


def test_wrong_field_type(client: TestClient) -> None:
    r = post_mount(client, {"source": 5, "fs_type": "rafs", "config": "{}"})
    assert r.status_code == 400 and "source" in r.json()["message"]


def test_missing_mountpoint_query(client: TestClient, bootstrap: Path, config_text: str) -> None:
    for method in ("POST", "DELETE"):
        r = client.request(method, "/api/v1/mount",
                           json={"source": str(bootstrap), "fs_type": "rafs", "config": config_text})
        assert r.status_code == 400
        assert r.json()["message"] == "QueryString(\"'mountpoint' should be specified in query string\")"


@pytest.mark.parametrize("fs_type", ["", "ext4"])
def test_wrong_fs_type_is_rejected_as_upstream(client: TestClient, daemon: FakeDaemon, bootstrap: Path,
                                               config_text: str, fs_type: str) -> None:
    r = post_mount(client, {"source": str(bootstrap), "fs_type": fs_type, "config": config_text})
    assert r.status_code == 500
    assert r.json()["message"] == ('Mount(MountFilesystem(Other("invalid argument `only \'rafs\' and '
                                   f"'passthrough_fs' are supported, but {fs_type} was specified`\")))")
    assert daemon.calls == []


def test_passthrough_is_left_to_the_daemon(client: TestClient, bootstrap: Path, config_text: str) -> None:
    r = post_mount(client, {"source": str(bootstrap), "fs_type": "passthrough_fs", "config": config_text})
    assert r.status_code == 501
    assert r.json()["message"] == "Mount(MountFilesystem(Unsupported))"


@pytest.mark.parametrize("mp", ["relative", "/a/../b", "/..", "/a/./b", "%00"])
def test_bad_mountpoints(client: TestClient, daemon: FakeDaemon, bootstrap: Path, config_text: str,
                         mp: str) -> None:
    r = post_mount(client, {"source": str(bootstrap), "fs_type": "rafs", "config": config_text}, mp=mp)
    assert r.status_code == 400
    assert "invalid mountpoint" in r.json()["message"]
    assert client.delete(f"/api/v1/mount?mountpoint={mp}").status_code == 400
    assert daemon.calls == []


def test_seed_form_bad_mountpoint(client: TestClient, bootstrap: Path, config_text: str) -> None:
    r = client.put("/api/v1/mount", json={"source": str(bootstrap), "fstype": "rafs",
                                          "mountpoint": "foo/../bar", "config": config_text})
    assert r.status_code == 400 and r.json()["message"].startswith('ParseBody("invalid mountpoint')


def test_config_with_bad_keys_names_the_field(client: TestClient, bootstrap: Path, blob_dir: Path) -> None:
    cfg = {"device": {"backend": {"type": "localfs", "config": {"dir": str(blob_dir)}},
                      "cache": {"type": "blobcache", "config": {"work_dir": 5}}},
           "mode": "direct"}
    r = post_mount(client, {"source": str(bootstrap), "fs_type": "rafs", "config": json.dumps(cfg)})
    assert r.status_code == 500
    msg = r.json()["message"]
    assert msg.startswith('Mount(MountFilesystem(Other("invalid configuration, ')
    assert "work_dir" in msg
    assert r.json()["code"] == "INVALID_CONFIG"


def test_config_that_is_not_a_document(client: TestClient, bootstrap: Path) -> None:
    r = post_mount(client, {"source": str(bootstrap), "fs_type": "rafs", "config": "not a config"})
    assert r.status_code == 500 and "invalid configuration" in r.json()["message"]


def test_missing_bootstrap(client: TestClient, config_text: str, tmp_path: Path) -> None:
    r = post_mount(client, {"source": str(tmp_path / "nope"), "fs_type": "rafs", "config": config_text})
    assert r.status_code == 500 and "nope" in r.json()["message"]


def test_bad_log_level_body(client: TestClient) -> None:
    r = client.put("/api/v1/daemon", json={"level": "debug"})
    assert r.status_code == 400 and r.json()["message"] == 'ParseBody(Error("missing field `log_level`"))'


@pytest.mark.allow_logs
def test_unexpected_daemon_crash_is_a_500_body(daemon: FakeDaemon) -> None:
    from api.app import create_app

    def boom() -> dict[str, object]:
        raise RuntimeError("kaput")

    daemon.info = boom  # type: ignore[method-assign]
    with TestClient(create_app(daemon), raise_server_exceptions=False) as c:
        r = c.get("/api/v1/daemon")
    assert r.status_code == 500
    assert r.json() == {"code": "INTERNAL",
                        "message": 'DaemonInfo(DaemonAbnormal(Other("RuntimeError: kaput")))'}
