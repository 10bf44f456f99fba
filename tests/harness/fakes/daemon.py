"""FakeDaemon: an in-process stand-in for nydusd.daemon.service.Daemon with the contract's methods
(notes/contracts.md), for the TestClient tier of the API tests (design R14 tier 2).

It keeps a real state machine (INIT->READY->RUNNING->STOPPED, illegal events raise with
``event=``), a mount table with upstream's errors (AlreadyExists, NotFound), parses mount configs
with the real ``nydusd.config.load_config`` and keeps real ``nydusd.metrics`` counters per mount, so
``read()`` moves the same counters a FUSE read would.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from nydusd.config import load_config
from nydusd.errors import AlreadyExists, InvalidArgument, NotFound, NotReady, Unsupported
from nydusd.log import level_number
from nydusd.metrics import BackendMetrics, BlobcacheMetrics, FsIoStats, StatsFop

VERSION = {"package_ver": "0.1.0", "git_commit": "abc123", "build_time": "2026-11-28T00:00:00Z",
           "profile": "release", "rustc": "python3.11"}
TRANSITIONS = {("INIT", "Mount"): "READY", ("READY", "Start"): "RUNNING", ("RUNNING", "Stop"): "READY",
               ("READY", "Exit"): "STOPPED", ("INIT", "Stop"): "STOPPED"}


class FakeMount:
    def __init__(self, mountpoint: str, source: str, config: dict[str, Any], fs_type: str) -> None:
        self.mountpoint = mountpoint
        self.source = source
        self.config = config
        self.fs_type = fs_type
        self.mounted_time = time.strftime("%Y-%m-%d %H:%M:%S.000000 +00:00:00", time.gmtime())
        rafs = config.get("rafs") or {}
        self.fs = FsIoStats(mountpoint, files_account=rafs.get("iostats_files", False),
                            access_pattern=rafs.get("access_pattern", False),
                            latest_read_files=rafs.get("latest_read_files", False))
        self.backend = BackendMetrics(config["backend"]["type"] if config.get("backend") else "localfs",
                                      mountpoint)
        self.cache = BlobcacheMetrics(config.get("id") or mountpoint, "/tmp/cache")


class FakeDaemon:
    def __init__(self, state: str = "RUNNING") -> None:
        self._state = state
        self._lock = threading.Lock()
        self._mounts: dict[str, FakeMount] = {}
        self.log_level = "info"
        self.exited = False
        self.inflight: list[dict[str, Any]] = []
        self.calls: list[tuple[Any, ...]] = []

    # -- state machine -------------------------------------------------------------------------
    @property
    def state(self) -> str:
        return self._state

    def _event(self, event: str) -> None:
        new = TRANSITIONS.get((self._state, event))
        if new is None:
            raise InvalidArgument(f"unexpected event {event} in state {self._state}", event=event,
                                  state=self._state)
        self._state = new

    def start(self) -> None:
        self.calls.append(("start",))
        self._event("Start")

    def exit(self) -> None:
        self.calls.append(("exit",))
        if self._state == "RUNNING":
            self._event("Stop")
        self._event("Exit")
        self.exited = True

    def set_config(self, conf: dict[str, Any]) -> None:
        level = conf.get("log_level", "")
        level_number(level)  # raises ConfigError for a bad level
        self.log_level = level.lower()

    # -- info ----------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        with self._lock:
            mounts = dict(self._mounts)
        return {"version": VERSION, "id": None, "supervisor": None, "state": self._state,
                "backend_collection": {mp: {"backend_type": "Rafs", "mountpoint": mp,
                                            "mounted_time": m.mounted_time, "config": m.config}
                                       for mp, m in mounts.items()}}

    def events(self) -> dict[str, Any]:
        return {"max_errors": 500, "total_errors": 0, "max_size": 51200, "total_size": 0, "errors": []}

    def backend_info(self, mountpoint: str) -> dict[str, Any]:
        self._get(mountpoint)
        return {"magic": 0x52414653, "version": 0x500, "sb_size": 8192, "root_inode": 1,
                "chunk_size": 1 << 20, "inodes_count": 3, "flags": "HASH_BLAKE3 | COMPRESSION_ZSTD"}

    # -- mounts --------------------------------------------------------------------------------
    def mount(self, mountpoint: str, source: str, config: str, *, fs_type: str = "rafs",
              prefetch_files: list[str] | None = None) -> None:
        self.calls.append(("mount", mountpoint, source, config, fs_type, prefetch_files))
        if fs_type != "rafs":
            raise Unsupported(f"filesystem type {fs_type}")
        if self._state == "STOPPED":
            raise NotReady("daemon stopped")
        cfg = load_config(config).model_dump(mode="json")
        if not os.path.isfile(source):
            raise NotFound("bootstrap not found", path=source)
        with self._lock:
            if mountpoint in self._mounts:
                raise AlreadyExists("already mounted", mountpoint=mountpoint)
            self._mounts[mountpoint] = FakeMount(mountpoint, source, cfg, fs_type)

    def remount(self, mountpoint: str, source: str, config: str, *, fs_type: str = "rafs",
                prefetch_files: list[str] | None = None) -> None:
        self.calls.append(("remount", mountpoint, source, config, fs_type, prefetch_files))
        self._get(mountpoint)
        cfg = load_config(config).model_dump(mode="json")
        if not os.path.isfile(source):
            raise NotFound("bootstrap not found", path=source)
        with self._lock:
            self._mounts[mountpoint] = FakeMount(mountpoint, source, cfg, fs_type)

    def umount(self, mountpoint: str) -> None:
        self.calls.append(("umount", mountpoint))
        with self._lock:
            if self._mounts.pop(mountpoint, None) is None:
                raise NotFound("not mounted", mountpoint=mountpoint)

    def mounts(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {mp: {"source": m.source, "fs_type": m.fs_type, "config": m.config}
                    for mp, m in self._mounts.items()}

    def _get(self, mountpoint: str | None) -> FakeMount:
        with self._lock:
            if mountpoint is None:
                if len(self._mounts) != 1:
                    raise NotFound("no id given and not exactly one filesystem")
                return next(iter(self._mounts.values()))
            for m in self._mounts.values():
                if mountpoint in (m.mountpoint, m.config.get("id")):
                    return m
        raise NotFound("no such filesystem", id=mountpoint)

    # -- simulated I/O -------------------------------------------------------------------------
    def read(self, mountpoint: str, ino: int, size: int) -> None:
        m = self._get(mountpoint)
        m.fs.file_opened(ino)
        m.fs.fop_done(StatsFop.READ, ino=ino, size=size, latency_us=50)
        m.backend.record_read(size, 0.002)
        m.cache.record_read(1, 0)

    # -- metrics -------------------------------------------------------------------------------
    def metrics_fs(self, id: str | None) -> dict[str, Any]:
        return self._get(id).fs.snapshot()

    def metrics_files(self, id: str | None, latest: bool = False) -> Any:
        fs = self._get(id).fs
        return fs.take_latest_read_files() if latest else fs.files_snapshot()

    def metrics_pattern(self, id: str | None) -> list[dict[str, Any]]:
        return self._get(id).fs.pattern_snapshot()

    def metrics_backend(self, id: str | None) -> dict[str, Any]:
        return self._get(id).backend.snapshot()

    def metrics_blobcache(self, id: str | None) -> dict[str, Any]:
        return self._get(id).cache.snapshot()

    def metrics_inflight(self) -> list[dict[str, Any]]:
        return list(self.inflight)

    # a daemon without a supervisor or runtime configuration answers these as unsupported
    def sendfd(self) -> None:
        raise Unsupported("hot upgrade (sendfd to a supervisor) is not supported by this daemon")

    def takeover(self) -> None:
        raise Unsupported("hot upgrade (takeover from a supervisor) is not supported by this daemon")

    def get_config(self, id: str | None) -> dict[str, str]:
        raise Unsupported("runtime configuration (/api/v1/config) is not supported by this daemon")

    def update_config(self, id: str, values: dict[str, Any]) -> None:
        raise Unsupported("runtime configuration (/api/v1/config) is not supported by this daemon")


class ConfigurableFakeDaemon(FakeDaemon):
    """A FakeDaemon that also has the optional runtime-config methods behind ``/api/v1/config``."""

    KEYS = ("registry_auth", "proxy_url", "dragonfly_scheduler_endpoint")

    def __init__(self) -> None:
        super().__init__()
        self.runtime: dict[str, dict[str, str]] = {}

    def get_config(self, id: str | None) -> dict[str, str]:
        if id is not None:
            return dict(self.runtime.get(id, {}))
        return {f"{i}:{k}": v for i, kv in self.runtime.items() for k, v in kv.items()}

    def update_config(self, id: str, values: dict[str, str]) -> None:
        from nydusd.errors import ConfigError

        for key in values:
            if key not in self.KEYS:
                raise ConfigError(f"unknown runtime config key {key}", field=key)
        self.runtime.setdefault(id, {}).update(values)
