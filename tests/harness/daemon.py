"""Run nydusd as a subprocess for real-mount tests and benchmarks: wait for the mount (and API socket),
and always unmount and kill in the end (pyfuse3 test/util.py style). The one home of ``is_mounted``.

``Nydusd`` waits for the FUSE mount; ``LiveDaemon`` is the same process waited for the way the
snapshotter does (socket file <=10 s, then state RUNNING <=2 s, spec interfaces.md §4.2), for the
tests that drive a daemon through its API; ``snapshotter_config`` is the config it sends."""

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


def is_mounted(path: str | Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[1].replace("\\040", " ") == target:
                return True
    return False


def mount_line(path: str | Path) -> list[str]:
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[1] == target:
                return fields
    return []


def force_unmount(path: str | Path) -> None:
    if is_mounted(path):
        subprocess.run(["fusermount", "-u", "-z", str(path)], check=False, capture_output=True)


class Nydusd:
    """``python -m nydusd ARGS`` (or another module) with its log in ``log_path``."""

    def __init__(self, args: list[str], mountpoint: str | Path, *, log_path: Path,
                 apisock: str | None = None, module: str = "nydusd",
                 env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.args = args
        self.cwd = cwd or ROOT
        self.mountpoint = str(mountpoint)
        self.apisock = apisock
        self.log_path = log_path
        self.module = module
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, wait_mount: bool = True, timeout: float = 15.0) -> Nydusd:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", self.module, *self.args], stdout=log,
                                         stderr=subprocess.STDOUT, env=self.env, cwd=str(self.cwd))
        finally:
            log.close()
        if wait_mount:
            self.wait(lambda: is_mounted(self.mountpoint), timeout, "the FUSE mount")
            if self.apisock:
                self.wait(lambda: os.path.exists(self.apisock), timeout, "the API socket")
        return self

    def wait(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"nydusd exited with {self.proc.returncode} before {what}:\n"
                                     + self.log())
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n" + self.log())
            time.sleep(0.02)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout: float = 10.0) -> int | None:
        """SIGTERM and wait; returns the exit code (None if it had to be killed)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        return self.proc.returncode

    def cleanup(self) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
        finally:
            force_unmount(self.mountpoint)

    def __enter__(self) -> Nydusd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        try:
            self.terminate()
        finally:
            self.cleanup()


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


class LiveDaemon(Nydusd):
    """``python -m nydusd ARGS`` with its log in ``work/nydusd.log``, started as the snapshotter does:
    the API socket first, then state RUNNING (the mount is made through the API, or not at all)."""

    def __init__(self, work: Path, args: list[str], mountpoint: Path, sock: Path) -> None:
        super().__init__(args, mountpoint, log_path=work / "nydusd.log", apisock=str(sock))
        self.work = work
        self.sock = sock
        self.mountpoint: Path = mountpoint  # type: ignore[assignment]  # a Path here, as the tests join it
        #: the state reported by the very first request once the socket appeared
        self.first_state: str | None = None

    def start(self, *, wait_mount: bool = False, timeout: float = 10.0,
              running_timeout: float = 2.0) -> LiveDaemon:
        super().start(wait_mount=wait_mount, timeout=timeout)
        self.wait(self.sock.exists, timeout, "the API socket")
        deadline = time.monotonic() + running_timeout
        with ApiClient(str(self.sock)) as c:
            self.first_state = c.info()["state"]
            while c.info()["state"] != "RUNNING":
                assert time.monotonic() < deadline, "daemon not RUNNING within 2 s:\n" + self.log()
                time.sleep(0.1)
        return self

    def client(self) -> ApiClient:
        return ApiClient(str(self.sock), timeout=30)

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
        try:
            self.terminate()
        finally:
            self.cleanup()
