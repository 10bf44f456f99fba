"""The API against a real ``python -m nydusd`` over its unix socket with a real FUSE mount: mounts in
both body forms, remount, nested mountpoints, refusals with upstream's messages, reads through each
mount and metrics that move with them (spec interfaces.md §3, §8)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.client import ApiClient, ApiError
from api.schemas import BackendMetrics, BlobcacheMetrics, DaemonInfo, FsIoStats
from tests.harness.daemon import LiveDaemon, snapshotter_config
from tests.harness.images import build_image, make_files

pytestmark = pytest.mark.fuse

FILES1 = {"a.txt": b"hello from image one\n", "dir/big.bin": os.urandom(300_000) + b"end",
          "dir/sub/c.txt": b"deep"}
FILES2 = {"a.txt": b"image two says hi\n", "only2.txt": b"2"}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("images")
    blobs = root / "blobs"
    return {"one": build_image(make_files(root / "src1", FILES1), blobs, bootstrap_name="one.boot").bootstrap,
            "two": build_image(make_files(root / "src2", FILES2), blobs, bootstrap_name="two.boot").bootstrap,
            "blobs": blobs}


@pytest.fixture
def config(images: dict[str, Path], tmp_path: Path) -> str:
    cache = tmp_path / "cache"
    cache.mkdir()
    return json.dumps(snapshotter_config(images["blobs"], cache))


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveDaemon]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sock = tmp_path / "api.sock"
    d = LiveDaemon(tmp_path, ["--apisock", str(sock), "--mountpoint", str(mnt), "--log-level", "info"],
                   mnt, sock)
    try:
        yield d.start()
    finally:
        d.stop()


def read_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        assert (root / rel).read_bytes() == data, rel


def test_mount_read_umount_upstream_form(live: LiveDaemon, images: dict[str, Path], config: str) -> None:
    with live.client() as c:
        c.mount("/img1", str(images["one"]), config)
        read_tree(live.mountpoint / "img1", FILES1)
        info = DaemonInfo.model_validate(c.info())
        assert info.state == "RUNNING" and set(info.backend_collection or {}) == {"/img1"}
        c.umount("/img1")
        assert not (live.mountpoint / "img1").exists()
        assert c.info()["backend_collection"] == {}


def test_seed_form_with_config_file(live: LiveDaemon, images: dict[str, Path], config: str,
                                    tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(config)
    with live.client() as c:
        c.call("PUT", "/api/v1/mount", {"source": str(images["one"]), "fstype": "rafs",
                                        "mountpoint": "/foo/bar", "config": str(cfg)})
        read_tree(live.mountpoint / "foo" / "bar", FILES1)
        c.umount("/foo/bar")
        assert not (live.mountpoint / "foo" / "bar").exists()


def test_remount_swaps_the_image(live: LiveDaemon, images: dict[str, Path], config: str) -> None:
    with live.client() as c:
        c.mount("/r", str(images["one"]), config)
        assert (live.mountpoint / "r" / "a.txt").read_bytes() == FILES1["a.txt"]
        c.remount("/r", str(images["two"]), config)
        read_tree(live.mountpoint / "r", FILES2)
        assert not (live.mountpoint / "r" / "dir").exists()
        c.umount("/r")


def test_nested_mountpoints(live: LiveDaemon, images: dict[str, Path], config: str) -> None:
    with live.client() as c:
        c.mount("/n/a/b/c", str(images["one"]), config)
        c.mount("/n/a/b/d", str(images["two"]), config)
        # stat-able right after the POST returns (the snapshotter stats the lower dir at once)
        assert (live.mountpoint / "n" / "a" / "b" / "c").is_dir()
        read_tree(live.mountpoint / "n/a/b/c", FILES1)
        read_tree(live.mountpoint / "n/a/b/d", FILES2)
        c.remount("/n/a/b/c", str(images["two"]), config)
        assert (live.mountpoint / "n/a/b/c/only2.txt").is_file()
        c.umount("/n/a/b/c")
        read_tree(live.mountpoint / "n/a/b/d", FILES2)
        c.umount("/n/a/b/d")


def test_second_mount_at_same_path_refused(live: LiveDaemon, images: dict[str, Path], config: str) -> None:
    with live.client() as c:
        c.mount("/dup", str(images["one"]), config)
        with pytest.raises(ApiError) as e:
            c.mount("/dup", str(images["two"]), config)
        assert e.value.status == 500
        assert e.value.api_message.startswith(
            'Mount(MountFilesystem(Other("object or filesystem already exists')
        # the first mount is untouched
        read_tree(live.mountpoint / "dup", FILES1)
        with pytest.raises(ApiError) as e:
            c.umount("/never")
        assert e.value.status == 500 and "doesn't exist" in e.value.api_message


def test_bad_requests_against_the_real_daemon(live: LiveDaemon, images: dict[str, Path], config: str,
                                              tmp_path: Path) -> None:
    with live.client() as c:
        with pytest.raises(ApiError) as e:
            c.mount("/x", str(tmp_path / "missing.boot"), config)
        assert e.value.status == 500 and "missing.boot" in e.value.api_message
        junk = tmp_path / "junk.boot"
        junk.write_bytes(os.urandom(8192))
        with pytest.raises(ApiError) as e:
            c.mount("/x", str(junk), config)
        assert e.value.status == 500 and e.value.api_code == "CORRUPT_METADATA", e.value.api_message
        with pytest.raises(ApiError) as e:
            c.mount("/x", str(images["one"]), '{"device": {"backend": {"type": "nope"}}}')
        assert e.value.status == 500 and "invalid configuration" in e.value.api_message
        with pytest.raises(ApiError) as e:
            c.mount("/x", str(images["one"]), config, fs_type="passthrough_fs")
        assert e.value.status == 501
        status, _, body = c.request("POST", "/api/v1/mount", {"source": "/a"}, {"mountpoint": "/x"})
        assert status == 400 and json.loads(body)["message"] == 'ParseBody(Error("missing field `config`"))'
        with pytest.raises(ApiError) as e:
            c.call("PUT", "/api/v1/daemon/start")
        assert e.value.status == 400
        assert e.value.api_message == 'Configure(DaemonAbnormal(UnexpectedEvent("Start")))'
        assert c.info()["backend_collection"] == {}


def prometheus(c: ApiClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, headers, body = c.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}


def test_metrics_move_with_reads(live: LiveDaemon, images: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir()
    # no background prefetch: the backend must be read because of our read, not before it
    config = json.dumps(snapshotter_config(images["blobs"], tmp_path / "cache", prefetch=False))
    with live.client() as c:
        c.mount("/m", str(images["one"]), config)
        c.mount("/other", str(images["two"]), config)
        before = FsIoStats.model_validate(c.metrics(id="/m"))
        backend_before = BackendMetrics.model_validate(c.metrics("backend", id="/m"))
        prom_before = prometheus(c)
        data = (live.mountpoint / "m" / "dir" / "big.bin").read_bytes()
        assert data == FILES1["dir/big.bin"]
        after = FsIoStats.model_validate(c.metrics(id="/m"))
        assert after.id == "/m"
        assert after.data_read - before.data_read == len(data)
        assert after.fop_hits[4] > before.fop_hits[4]  # READ
        assert after.fop_hits[2] > before.fop_hits[2]  # OPEN
        backend_after = BackendMetrics.model_validate(c.metrics("backend", id="/m"))
        assert backend_after.read_count > backend_before.read_count
        assert backend_after.read_amount_total > backend_before.read_amount_total
        other = FsIoStats.model_validate(c.metrics(id="/other"))
        assert other.data_read == 0
        files = c.metrics("files", id="/m")
        assert any(v["data_read"] == len(data) for v in files.values())
        assert c.metrics("pattern", id="/m")
        prom = prometheus(c)
        key = ("nydusd_fs_read_bytes_total", (("mountpoint", "/m"),))
        assert prom[key] - prom_before[key] == len(data)
        assert prom[("nydusd_fs_read_bytes_total", (("mountpoint", "/other"),))] == 0
        assert prom[("nydusd_mounts", ())] == 2
        assert prom[("nydusd_backend_reads_total", (("mountpoint", "/m"),))] == backend_after.read_count
        assert prom[("nydusd_blobcache_reads_total", (("mountpoint", "/m"),))] > 0
        assert prom[("nydusd_daemon_state", (("state", "RUNNING"),))] == 1
        with pytest.raises(ApiError) as e:
            c.metrics(id="/nope")
        assert e.value.status == 404 and e.value.api_message == "GlobalMetrics(Metrics(Stats(NoCounter)))"
        cache = BlobcacheMetrics.model_validate(c.metrics("blobcache", id="/m"))
        assert cache.total > 0
        status, _, body = c.request("GET", "/api/v1/metrics/inflight")
        assert status == 204 and body == b""


@pytest.mark.slow
def test_many_mount_umount_cycles(live: LiveDaemon, images: dict[str, Path], config: str) -> None:
    # upstream MUST: survive >= 300 mount/umount cycles (vfs slot reuse), paths stat-able each time
    with live.client() as c:
        for i in range(300):
            mp = f"/cycle{i % 7}"
            c.mount(mp, str(images["two"]), config)
            assert (live.mountpoint / mp.lstrip("/") / "only2.txt").read_bytes() == b"2"
            c.umount(mp)
        assert c.info()["backend_collection"] == {}
