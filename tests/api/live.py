"""Live-daemon helpers for the API tests: snapshotter-style configs, and ``python -m nydusd`` run as
a subprocess whose API socket is waited for as the snapshotter does (socket file <=10 s, then state
RUNNING <=2 s, spec interfaces.md §4.2). Teardown always SIGTERMs/kills the process by PID and
lazily unmounts what is left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from api.client import ApiClient

ROOT = Path(__file__).resolve().parents[2]


def snapshotter_config(blob_dir: Path, cache_dir: Path, snapshot_id: str | None = None,
                       prefetch: bool = True) -> dict[str, Any]:
    """The v1 config nydus-snapshotter generates (spec §4.8, Go struct order), with a localfs backend
    instead of a registry and every key it emits, including those nydusd ignores. ``prefetch=False``
    turns the default template's background prefetch off (deterministic backend counters)."""
    return {
        "device": {
            "id": f"/{snapshot_id}" if snapshot_id else "",
            "backend": {"type": "localfs", "config": {
                "readahead": False, "dir": str(blob_dir), "readahead_sec": 0,
                "proxy": {"url": "", "fallback": True, "ping_url": "", "check_interval": 5,
                          "use_http": False},
                "timeout": 5, "connect_timeout": 5, "retry_limit": 2}},
            "cache": {"type": "blobcache", "compressed": False,
                      "config": {"work_dir": str(cache_dir), "disable_indexed_map": False}},
        },
        "mode": "direct", "digest_validate": False, "iostats_files": True, "enable_xattr": True,
        "access_pattern": True, "latest_read_files": True, "amplify_io": 1048576,
        "fs_prefetch": {"enable": prefetch, "prefetch_all": True, "threads_count": 8, "merging_size": 1048576,
                        "bandwidth_rate": 0, "stream_prefetch": False},
        "warmup": 0, "id_mapping": [0, 0, 0],
    }


class LiveDaemon:
    """``python -m nydusd ARGS`` with its log in ``work/nydusd.log``."""

    def __init__(self, work: Path, args: list[str], mountpoint: Path, sock: Path) -> None:
        self.work = work
        self.args = args
        self.mountpoint = mountpoint
        self.sock = sock
        self.log_path = work / "nydusd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        #: the state reported by the very first request once the socket appeared
        self.first_state: str | None = None

    def start(self, socket_timeout: float = 10.0, running_timeout: float = 2.0) -> LiveDaemon:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "nydusd", *self.args], stdout=log,
                                         stderr=subprocess.STDOUT, cwd=str(ROOT),
                                         env={**os.environ, "PYTHONPATH": str(ROOT)})
        self._wait(self.sock.exists, socket_timeout, "the API socket")
        deadline = time.monotonic() + running_timeout
        with ApiClient(str(self.sock)) as c:
            self.first_state = c.info()["state"]
            while c.info()["state"] != "RUNNING":
                assert time.monotonic() < deadline, "daemon not RUNNING within 2 s:\n" + self.log()
                time.sleep(0.1)
        return self

    def _wait(self, cond: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"nydusd exited ({self.proc.returncode}) before {what}:\n{self.log()}")
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.log()}"
            time.sleep(0.02)

    def client(self) -> ApiClient:
        return ApiClient(str(self.sock), timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def wait_exit(self, timeout: float = 10.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """SIGTERM (graceful, unmounts), then SIGKILL; lazily unmount whatever is left."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if is_mounted(self.mountpoint):
            subprocess.run(["fusermount", "-u", "-z", str(self.mountpoint)], check=False, capture_output=True)


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f if len(line.split()) > 2)
