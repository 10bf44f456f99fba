"""Every route of the API against a FakeDaemon (TestClient tier): status codes, bodies, headers and
the upstream error messages callers match on (spec interfaces.md §3)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from fastapi.testclient import TestClient

from api.schemas import (
    BackendMetrics,
    BlobcacheMetrics,
    DaemonInfo,
    Events,
    FileIoStats,
    FsIoStats,
)
from tests.harness.fakes.daemon import FakeDaemon


def mount(client: TestClient, mp: str, bootstrap: Path, config: str, method: str = "POST") -> object:
    return client.request(method, f"/api/v1/mount?mountpoint={quote(mp, safe='')}",
                          json={"source": str(bootstrap), "fs_type": "rafs", "config": config})


def test_daemon_info_is_upstream_shaped(client: TestClient, daemon: FakeDaemon, bootstrap: Path,
                                        config_text: str) -> None:
    assert mount(client, "/sid1", bootstrap, config_text).status_code == 204
    r = client.get("/api/v1/daemon")
    assert r.status_code == 200
    assert r.headers["server"] == "Nydus API"
    assert r.headers["content-type"] == "application/json"
    info = DaemonInfo.model_validate(r.json())
    assert info.state == "RUNNING"
    assert info.backend_collection is not None and set(info.backend_collection) == {"/sid1"}
    assert info.backend_collection["/sid1"].config["backend"]["type"] == "localfs"
    v2 = client.get("/api/v2/daemon").json()
    assert v2["backend_collection"] is None and v2["state"] == "RUNNING"


def test_set_log_level(client: TestClient, daemon: FakeDaemon) -> None:
    r = client.put("/api/v1/daemon", json={"log_level": "DEBUG"})
    assert r.status_code == 204 and r.content == b""
    assert r.headers["content-type"] == "application/json"
    assert daemon.log_level == "debug"
    assert client.put("/api/v2/daemon", json={"log_level": "warn"}).status_code == 204
    assert daemon.log_level == "warn"


def test_invalid_log_level_is_500_with_reason(client: TestClient, daemon: FakeDaemon) -> None:
    r = client.put("/api/v1/daemon", json={"log_level": "loud"})
    assert r.status_code == 500
    assert r.json()["message"].startswith('Configure(DaemonAbnormal(Other("invalid configuration, ')
    assert "loud" in r.json()["message"]
    assert daemon.log_level == "info"


def test_events(client: TestClient) -> None:
    r = client.get("/api/v1/daemon/events")
    assert r.status_code == 200
    assert Events.model_validate(r.json()).max_errors == 500


def test_backend_info_needs_a_mountpoint(client: TestClient, bootstrap: Path, config_text: str) -> None:
    r = client.get("/api/v1/daemon/backend")
    assert r.status_code == 400
    assert r.json() == {"code": "UNDEFINED",
                        "message": "QueryString(\"'mountpoint' should be specified in query string\")"}
    r = client.get("/api/v1/daemon/backend?mountpoint=/nope")
    assert r.status_code == 500
    assert r.json()["message"].startswith('FsBackendInfo(Metrics(Daemon(Other("object or filesystem '
                                          "doesn't exist")
    mount(client, "/a", bootstrap, config_text)
    r = client.get("/api/v1/daemon/backend?mountpoint=%2Fa")
    assert r.status_code == 200 and r.json()["magic"] == 0x52414653


def test_start_and_exit_follow_the_state_machine(client: TestClient, daemon: FakeDaemon) -> None:
    r = client.put("/api/v1/daemon/start")
    assert r.status_code == 400
    assert r.json()["message"] == 'Configure(DaemonAbnormal(UnexpectedEvent("Start")))'
    assert client.put("/api/v1/daemon/exit").status_code == 204
    assert daemon.exited and daemon.state == "STOPPED"
    assert client.put("/api/v1/daemon/exit").status_code == 400


def test_start_from_ready(client: TestClient) -> None:
    daemon = FakeDaemon(state="READY")
    from api.app import create_app
    with TestClient(create_app(daemon)) as c:
        assert c.put("/api/v1/daemon/start").status_code == 204
    assert daemon.state == "RUNNING"


def test_takeover_and_blob_endpoints_are_not_supported(client: TestClient) -> None:
    for method, path, want in [
        ("PUT", "/api/v1/daemon/fuse/sendfd", "Upgrade(DaemonAbnormal(Unsupported))"),
        ("PUT", "/api/v1/daemon/fuse/takeover", "Upgrade(DaemonAbnormal(Unsupported))"),
        ("PUT", "/api/v2/blobs", "CreateBlobObject(DaemonAbnormal(Unsupported))"),
        ("GET", "/api/v2/blobs?domain_id=x", "GetBlobObjects(DaemonAbnormal(Unsupported))"),
        ("DELETE", "/api/v2/blobs?domain_id=x", "DeleteBlobObject(DaemonAbnormal(Unsupported))"),
    ]:
        r = client.request(method, path, json={} if path.endswith("blobs") and method == "PUT" else None)
        assert r.status_code == 501, (path, r.text)
        assert r.json() == {"code": "UNSUPPORTED", "message": want}
    # blob cache-file GC is a no-op for FUSE daemons upstream
    assert client.delete("/api/v2/blobs?blob_id=abc").status_code == 204


def test_config_endpoint_without_daemon_support(client: TestClient) -> None:
    r = client.put("/api/v1/config?id=%2F", json={"registry_auth": "dXNlcjpwYXNz"})
    assert r.status_code == 501 and r.json()["message"] == "Configure(DaemonAbnormal(Unsupported))"


def test_mount_remount_umount(client: TestClient, daemon: FakeDaemon, bootstrap: Path,
                              config_text: str, tmp_path: Path) -> None:
    r = mount(client, "/snap/1", bootstrap, config_text)
    assert r.status_code == 204 and r.content == b""
    assert daemon.calls[-1] == ("mount", "/snap/1", str(bootstrap), config_text, "rafs", None)
    other = tmp_path / "other.boot"
    other.write_bytes(b"x")
    r = client.put("/api/v1/mount?mountpoint=%2Fsnap%2F1",
                   json={"source": str(other), "fs_type": "rafs", "config": config_text,
                         "prefetch_files": ["/etc/passwd"]})
    assert r.status_code == 204
    assert daemon.calls[-1] == ("remount", "/snap/1", str(other), config_text, "rafs", ["/etc/passwd"])
    assert daemon.mounts()["/snap/1"]["source"] == str(other)
    assert client.delete("/api/v1/mount?mountpoint=/snap/1").status_code == 204
    assert daemon.mounts() == {}


def test_second_mount_at_same_path_is_refused_with_upstream_message(
        client: TestClient, bootstrap: Path, config_text: str) -> None:
    assert mount(client, "/sid", bootstrap, config_text).status_code == 204
    r = mount(client, "/sid", bootstrap, config_text)
    assert r.status_code == 500
    assert r.json()["code"] == "ALREADY_EXISTS"
    assert r.json()["message"].startswith('Mount(MountFilesystem(Other("object or filesystem already exists')
    assert "object or filesystem already exists" in r.json()["message"]


def test_umount_unknown_is_500(client: TestClient) -> None:
    r = client.delete("/api/v1/mount?mountpoint=%2Fghost")
    assert r.status_code == 500
    assert "object or filesystem doesn't exist" in r.json()["message"]
    assert r.json()["message"].startswith("Mount(MountFilesystem(Other(")


def test_remount_unknown_is_500(client: TestClient, bootstrap: Path, config_text: str) -> None:
    r = mount(client, "/ghost", bootstrap, config_text, method="PUT")
    assert r.status_code == 500 and "doesn't exist" in r.json()["message"]


def test_seed_form_mounts_with_config_path(client: TestClient, daemon: FakeDaemon, bootstrap: Path,
                                           config_text: str, tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(config_text)
    r = client.put("/api/v1/mount", json={"source": str(bootstrap), "fstype": "rafs",
                                          "mountpoint": "/foo/bar", "config": str(cfg)})
    assert r.status_code == 204, r.text
    assert daemon.calls[-1] == ("mount", "/foo/bar", str(bootstrap), config_text, "rafs", None)
    # the same with the config document inline
    r = client.put("/api/v1/mount", json={"source": str(bootstrap), "fstype": "rafs",
                                          "mountpoint": "/foo/baz", "config": config_text})
    assert r.status_code == 204
    assert set(daemon.mounts()) == {"/foo/bar", "/foo/baz"}


def test_seed_form_without_mountpoint_anywhere(client: TestClient, bootstrap: Path, config_text: str) -> None:
    r = client.put("/api/v1/mount", json={"source": str(bootstrap), "fstype": "rafs", "config": config_text})
    assert r.status_code == 400
    assert r.json()["message"] == "QueryString(\"'mountpoint' should be specified in query string\")"


def test_metrics_routes(client: TestClient, daemon: FakeDaemon, bootstrap: Path, config_text: str) -> None:
    mount(client, "/m", bootstrap, config_text)
    daemon.read("/m", ino=5, size=4096)
    daemon.read("/m", ino=6, size=100)
    fs = FsIoStats.model_validate(client.get("/api/v1/metrics?id=%2Fm").json())
    assert fs.data_read == 4196 and fs.fop_hits[4] == 2 and fs.id == "/m"
    assert client.get("/api/v1/metrics").json() == fs.model_dump()  # the only fs: no id needed
    files = client.get("/api/v1/metrics/files?id=/m").json()
    assert {k: FileIoStats.model_validate(v).data_read for k, v in files.items()} == {"5": 4096, "6": 100}
    assert client.get("/api/v1/metrics/files?id=/m&latest=true").json() == [[5, 6]]
    assert client.get("/api/v1/metrics/files?id=/m&latest=true").json() == []  # read-and-clear
    pattern = client.get("/api/v1/metrics/pattern?id=/m").json()
    assert [(p["ino"], p["nr_read"]) for p in pattern] == [(5, 1), (6, 1)]
    backend = BackendMetrics.model_validate(client.get("/api/v1/metrics/backend?id=/m").json())
    assert backend.read_count == 2 and backend.backend_type == "localfs"
    cache = BlobcacheMetrics.model_validate(client.get("/api/v1/metrics/blobcache?id=/m").json())
    assert cache.total == 2


def test_metrics_unknown_id_is_404_no_counter(client: TestClient) -> None:
    for path, op in [("/api/v1/metrics", "GlobalMetrics"), ("/api/v1/metrics/files", "FsFilesMetrics"),
                     ("/api/v1/metrics/pattern", "Pattern"), ("/api/v1/metrics/backend", "BackendMetrics"),
                     ("/api/v1/metrics/blobcache", "BlobcacheMetrics")]:
        r = client.get(path + "?id=%2Fnope")
        assert r.status_code == 404, path
        assert r.json()["message"] == f"{op}(Metrics(Stats(NoCounter)))"


def test_inflight_is_204_when_idle(client: TestClient, daemon: FakeDaemon) -> None:
    r = client.get("/api/v1/metrics/inflight")
    assert r.status_code == 204 and r.content == b""
    daemon.inflight.append({"inode": 7, "opcode": 15, "unique": 99, "timestamp_secs": 1700000000})
    r = client.get("/api/v1/metrics/inflight")
    assert r.status_code == 200 and r.json()[0]["unique"] == 99


def test_unknown_path_and_wrong_method(client: TestClient) -> None:
    r = client.get("/api/v1/nothing")
    assert r.status_code == 404 and r.json() == {"code": "UNDEFINED", "message": "NoRoute"}
    r = client.get("/api/v1/mount?mountpoint=/x")
    assert r.status_code == 400 and r.json() == {"code": "UNDEFINED", "message": "BadRequest"}
    assert r.headers["server"] == "Nydus API"


def test_requests_are_logged_once_with_request_id(client: TestClient, logs: object) -> None:
    client.get("/api/v1/daemon")
    client.get("/api/v1/daemon")
    lines = [e for e in logs.capture.entries if e["event"] == "api_request_handled"]  # type: ignore[attr-defined]
    assert len(lines) == 2
    assert {e["path"] for e in lines} == {"/api/v1/daemon"} and {e["status"] for e in lines} == {200}
    assert len({e["request_id"] for e in lines}) == 2


def test_paths_match_exactly(client: TestClient) -> None:
    r = client.get("/api/v1/daemon/", follow_redirects=False)
    assert r.status_code == 404 and r.json()["message"] == "NoRoute"


def test_runtime_config_endpoint_when_the_daemon_has_it() -> None:
    from api.app import create_app
    from tests.harness.fakes.daemon import ConfigurableFakeDaemon

    daemon = ConfigurableFakeDaemon()
    with TestClient(create_app(daemon)) as c:
        r = c.put("/api/v1/config?id=%2Fsid", json={"registry_auth": "dXNlcjpwYXNz"})
        assert r.status_code == 204
        assert daemon.runtime == {"/sid": {"registry_auth": "dXNlcjpwYXNz"}}
        assert c.get("/api/v1/config?id=/sid").json() == {"registry_auth": "dXNlcjpwYXNz"}
        assert c.get("/api/v1/config").json() == {"/sid:registry_auth": "dXNlcjpwYXNz"}
        assert c.put("/api/v1/config", json={"proxy_url": "http://p"}).status_code == 204
        assert daemon.runtime[""] == {"proxy_url": "http://p"}
        r = c.put("/api/v1/config", json={"colour": "blue"})
        assert r.status_code == 500 and "colour" in r.json()["message"]
        r = c.put("/api/v1/config", json={"registry_auth": 5})
        assert r.status_code == 400
