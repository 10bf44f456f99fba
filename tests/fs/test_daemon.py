"""Daemon in-process: state machine, mount table, metrics, and mount/umount cycles without leaks.

The FUSE session is not started here (tests/integration does that); the Daemon's API surface is
exactly what api/ calls."""

from __future__ import annotations

import json
import os
import threading

import pytest

from nydusd.config import ConfigV2
from nydusd.daemon.instance import RafsInstance
from nydusd.daemon.service import INIT, STOPPED, Daemon, UnexpectedEvent
from nydusd.errors import (
    AlreadyExists,
    ConfigError,
    CorruptMetadata,
    InvalidArgument,
    NotFound,
    NydusError,
    Unsupported,
)
from nydusd.fs.attrs import ROOT_INO
from nydusd.fs.rafs_fs import RafsFs
from nydusd.metrics import FsIoStats
from nydusd.version import version_info, version_text
from tests.harness.fakes.image import SAMPLE, FakeDevice, FakeSuper

CONFIG = json.dumps({"device": {"backend": {"type": "localfs", "config": {"dir": "/nonexistent"}}},
                     "mode": "direct", "iostats_files": True, "access_pattern": True,
                     "latest_read_files": True})


class FakeBackend:
    def __init__(self) -> None:
        self.closed = False
        self.auth = None

    def set_credentials(self, auth):
        self.auth = auth

    def metrics(self):
        return {"backend_type": "localfs", "read_count": 0}

    def close(self):
        self.closed = True


def fake_factory(mountpoint: str, source: str, cfg: ConfigV2, *, prefetch_files=None) -> RafsInstance:
    if source == "corrupt":
        raise CorruptMetadata("bad magic", source=source)
    sb = FakeSuper(SAMPLE)
    rafs = cfg.rafs
    stats = FsIoStats(mountpoint, files_account=rafs.iostats_files, access_pattern=rafs.access_pattern,
                      latest_read_files=rafs.latest_read_files)
    device = FakeDevice(sb)
    return RafsInstance(mountpoint, source, "rafs", cfg, RafsFs(sb, device), stats, FakeBackend(), None)


def read(daemon: Daemon, path: str) -> bytes:
    ino = ROOT_INO
    for name in path.strip("/").split("/"):
        ino = daemon.vfs.lookup(ino, name.encode()).ino
    fh = daemon.vfs.open(ino, os.O_RDONLY)
    try:
        return daemon.vfs.read(fh, 0, 1 << 20)
    finally:
        daemon.vfs.release(fh)


def test_version_text_matches_daemon_info():
    text = version_text()
    commit = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Git Commit:")]
    assert commit == [version_info()["git_commit"]]
    version_line = next(line for line in text.splitlines() if line.startswith("Version:"))
    assert version_line.split()[1] == version_info()["package_ver"]
    assert Daemon().info()["version"]["git_commit"] == commit[0]


def test_state_machine_rejects_unexpected_events():
    d = Daemon(instance_factory=fake_factory)
    assert d.state == INIT
    with pytest.raises(UnexpectedEvent) as exc:
        d.start()
    assert exc.value.http_status == 400
    d.exit()
    assert d.state == STOPPED
    with pytest.raises(UnexpectedEvent):
        d.exit()
    with pytest.raises(UnexpectedEvent):
        d.mount("/m", "boot", CONFIG)


def test_mount_umount_remount_and_info(logs):
    d = Daemon(instance_factory=fake_factory, id="abc", supervisor="/sup")
    d.mount("/pseudo_1", "boot1", CONFIG)
    d.mount("/a/b/c", "boot2", CONFIG)
    assert read(d, "pseudo_1/readme") == b"hello nydus\n"
    assert read(d, "a/b/c/etc/hosts") == b"127.0.0.1 localhost\n"
    info = d.info()
    assert info["id"] == "abc" and info["supervisor"] == "/sup" and info["state"] == INIT
    entry = info["backend_collection"]["/a/b/c"]
    assert entry["backend_type"] == "Rafs" and entry["mountpoint"] == "/a/b/c"
    assert entry["config"]["backend"]["type"] == "localfs"
    assert len(entry["mounted_time"].split()) == 3
    with pytest.raises(AlreadyExists):
        d.mount("/pseudo_1", "boot1", CONFIG)
    with pytest.raises(Unsupported):
        d.mount("/p", "x", CONFIG, fs_type="passthrough_fs")
    with pytest.raises(InvalidArgument):
        d.mount("/p", "x", CONFIG, fs_type="")
    with pytest.raises(ConfigError):
        d.mount("/p", "x", "{not json")
    with logs.expect("mount_failed"), pytest.raises(CorruptMetadata):
        d.mount("/p", "corrupt", CONFIG)
    assert "mount /p failed" in d.events()["errors"][-1]
    d.remount("/pseudo_1", "boot3", CONFIG)
    assert d.mounts()["/pseudo_1"]["mountpoint"] == "/pseudo_1"
    assert read(d, "pseudo_1/readme") == b"hello nydus\n"
    d.umount("/a/b/c")
    with pytest.raises(NotFound):
        d.umount("/a/b/c")
    with pytest.raises(NotFound):
        d.remount("/zzz", "boot", CONFIG)
    assert set(d.mounts()) == {"/pseudo_1"}


def test_metrics_by_mountpoint():
    d = Daemon(instance_factory=fake_factory)
    with pytest.raises(NotFound):
        d.metrics_fs()
    d.mount("/m1", "boot", CONFIG)
    assert read(d, "m1/readme") == b"hello nydus\n"
    fs = d.metrics_fs()  # exactly one mount: no id needed
    assert fs["id"] == "/m1" and fs["data_read"] == 12 and fs["files_account_enabled"] is True
    d.mount("/m2", "boot", CONFIG)
    with pytest.raises(NotFound):
        d.metrics_fs()
    assert d.metrics_fs("/m2")["data_read"] == 0
    files = d.metrics_files("/m1")
    assert any(v["data_read"] == 12 for v in files.values())
    assert len(d.metrics_files("/m1", latest=True)) == 1
    assert d.metrics_files("/m1", latest=True) == []  # read-and-clear
    assert d.metrics_pattern("/m1")[0]["nr_read"] == 1
    assert d.metrics_backend("/m1")["backend_type"] == "localfs"
    with pytest.raises(NotFound, match="no filesystem mounted here") as e:
        d.metrics_fs("/nope")
    assert e.value.context["mountpoint"] == "/nope"
    with pytest.raises(NotFound, match="no filesystem mounted here"):
        d.backend_info("/nope")  # the API shows this text (FsBackendInfo ... Other(...))
    with pytest.raises(NotFound, match="several filesystems mounted"):
        d.metrics_fs()
    assert d.metrics_inflight() == []


def test_unknown_mountpoint_messages_through_the_api():
    """Metrics routes keep upstream's ``Metrics(Stats(NoCounter))`` (callers match on it);
    /daemon/backend names what is missing."""
    from fastapi.testclient import TestClient

    from api.app import create_app

    d = Daemon(instance_factory=fake_factory)
    d.mount("/m1", "boot", CONFIG)
    client = TestClient(create_app(d))
    r = client.get("/api/v1/metrics", params={"id": "/nope"})
    assert r.status_code == 404 and r.json()["message"] == "GlobalMetrics(Metrics(Stats(NoCounter)))"
    r = client.get("/api/v1/daemon/backend", params={"mountpoint": "/nope"})
    assert r.status_code == 500
    assert "no filesystem mounted here" in r.json()["message"]
    assert "NoCounter" not in r.json()["message"]


def test_set_config_validates_log_level():
    seen = []
    d = Daemon(set_log_level=seen.append)
    d.set_config({"log_level": "DEBUG"})
    assert seen == ["debug"]
    with pytest.raises(ConfigError):
        d.set_config({"log_level": "loud"})


def test_three_hundred_mount_cycles_leak_nothing(tmp_path):
    """Real instances (bootstrap, localfs backend, blobcache files) mounted and unmounted 300 times."""
    from tests.harness.images import build_daemon_image, sample_tree

    src = sample_tree(tmp_path / "src", big=False)
    image = build_daemon_image(src, tmp_path / "img", version=5)
    config = image.config_text(tmp_path / "cache")
    d = Daemon()
    d.mount("/warm", image.bootstrap, config)
    read(d, "warm/small.txt")
    d.umount("/warm")
    fds = len(os.listdir("/proc/self/fd"))
    threads = threading.active_count()
    for i in range(300):
        mp = f"/snap{i % 7}"
        d.mount(mp, image.bootstrap, config)
        assert read(d, mp.strip("/") + "/small.txt") == (src / "small.txt").read_bytes()
        d.umount(mp)
    assert d.mounts() == {}
    assert len(os.listdir("/proc/self/fd")) <= fds
    assert threading.active_count() <= threads
    assert d.vfs.open_handles() == 0
    d.mount("/again", image.bootstrap, config)  # slots are reused past the 255-index space
    assert read(d, "again/small.txt") == (src / "small.txt").read_bytes()
    d.close_instances()


def test_read_failures_reach_the_events_ring(logs):
    d = Daemon(instance_factory=fake_factory)
    d.mount("/m", "boot", CONFIG)
    inst = d.instance("/m")
    inst.fs.device.broken.update(inst.fs.sb.data)
    with logs.expect("read_failed"), pytest.raises(NydusError):
        read(d, "m/readme")
    events = d.events()
    assert events["total_errors"] == 1 and "read of inode" in events["errors"][0]
    assert events["errors"][0].split(" - ")[0].endswith("GMT")


def test_runtime_config_store_and_registry_auth():
    d = Daemon(instance_factory=fake_factory)
    d.mount("/a", "boot", CONFIG)
    d.mount("/b", "boot", CONFIG)
    assert d.get_config() == {} and d.get_config("/a") == {}
    d.update_config("/a", {"registry_auth": "dXNlcjpwYXNz", "proxy_url": "http://127.0.0.1:1"})
    assert d.instance("/a").backend.auth == "dXNlcjpwYXNz"
    assert d.instance("/b").backend.auth is None
    assert d.get_config("/a") == {"registry_auth": "dXNlcjpwYXNz", "proxy_url": "http://127.0.0.1:1"}
    assert d.get_config()["/a:proxy_url"] == "http://127.0.0.1:1"
    with pytest.raises(NydusError) as exc:
        d.update_config("/a", {"bogus": "x"})
    assert exc.value.http_status == 500
    d.update_config("/c", {"registry_auth": "bmV3OnBhc3M="})
    d.mount("/c", "boot", CONFIG)
    assert d.instance("/c").backend.auth == "bmV3OnBhc3M="


def test_unvalidated_data_is_warned_once_per_process(logs) -> None:  # type: ignore[no-untyped-def]
    """Without ``digest_validate``/``cache.validate`` nothing checks chunk digests: the daemon says
    so once (at the first such mount), not per mount and not when validation is on."""
    validated = json.dumps({**json.loads(CONFIG), "digest_validate": True})
    d = Daemon(instance_factory=fake_factory)
    d.mount("/checked", "img", validated)
    assert logs.count("chunk_digests_unvalidated") == 0
    d.mount("/a", "img", CONFIG)
    d.mount("/b", "img", CONFIG)
    d.remount("/b", "img", CONFIG)
    events = [e for e in logs.events("warning") if e["event"] == "chunk_digests_unvalidated"]
    assert len(events) == 1 and events[0]["mountpoint"] == "/a"
    d.close_instances()


@pytest.mark.parametrize("files", [["etc/passwd"], ["/a/../../etc"], ["/ok", ".."], ["/a\0b"]])
def test_prefetch_files_must_be_absolute_without_dotdot(files) -> None:  # type: ignore[no-untyped-def]
    d = Daemon(instance_factory=fake_factory)
    with pytest.raises(InvalidArgument, match="prefetch_files"):
        d.mount("/m", "img", CONFIG, prefetch_files=files)
    assert d.mounts() == {}
    d.mount("/m", "img", CONFIG, prefetch_files=["/", "/bin/./x", "/a..b"])
    d.close_instances()
