"""Credentials never leave the daemon: a Dragonfly proxy URL with ``user:password@`` is used (a real
tinyproxy demands that Basic auth) but never shown -- not in any API answer, not in any log line, not
in the events ring -- and the blob cache is private to the daemon's user."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import yaml

from tests.harness.apiclient import ApiClient, _UnixConnection
from tests.harness.daemon import Nydusd
from tests.harness.images import build_daemon_image
from tests.harness.servers.tinyproxy import TinyProxy

pytestmark = pytest.mark.fuse

SECRET = "pr0xy-s3cret"
ROOT = Path(__file__).resolve().parent.parent.parent


def _get_paths() -> list[str]:
    spec = yaml.safe_load((ROOT / "openapi.yaml").read_text())
    return [path for path, ops in spec["paths"].items() if "get" in ops]


def _raw_get(sock: str, path: str) -> tuple[int, str]:
    conn = _UnixConnection(sock)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


def _every_get_answer(sock: str, mountpoints: list[str]) -> dict[str, str]:
    """The raw body of every GET route of the contract, plain and for each mountpoint/id."""
    out: dict[str, str] = {}
    for path in _get_paths():
        for query in ["", *(f"?id={mp}" for mp in mountpoints), *(f"?mountpoint={mp}" for mp in mountpoints)]:
            status, body = _raw_get(sock, path + query)
            out[f"{path}{query} -> {status}"] = body
    return out


def test_proxy_credentials_are_used_but_never_shown(tmp_path, registry_server):
    if shutil.which("tinyproxy") is None:
        pytest.skip("tinyproxy is not installed (apt install tinyproxy)")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a", "b", "c"):
        (src / name).write_bytes(os.urandom(200_000))
    image = build_daemon_image(src, tmp_path / "img", version=6, chunk_size=0x10000)
    repo = "nydus/secrets"
    for blob in Path(image.blob_dir).iterdir():
        registry_server.push_blob(repo, blob.read_bytes())
    proxy = TinyProxy(tmp_path / "tinyproxy", basic_auth=("nydus", SECRET))
    purl = f"http://nydus:{SECRET}@127.0.0.1:{proxy.port}"

    def config(fallback: bool, cache: str) -> str:
        backend = registry_server.backend_config(repo, retry_limit=0, proxy={
            "url": purl, "fallback": fallback, "check_interval": 1})
        return json.dumps({"device": {"backend": {"type": "registry", "config": backend},
                                      "cache": {"type": "blobcache", "config": {"work_dir": cache}}},
                           "mode": "direct"})

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sock = str(tmp_path / "api.sock")
    log_path = tmp_path / "log"
    cache = tmp_path / "cache" / "work"
    try:
        with Nydusd(["--mountpoint", str(mnt), "--apisock", sock, "--log-level", "debug"], mnt,
                    log_path=log_path, apisock=sock):
            api = ApiClient(sock)
            assert api.mount("/fallback", image.bootstrap, config(True, str(cache)))[0] == 204
            assert api.mount("/strict", image.bootstrap, config(False, str(tmp_path / "c2")))[0] == 204
            # the credentials work: tinyproxy (BasicAuth) passed the request on
            assert (mnt / "fallback" / "a").read_bytes() == (src / "a").read_bytes()
            assert proxy.requests_seen("/blobs/") >= 1
            proxy.kill()
            # proxy down: the fallback mount reads from the origin, the strict one fails (EIO)
            assert (mnt / "fallback" / "b").read_bytes() == (src / "b").read_bytes()
            with pytest.raises(OSError) as exc:
                (mnt / "strict" / "c").read_bytes()
            assert exc.value.errno == 5
            assert api.request("PUT", "/api/v1/config", {"proxy_url": purl}, id="/fallback")[0] == 204

            answers = _every_get_answer(sock, ["/fallback", "/strict"])
            leaks = [k for k, body in answers.items() if SECRET in body]
            assert not leaks, leaks
            info = answers["/api/v1/daemon -> 200"]
            assert f"nydus:***@127.0.0.1:{proxy.port}" in info  # the URL is shown, masked
            events = api.request("GET", "/api/v1/daemon/events")[1]
            assert any("nydus:***@" in e for e in events["errors"]), events

            # the cache: directory 0700 (created by the daemon), files 0600
            assert stat.S_IMODE(cache.stat().st_mode) == 0o700
            files = list(cache.iterdir())
            assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files), files
    finally:
        proxy.stop()
    text = log_path.read_text(errors="replace")
    assert "proxy_marked_down" in text and "proxy_request_fell_back" in text
    assert SECRET not in text
    # two mounts without digest validation: the daemon said so once (issue 14, item 6)
    assert text.count('"chunk_digests_unvalidated"') == 1
