"""`nydusify optimize --workload`: run a command in a container on a lazily mounted nydus image and
record which files it reads, first read first -- the prefetch list for ``Optimizer``.

Owns: ``RuncContainer`` (a thin runner of the ``runc`` binary: a bundle whose rootfs is overlayfs
over a read-only lower directory, ``runc run`` with a timeout, ``runc delete --force`` and the
overlay unmounted however it ends) and ``record_workload`` (pull the bootstrap of a nydus image,
start a nydusd child with ``access_pattern`` on and prefetch off, run the workload over its mount,
read ``GET /api/v1/metrics/pattern`` and turn it into paths with ``paths_in_access_order``).

A workload that exits non-zero is an error (nothing is pushed: a failing command rarely reads what
the real one does); one still running after the timeout is killed and the reads it made until then
are the list (how a server's start-up is recorded).

Needs root (overlayfs, runc), /dev/fuse and the ``runc`` binary. Must not import fs/daemon/api:
nydusd is a child process (``mount.NydusdProcess``). Single-threaded.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nydusd.converter.mount import MountOptions, NydusdProcess, api_get, nydusd_config
from nydusd.converter.optimize import paths_in_access_order, source_bootstrap
from nydusd.converter.publish import extract_bootstrap
from nydusd.converter.remote import Remote
from nydusd.errors import InvalidArgument, NotFound, NydusError
from nydusd.log import get_logger
from nydusd.rafs import load_bootstrap

log = get_logger(__name__)

CONTAINER_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root")


class WorkloadFailed(NydusError):
    """The recorded command exited non-zero (or could not be started by runc)."""


@dataclass
class ContainerResult:
    exit_code: int | None          # None: killed at the timeout
    stdout: str
    stderr: str
    seconds: float


@dataclass
class RuncContainer:
    """One ``runc run`` of ``args`` on overlayfs over ``lower``; state and layers under ``work``."""

    lower: Path
    work: Path
    args: list[str]
    runc: str = "runc"
    env: tuple[str, ...] = CONTAINER_ENV
    name: str = field(default_factory=lambda: f"nydusify-optimize-{os.getpid()}")

    def run(self, timeout: float) -> ContainerResult:
        if shutil.which(shlex.split(self.runc)[0]) is None:
            raise NotFound("runc is not installed (needed to run the workload)", command=self.runc)
        upper, ovl, merged, bundle = (self.work / d for d in ("upper", "ovl-work", "merged", "bundle"))
        for d in (upper, ovl, merged, bundle):
            d.mkdir(parents=True, exist_ok=True)
        mount = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                                f"lowerdir={self.lower},upperdir={upper},workdir={ovl}", str(merged)],
                               capture_output=True, text=True, check=False)
        if mount.returncode != 0:
            raise WorkloadFailed(f"cannot mount the container's overlayfs: {mount.stderr.strip()}")
        runc = [*shlex.split(self.runc), "--root", str(self.work / "runc-state")]
        try:
            self._write_spec(bundle, merged)
            t0 = time.monotonic()
            try:
                proc = subprocess.run([*runc, "run", "--bundle", str(bundle), self.name],
                                      stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                      timeout=timeout, check=False)
                return ContainerResult(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0)
            except subprocess.TimeoutExpired as e:
                return ContainerResult(None, _text(e.stdout), _text(e.stderr), time.monotonic() - t0)
        finally:
            subprocess.run([*runc, "delete", "--force", self.name], capture_output=True, check=False)
            if subprocess.run(["umount", str(merged)], capture_output=True, check=False).returncode:
                subprocess.run(["umount", "-l", str(merged)], capture_output=True, check=False)

    def _write_spec(self, bundle: Path, rootfs: Path) -> None:
        spec_run = subprocess.run([*shlex.split(self.runc), "spec"], cwd=bundle, capture_output=True,
                                  text=True, check=False)
        if spec_run.returncode != 0:
            raise WorkloadFailed(f"runc spec failed: {spec_run.stderr.strip()}")
        spec: dict[str, Any] = json.loads((bundle / "config.json").read_text())
        spec["root"] = {"path": str(rootfs), "readonly": False}
        spec["process"]["terminal"] = False
        spec["process"]["args"] = self.args
        spec["process"]["env"] = list(self.env)
        (bundle / "config.json").write_text(json.dumps(spec))


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")


@dataclass(frozen=True)
class WorkloadOptions:
    command: str                     # one command line, split like a shell would (no shell runs)
    work_dir: Path
    timeout: float = 300.0
    nydusd: str = "nydusd"
    runc: str = "runc"
    backend_type: str | None = None  # the source's blobs are there (nydusify --source-backend-*)
    backend_config: str = ""
    ready_timeout: float = 30.0


@dataclass
class Recording:
    paths: list[str]                 # regular files, first read first
    exit_code: int | None            # None: stopped at the timeout
    seconds: float
    stdout: str


def workload_args(command: str) -> list[str]:
    try:
        args = shlex.split(command)
    except ValueError as e:
        raise InvalidArgument(f"cannot parse the workload command: {e}", field="workload") from None
    if not args:
        raise InvalidArgument("the workload command is empty", field="workload")
    return args


def record_workload(source: Remote, opts: WorkloadOptions) -> Recording:
    """Run ``opts.command`` in a container on ``source`` (a nydus image) mounted lazily by a nydusd
    child that records reads; returns the files read. Raises WorkloadFailed, NotReady, NotFound,
    Unsupported (not a nydus image)."""
    args = workload_args(opts.command)
    created = not opts.work_dir.exists()
    work = opts.work_dir / "workload"
    shutil.rmtree(work, ignore_errors=True)
    (work / "mnt").mkdir(parents=True)
    _, _, layer = source_bootstrap(source)
    bootstrap = work / "image.boot"
    bootstrap.write_bytes(extract_bootstrap(layer))
    config = nydusd_config(source, MountOptions(prefetch=False, backend_type=opts.backend_type,
                                                backend_config=opts.backend_config), work / "cache")
    config["access_pattern"] = True
    config.pop("fs_prefetch", None)
    cfg_path = work / "nydusd.json"
    cfg_path.touch(mode=0o600)  # it may carry registry credentials
    cfg_path.write_text(json.dumps(config))
    apisock = work / "api.sock"
    mnt = (work / "mnt").resolve()
    daemon = NydusdProcess(opts.nydusd, cfg_path, bootstrap, mnt, apisock, work / "nydusd.log")
    try:
        daemon.start(opts.ready_timeout)
        result = RuncContainer(mnt, work / "container", args, runc=opts.runc).run(opts.timeout)
        if result.exit_code is not None and result.exit_code != 0:
            raise WorkloadFailed(f"the workload exited with status {result.exit_code}",
                                 command=opts.command, stderr=result.stderr.strip()[-1000:])
        if result.exit_code is None:
            log.warning("workload_timed_out", command=opts.command, timeout_s=opts.timeout)
        pattern = _get_json(str(apisock), "/api/v1/metrics/pattern")
    finally:
        daemon.stop(mnt)
    with load_bootstrap(bootstrap) as sb:
        paths = paths_in_access_order(sb, pattern if isinstance(pattern, list) else [])
    log.info("workload_recorded", command=opts.command, files=len(paths), exit_code=result.exit_code,
             seconds=round(result.seconds, 3))
    # kept after a failure (the nydusd log is there); nothing of it is needed once recorded
    if not _has_mounts_under(work):
        shutil.rmtree(work, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                opts.work_dir.rmdir()   # only if empty
    return Recording(paths, result.exit_code, result.seconds, result.stdout)


def _has_mounts_under(path: Path) -> bool:
    prefix = os.path.realpath(path) + "/"
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4].startswith(prefix) for line in f)
    except OSError:
        return True


def _get_json(apisock: str, path: str) -> Any:
    try:
        status, body = api_get(apisock, path, timeout=10)
        if status != 200:
            raise WorkloadFailed(f"nydusd answered {status} to GET {path}", body=body[:500].decode(
                errors="replace"))
        return json.loads(body)
    except (OSError, ValueError, http.client.HTTPException) as e:
        raise WorkloadFailed(f"cannot read the access pattern from nydusd: {e}") from None
