"""``nydusify mount``: serve a nydus image from a registry through a nydusd FUSE mount.

Owns: ``MountOptions``, ``nydusd_config`` (the v1 JSON config nydusify hands nydusd: registry
backend with the image's host/repo/scheme and docker-config credentials -- or the backend given on
the command line --, blobcache under the work dir, direct mode, xattrs on, fs_prefetch), ``NydusdProcess``
(spawn, wait for ``GET /api/v1/daemon`` state RUNNING over the API unix socket, stop by PID) and
``mount_image`` (pull the bootstrap, start nydusd, block until SIGINT/SIGTERM or nydusd exits, then
stop nydusd, which unmounts). Must not import requests, fs, daemon or api: nydusd is a child
process. Threading: runs in the caller's (main) thread; signal handlers are installed only by
``mount_image`` and restored afterwards.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nydusd.converter import manifest as m
from nydusd.converter.publish import extract_bootstrap
from nydusd.converter.remote import Remote
from nydusd.errors import ConfigError, NotFound, NotReady, Unsupported
from nydusd.log import get_logger
from nydusd.oci import mediatypes as mtypes

log = get_logger(__name__)


@dataclass(frozen=True)
class MountOptions:
    mount_path: Path = Path("./image-fs")
    work_dir: Path = Path("./tmp")
    nydusd: str = "nydusd"
    platform: str | None = None
    prefetch: bool = False
    backend_type: str | None = None
    backend_config: str = ""
    ready_timeout: float = 30.0


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 5.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def api_get(apisock: str, path: str, timeout: float) -> tuple[int, bytes]:
    """``GET path`` on a nydusd API socket: ``(status, body)``. Raises OSError or
    http.client.HTTPException when the API does not answer."""
    conn = _UnixConnection(apisock, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def daemon_state(apisock: str) -> str | None:
    """``state`` of ``GET /api/v1/daemon``, or None when the API does not answer (yet)."""
    try:
        status, body = api_get(apisock, "/api/v1/daemon", timeout=2.0)
        if status != 200:
            return None
        return str(json.loads(body).get("state"))
    except (OSError, ValueError, http.client.HTTPException):
        return None


def nydusd_config(remote: Remote, opts: MountOptions, cache_dir: Path) -> dict[str, Any]:
    """The v1 config nydusify writes for nydusd (interfaces.md §6.6 shape)."""
    if opts.backend_type and opts.backend_type != "registry":
        try:
            backend_cfg = json.loads(opts.backend_config or "{}")
        except ValueError as e:
            raise ConfigError(f"backend config is not JSON: {e}", field="backend-config") from None
        backend = {"type": opts.backend_type, "config": backend_cfg}
    else:
        client = remote.client
        cfg: dict[str, Any] = {"scheme": client.scheme, "host": client.host, "repo": remote.ref.repo,
                               "skip_verify": client.http.skip_verify, "timeout": 30,
                               "connect_timeout": 10, "retry_limit": 2}
        if client.creds is not None:
            import base64

            cfg["auth"] = base64.b64encode(
                f"{client.creds.username}:{client.creds.password}".encode()).decode()
        backend = {"type": "registry", "config": cfg}
    return {
        "device": {"backend": backend,
                   "cache": {"type": "blobcache", "config": {"work_dir": str(cache_dir)}}},
        "mode": "direct", "digest_validate": False, "enable_xattr": True,
        "fs_prefetch": {"enable": opts.prefetch, "threads_count": 10, "merging_size": 131072,
                        "prefetch_all": opts.prefetch},
    }


def _nydus_manifest(remote: Remote, platform: str | None) -> m.Manifest:
    data, mt, _ = remote.get_manifest(remote.ref.reference)
    doc = m.parse_document(data, mt)
    if isinstance(doc, m.Index):
        want = m.parse_platform(platform) if platform else None
        for d in doc.manifests:
            if d.mediaType not in mtypes.MANIFEST_TYPES:
                continue
            if want is not None and (d.platform is None or not d.platform.matches(*want)):
                continue
            body, mt2, _ = remote.get_manifest(d.digest)
            mf = m.parse_document(body, mt2)
            if isinstance(mf, m.Manifest) and m.is_nydus_manifest(mf):
                return mf
        raise NotFound("no nydus manifest in the image index", image=str(remote.ref), platform=platform)
    if not m.is_nydus_manifest(doc):
        raise Unsupported("not a nydus image (the last layer is not a nydus bootstrap)",
                          image=str(remote.ref))
    return doc


class NydusdProcess:
    """A nydusd child serving one bootstrap at ``mountpoint``."""

    def __init__(self, command: str, config: Path, bootstrap: Path, mountpoint: Path, apisock: Path,
                 log_file: Path) -> None:
        self.argv = [*shlex.split(command), "--config", str(config), "--bootstrap", str(bootstrap),
                     "--mountpoint", str(mountpoint), "--apisock", str(apisock), "--log-level", "info",
                     "--log-file", str(log_file)]
        self.apisock = apisock
        self.log_file = log_file
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float) -> None:
        """Spawn and wait for RUNNING. Raises NotReady (with the log tail) if it never gets there."""
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
        except OSError as e:
            raise NotFound(f"cannot start nydusd: {e.strerror}", command=self.argv[0]) from None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if self.apisock.exists() and daemon_state(str(self.apisock)) == "RUNNING":
                return
            time.sleep(0.05)
        self.stop()
        raise NotReady("nydusd did not reach RUNNING", log=self._log_tail())

    def _log_tail(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-1500:]
        except OSError:
            return ""

    def wait(self, stop: threading.Event) -> None:
        while not stop.is_set() and self.proc is not None and self.proc.poll() is None:
            stop.wait(0.2)

    def stop(self, mountpoint: Path | None = None) -> None:
        """Unmount (as upstream's tooling does: ``umount`` then wait for the daemon to leave), then
        SIGTERM, then SIGKILL; a mount still left behind is detached lazily."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if mountpoint is not None and _is_mounted(mountpoint):
            subprocess.run(["fusermount", "-u", str(mountpoint)], check=False, capture_output=True)
            if self._wait(10):
                return
        self.proc.send_signal(signal.SIGTERM)
        if self._wait(10):
            return
        self.proc.kill()
        self.proc.wait()
        if mountpoint is not None and _is_mounted(mountpoint):
            log.warning("nydusd_killed", pid=self.proc.pid, log=self._log_tail()[-500:])
            subprocess.run(["fusermount", "-u", "-z", str(mountpoint)], check=False,
                           capture_output=True)
        else:
            log.info("nydusd_killed_after_unmount", pid=self.proc.pid)

    def _wait(self, timeout: float) -> bool:
        assert self.proc is not None
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False


def _is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    try:
        with open("/proc/self/mounts") as f:
            return any(line.split()[1] == target for line in f if len(line.split()) > 2)
    except OSError:
        return False


def prepare(remote: Remote, opts: MountOptions) -> tuple[Path, Path]:
    """Pull the bootstrap and write the nydusd config into the work dir; returns their paths."""
    manifest = _nydus_manifest(remote, opts.platform)
    layer = manifest.layers[-1]
    boot_dir = opts.work_dir / "nydus_bootstrap" / "image"
    boot_dir.mkdir(parents=True, exist_ok=True)
    bootstrap = boot_dir / "image.boot"
    bootstrap.write_bytes(extract_bootstrap(remote.get_blob_bytes(layer.digest, layer.size)))
    cache = opts.work_dir / "nydusd" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    config = opts.work_dir / "nydusd" / "config.json"
    config.write_text(json.dumps(nydusd_config(remote, opts, cache), indent=2))
    os.chmod(config, 0o600)  # it may carry registry credentials
    return bootstrap, config


def mount_image(remote: Remote, opts: MountOptions) -> int:
    """Mount until SIGINT/SIGTERM (or until nydusd exits); returns the exit status. The work dir
    (and the mount path) are removed afterwards when this call created them, however it ends."""
    created = [p for p in (opts.work_dir, opts.work_dir / "nydus_bootstrap", opts.work_dir / "nydusd",
                           opts.mount_path) if not p.exists()]
    try:
        return _serve(remote, opts)
    finally:
        _remove_created(created, opts.mount_path)


def _serve(remote: Remote, opts: MountOptions) -> int:
    bootstrap, config = prepare(remote, opts)
    opts.mount_path.mkdir(parents=True, exist_ok=True)
    apisock = opts.work_dir / "nydusd" / "api.sock"
    apisock.unlink(missing_ok=True)
    proc = NydusdProcess(opts.nydusd, config, bootstrap, opts.mount_path.resolve(), apisock,
                         opts.work_dir / "nydusd" / "nydusd.log")
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        proc.start(opts.ready_timeout)
        log.info("image_mounted", image=str(remote.ref), mountpoint=str(opts.mount_path),
                 apisock=str(apisock))
        print(f"mounted {remote.ref} at {opts.mount_path}\n"  # noqa: T201 - user-facing
              f"nydusd API socket: {apisock.resolve()} (e.g. nydusctl -S {apisock.resolve()} info)\n"
              "press Ctrl-C to unmount", flush=True)
        proc.wait(stop)
    finally:
        proc.stop(opts.mount_path)
        for s, handler in previous.items():
            signal.signal(s, handler)
    log.info("image_unmounted", mountpoint=str(opts.mount_path))
    return 0


def _remove_created(created: list[Path], mount_path: Path) -> None:
    """Remove what ``mount_image`` created: work-dir parts (bootstrap, cache, config, socket, log)
    and an empty mount path -- never a directory that is still a mount point."""
    for path in created:
        if path == mount_path:
            if not _is_mounted(path):
                with contextlib.suppress(OSError):
                    path.rmdir()
            continue
        shutil.rmtree(path, ignore_errors=True)
