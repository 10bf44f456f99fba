"""Run nydusd as a subprocess for real-mount tests: wait for the mount (and API socket), and always
unmount and kill in the end (pyfuse3 test/util.py style)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


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
