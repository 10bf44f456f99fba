"""nydusd over a real registry (docker-registry with htpasswd auth): the blob is pulled lazily with
ranged GETs through the registry backend, and the mounted tree equals its source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.harness.daemon import Nydusd
from tests.harness.images import build_daemon_image, sample_tree
from tests.harness.treecmp import compare_trees

pytestmark = pytest.mark.fuse


@pytest.mark.parametrize("version", [5, 6])
def test_mount_from_registry_with_basic_auth(tmp_path, registry_htpasswd, version):
    src = sample_tree(tmp_path / "src")
    image = build_daemon_image(src, tmp_path / "img", version=version)
    repo = f"nydus/sample-v{version}"
    for blob in Path(image.blob_dir).iterdir():
        assert registry_htpasswd.push_blob(repo, blob.read_bytes()) == blob.name
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({
        "device": {"backend": {"type": "registry", "config": registry_htpasswd.backend_config(repo)},
                   "cache": {"type": "blobcache", "config": {"work_dir": str(tmp_path / "cache")}}},
        "mode": "direct", "digest_validate": True, "enable_xattr": True}))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sock = str(tmp_path / "api.sock")
    with Nydusd(["--config", str(cfg), "--bootstrap", image.bootstrap, "--mountpoint", str(mnt),
                 "--apisock", sock], mnt, log_path=tmp_path / "log", apisock=sock):
        assert compare_trees(src, mnt) > 50
        from tests.harness.apiclient import ApiClient

        status, backend = ApiClient(sock).request("GET", "/api/v1/metrics/backend")
        assert status == 200 and backend["backend_type"] == "registry"
        assert backend["read_count"] > 0 and backend["read_errors"] == 0


def test_image_pull_auth_env_supplies_credentials(tmp_path, registry_htpasswd):
    from tests.harness.servers.registry import basic_auth

    src = tmp_path / "src"
    src.mkdir()
    (src / "hello").write_bytes(b"pulled with IMAGE_PULL_AUTH\n" * 1000)
    image = build_daemon_image(src, tmp_path / "img", version=6)
    repo = "nydus/env-auth"
    for blob in Path(image.blob_dir).iterdir():
        registry_htpasswd.push_blob(repo, blob.read_bytes())
    backend = registry_htpasswd.backend_config(repo)
    backend.pop("auth")
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"device": {"backend": {"type": "registry", "config": backend},
                                          "cache": {"type": ""}}, "mode": "direct"}))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with Nydusd(["--config", str(cfg), "--bootstrap", image.bootstrap, "--mountpoint", str(mnt)], mnt,
                log_path=tmp_path / "log", env={"IMAGE_PULL_AUTH": basic_auth()}):
        assert (mnt / "hello").read_bytes() == (src / "hello").read_bytes()


def test_backend_outage_fails_reads_then_recovers(tmp_path, registry_server, fault_shim):
    """Registry errors beyond the retry budget give EIO on data only; once the registry answers
    again the same file reads fine -- the daemon never needed a restart. Transient faults within
    the budget are invisible."""
    src = sample_tree(tmp_path / "src")
    image = build_daemon_image(src, tmp_path / "img", version=6)
    repo = "nydus/outage"
    for blob in Path(image.blob_dir).iterdir():
        registry_server.push_blob(repo, blob.read_bytes())
    backend = registry_server.backend_config(repo, host=f"127.0.0.1:{fault_shim.port}", retry_limit=1)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"device": {"backend": {"type": "registry", "config": backend},
                                          "cache": {"type": ""}}, "mode": "direct"}))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with Nydusd(["--config", str(cfg), "--bootstrap", image.bootstrap, "--mountpoint", str(mnt)], mnt,
                log_path=tmp_path / "log") as d:
        fault_shim.inject(*["503"] * 20)
        with pytest.raises(OSError) as exc:
            (mnt / "dir" / "multi_chunk").read_bytes()
        assert exc.value.errno == 5
        assert (mnt / "dir" / "multi_chunk").stat().st_size > 0
        fault_shim.randomize(0.0, seed=1)
        with fault_shim._lock:
            fault_shim._plan.clear()
        fault_shim.inject("500")  # one transient failure: retried, invisible
        assert (mnt / "dir" / "multi_chunk").read_bytes() == (src / "dir" / "multi_chunk").read_bytes()
        assert d.alive()


def test_registry_auth_renewed_through_the_config_api(tmp_path, registry_htpasswd):
    """The snapshotter's credential renewal: PUT /api/v1/config {"registry_auth"} reaches the
    registry backend of the running mount; a later mount under that id starts with it."""
    from tests.harness.apiclient import ApiClient
    from tests.harness.servers.registry import basic_auth

    src = tmp_path / "src"
    src.mkdir()
    (src / "hello").write_bytes(b"renewed credentials\n" * 3000)
    image = build_daemon_image(src, tmp_path / "img", version=6)
    repo = "nydus/renew"
    for blob in Path(image.blob_dir).iterdir():
        registry_htpasswd.push_blob(repo, blob.read_bytes())
    backend = registry_htpasswd.backend_config(repo, auth=basic_auth("nydus", "wrong-password"),
                                               retry_limit=0)
    cfg = json.dumps({"device": {"backend": {"type": "registry", "config": backend},
                                 "cache": {"type": ""}}, "mode": "direct"})
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sock = str(tmp_path / "api.sock")
    with Nydusd(["--mountpoint", str(mnt), "--apisock", sock], mnt, log_path=tmp_path / "log",
                apisock=sock):
        api = ApiClient(sock)
        assert api.mount("/snap1", image.bootstrap, cfg)[0] == 204
        with pytest.raises(OSError) as exc:
            (mnt / "snap1" / "hello").read_bytes()
        assert exc.value.errno == 5
        status, _ = api.request("PUT", "/api/v1/config", {"registry_auth": basic_auth()}, id="/snap1")
        assert status == 204
        assert (mnt / "snap1" / "hello").read_bytes() == (src / "hello").read_bytes()
        assert api.request("GET", "/api/v1/config", id="/snap1") == (200, {"registry_auth": basic_auth()})
        assert api.request("GET", "/api/v1/config")[1] == {"/snap1:registry_auth": basic_auth()}
        assert api.request("PUT", "/api/v1/config", {"nonsense": "x"}, id="/snap1")[0] == 500
        # a new mount under a stored id starts with the renewed credentials
        assert api.request("PUT", "/api/v1/config", {"registry_auth": basic_auth()}, id="/snap2")[0] == 204
        assert api.mount("/snap2", image.bootstrap, cfg)[0] == 204
        assert (mnt / "snap2" / "hello").read_bytes() == (src / "hello").read_bytes()
