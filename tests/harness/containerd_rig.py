"""containerd 1.6 + the real nydus-snapshotter (v0.6.1) driving our nydusd, for tests and benchmarks.

Owns:
- ``build_snapshotter()``: ``containerd-nydus-grpc`` and ``nydus-rpull`` built by the snapshotter
  rig's ``build.sh`` into ``~/.cache/nydus-py/nydus-snapshotter`` (its stamp makes a re-run a no-op).
- ``AccessLogRegistry``: docker-registry on 127.0.0.1 with its access log on, to count the blob bytes
  really fetched; optionally inside a network namespace (the shaped link of the benchmark).
- ``busybox_image()``: a small 3-layer OCI image (busybox-static, a text file, 8 MiB of random data
  no container reads), pushed with skopeo and converted with our ``nydusify convert``.
- ``SnapshotterRig``: a private mount namespace with a tmpfs on ``/run`` (containerd 1.6 hard-codes
  shim and FIFO paths under ``/run/containerd``), the snapshotter with its default settings and
  our nydusd (no wrapper), containerd with the snapshotter as a proxy plugin, all state under one
  directory, every process stopped by PID.

The snapshotter ``config.toml`` written here is the one docs/containerd.md describes. v0.6.1 lets
its command-line flags (with their defaults) override ``root``, ``address``, ``daemon_mode``,
``nydusd_config``, ``fs_driver`` and the log level of the file, so they are passed as flags too,
and it looks ``nydusd`` and ``nydus-image`` up in ``PATH`` even when their paths are configured.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.harness.servers.base import free_port

ROOT = Path(__file__).resolve().parents[2]
RIG_DIR = ROOT.parent / "shared" / "rigs" / "nydus-snapshotter"
CACHE_DIR = (Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
             / "nydus-py" / "nydus-snapshotter")
VENV_BIN = ROOT / ".venv" / "bin"
SYS_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

#: the nydusd config template for the snapshotter: on-demand fetching only (no prefetch_all, which
#: competes with the container's own reads), plain-HTTP test registry.
NYDUSD_TEMPLATE: dict[str, Any] = {
    "device": {
        "backend": {"type": "registry",
                    "config": {"timeout": 5, "connect_timeout": 5, "retry_limit": 2, "scheme": "http"}},
        "cache": {"type": "blobcache"},
    },
    "mode": "direct",
    "digest_validate": False,
    "iostats_files": False,
    "enable_xattr": True,
    "fs_prefetch": {"enable": False, "prefetch_all": False, "threads_count": 8, "merging_size": 1048576},
}

SNAPSHOTTER_TOML = """\
version = 1
root = "{root}"
address = "{address}"
daemon_mode = "{mode}"
cleanup_on_close = false

[system]
enable = true
address = "{system_address}"

[daemon]
nydusd_path = "{nydusd}"
nydusimage_path = "{nydus_image}"
fs_driver = "fusedev"
recover_policy = "{recover_policy}"
nydusd_config = "{nydusd_config}"
threads_number = 4

[log]
log_to_stdout = false
dir = "{log_dir}"
level = "{log_level}"
log_rotation_compress = true
log_rotation_local_time = true
log_rotation_max_age = 7
log_rotation_max_backups = 5
log_rotation_max_size = 1

[metrics]
address = "{metrics_address}"

[remote]
convert_vpc_registry = false

[remote.mirrors_config]
dir = ""

[remote.auth]
enable_kubeconfig_keychain = false
kubeconfig_path = ""
enable_cri_keychain = false
image_service_address = ""

[snapshot]
enable_nydus_overlayfs = false
sync_remove = false

[cache_manager]
disable = false
gc_period = "24h"
cache_dir = "{cache_dir}"

[image]
public_key_file = ""
validate_signature = false

[experimental]
enable_stargz = false
"""

CONTAINERD_TOML = """\
version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{d}/containerd.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[proxy_plugins.nydus]
  type = "snapshot"
  address = "{d}/nydus.sock"
"""


# ----------------------------------------------------------------------------------- prerequisites
def missing_tools() -> str | None:
    """Why the rig cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "needs root (mount namespaces, FUSE, containerd)"
    if not RIG_DIR.is_dir():
        return f"the nydus-snapshotter rig is absent ({RIG_DIR})"
    for tool, pkg in (("containerd", "containerd"), ("ctr", "containerd"), ("runc", "runc"),
                      ("docker-registry", "docker-registry"), ("skopeo", "skopeo"), ("umoci", "umoci"),
                      ("unshare", "util-linux"), ("nsenter", "util-linux")):
        if shutil.which(tool, path=SYS_PATH) is None:
            return f"{tool} not installed (Debian package {pkg}; run scripts/setup.sh)"
    if not Path("/usr/bin/busybox").exists():
        return "busybox not installed (Debian package busybox-static; run scripts/setup.sh)"
    if not (VENV_BIN / "nydusd").exists():
        return "no .venv/bin/nydusd (run make setup)"
    return None


def build_snapshotter(out: Path = CACHE_DIR) -> Path:
    """Build (or find up to date) the snapshotter binaries; returns the directory holding them."""
    res = subprocess.run([str(RIG_DIR / "build.sh"), str(out)], capture_output=True, text=True,
                         check=False, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"nydus-snapshotter build failed:\n{res.stderr[-3000:]}")
    return out


def stop_pid(pid: int | None, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    """Signal one process we started; SIGKILL it after ``timeout``; reap it if it is our child."""
    if not pid:
        return
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def pids_with_arg(prefix: str) -> list[int]:
    """PIDs whose command line has an argument starting with ``prefix`` (our state dir)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if any(a.startswith(prefix.encode()) for a in args):
            out.append(int(entry))
    return out


# -------------------------------------------------------------------------------------- registry
class AccessLogRegistry:
    """docker-registry on 127.0.0.1:PORT with the access log on (inside ``netns`` if given)."""

    def __init__(self, root: Path, netns: str | None = None, port: int | None = None) -> None:
        self.root = root
        self.netns = netns
        self.port = port or free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.log_path = root / "registry.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns] if self.netns else []

    def start(self) -> AccessLogRegistry:
        self.root.mkdir(parents=True, exist_ok=True)
        cfg = self.root / "registry.yml"
        cfg.write_text("\n".join([
            "version: 0.1", "log:", "  level: info", "  accesslog:", "    disabled: false",
            "storage:", "  filesystem:", f"    rootdirectory: {self.root / 'data'}",
            "  delete:", "    enabled: true", "http:", f"  addr: {self.host}",
            "  secret: nydus-py-test"]) + "\n")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([*self.prefix(), "docker-registry", "serve", str(cfg)],
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            probe = subprocess.run([*self.prefix(), "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                    f"http://{self.host}/v2/"], capture_output=True, text=True, check=False)
            if probe.stdout == "200":
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("docker-registry did not start:\n" + self.log_path.read_text()[-2000:])

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            self.proc = None

    def mark(self) -> int:
        """A position in the access log; ``blob_gets(mark)`` counts what came after it."""
        return self.log_path.stat().st_size

    def blob_gets(self, since: int = 0, digests: set[str] | None = None) -> tuple[int, int]:
        """(GET requests, bytes written) of ``/blobs/`` since ``since`` (only ``digests`` if given)."""
        time.sleep(0.05)  # the registry writes its log line after the response
        with open(self.log_path, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        count = total = 0
        for line in text.splitlines():
            if 'msg="response completed"' not in line or "http.request.method=GET" not in line:
                continue
            uri = re.search(r'http\.request\.uri="([^"]+)"', line)
            written = re.search(r"http\.response\.written=(\d+)", line)
            if not uri or not written or "/blobs/" not in uri.group(1):
                continue
            if digests is not None and uri.group(1).rsplit(":", 1)[-1] not in digests:
                continue
            count += 1
            total += int(written.group(1))
        return count, total


# ----------------------------------------------------------------------------------------- image
def _tool_env(tmp: Path) -> dict[str, str]:
    home = tmp / "home"
    (home / "run").mkdir(parents=True, exist_ok=True)
    return {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home), "XDG_CACHE_HOME": str(home),
            "XDG_RUNTIME_DIR": str(home / "run"), "TMPDIR": str(home / "run"), "PATH": SYS_PATH}


def _run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return res.stdout


GREETING = b"hello from a lazily pulled nydus image\n"
BIG_SIZE = 8 << 20


def busybox_image(tmp: Path, registry: AccessLogRegistry, repo: str = "test/busybox",
                  big_size: int = BIG_SIZE) -> dict[str, Any]:
    """Build the 3-layer OCI image, push it as ``repo:v1``, convert it to ``repo:v1-nydus``.

    Layers: 1. busybox-static as /bin/busybox + /bin/sh, /bin/cat, /bin/sleep, /bin/sha256sum;
    2. /etc/greeting (``GREETING``); 3. /data/unused.bin (``big_size`` random bytes, never read).
    Returns the references and the digests + sizes of the nydus image's data blobs."""
    env = _tool_env(tmp)
    layout, bundle = tmp / "oci", tmp / "bundle"
    _run(["umoci", "init", "--layout", str(layout)], env)
    _run(["umoci", "new", "--image", f"{layout}:v1"], env)
    _run(["umoci", "unpack", "--image", f"{layout}:v1", str(bundle)], env)
    rootfs = bundle / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy2("/usr/bin/busybox", rootfs / "bin" / "busybox")
    for applet in ("sh", "cat", "sleep", "sha256sum", "ls"):
        os.symlink("busybox", rootfs / "bin" / applet)
    _run(["umoci", "repack", "--refresh-bundle", "--image", f"{layout}:v1", str(bundle)], env)
    (rootfs / "etc").mkdir()
    (rootfs / "etc" / "greeting").write_bytes(GREETING)
    _run(["umoci", "repack", "--refresh-bundle", "--image", f"{layout}:v1", str(bundle)], env)
    (rootfs / "data").mkdir()
    (rootfs / "data" / "unused.bin").write_bytes(random.Random(18).randbytes(big_size))
    _run(["umoci", "repack", "--refresh-bundle", "--image", f"{layout}:v1", str(bundle)], env)
    _run(["umoci", "config", "--image", f"{layout}:v1", "--config.cmd", "/bin/sh"], env)
    shutil.rmtree(bundle)
    src, dst = f"{registry.host}/{repo}:v1", f"{registry.host}/{repo}:v1-nydus"
    _run([*registry.prefix(), "skopeo", "--tmpdir", str(tmp / "home" / "run"), "copy",
          "--dest-tls-verify=false", f"oci:{layout}:v1", f"docker://{src}"], env)
    _run([*registry.prefix(), str(VENV_BIN / "nydusify"), "convert", "--source", src, "--target", dst,
          "--source-insecure", "--target-insecure", "--progress", "never"],
         {**os.environ, "HOME": env["HOME"]})
    manifest = json.loads(_run([*registry.prefix(), "curl", "-sf", "-H",
                                "Accept: application/vnd.oci.image.manifest.v1+json, "
                                "application/vnd.docker.distribution.manifest.v2+json",
                                f"http://{registry.host}/v2/{repo}/manifests/v1-nydus"]))
    data_blobs = {layer["digest"].split(":", 1)[1]: int(layer["size"]) for layer in manifest["layers"]
                  if layer.get("annotations", {}).get("containerd.io/snapshot/nydus-blob") == "true"}
    source = json.loads(_run([*registry.prefix(), "curl", "-sf", "-H",
                              "Accept: application/vnd.oci.image.manifest.v1+json",
                              f"http://{registry.host}/v2/{repo}/manifests/v1"]))
    return {"oci": src, "nydus": dst, "data_blobs": data_blobs,
            "oci_layer_bytes": sum(int(layer["size"]) for layer in source["layers"])}


# ------------------------------------------------------------------------------------------- rig
class SnapshotterRig:
    """containerd + nydus-snapshotter (daemon mode ``mode``) in a private mount namespace."""

    def __init__(self, work: Path, bin_dir: Path, *, mode: str = "multiple",
                 recover_policy: str = "restart", namespace: str = "nydus-py",
                 netns: str | None = None, log_level: str = "info", zygote: bool = False) -> None:
        self.work = work
        self.bin_dir = bin_dir
        self.mode = mode
        self.recover_policy = recover_policy
        self.namespace = namespace
        self.netns = netns
        self.log_level = log_level
        self.d = work / "d"
        self.root = self.d / "nydus"
        self.csock = self.d / "containerd.sock"
        self.ssock = self.d / "nydus.sock"
        self.metrics_address = f"127.0.0.1:{free_port()}"
        self.holder: subprocess.Popen[bytes] | None = None
        self.snapshotter: subprocess.Popen[bytes] | None = None
        self.containerd: subprocess.Popen[bytes] | None = None
        #: with ``zygote``: a ``nydusd-zygote`` in the namespace, named to the snapshotter (and so
        #: to every nydusd it starts) by ``NYDUSD_ZYGOTE``
        self.zygote_sock = self.d / "zygote.sock" if zygote else None
        self.zygote: subprocess.Popen[bytes] | None = None

    # -- namespace --------------------------------------------------------------------------------
    def _enter(self) -> list[str]:
        assert self.holder is not None
        return ["nsenter", "-m", *(["-n"] if self.netns else []), "-t", str(self.holder.pid), "--"]

    def nsx(self, *cmd: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the namespace(s); raises with its output when it fails and ``check``."""
        res = subprocess.run([*self._enter(), *cmd], capture_output=True, text=True, timeout=timeout,
                             check=False, env={**os.environ, "PATH": SYS_PATH})
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-2000:]}\n"
                               f"{res.stderr[-3000:]}\n--- snapshotter log:\n"
                               + self.snapshotter_log()[-3000:])
        return res

    def ctr(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.nsx("ctr", "-a", str(self.csock), "-n", self.namespace, *args, timeout=timeout,
                        check=check)

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> SnapshotterRig:
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "logs").mkdir(exist_ok=True)
        # nsenter --net, not `ip netns exec`: that one remounts /sys, hiding the cgroup mount runc needs
        prefix = ["nsenter", f"--net=/run/netns/{self.netns}"] if self.netns else []
        self.holder = subprocess.Popen(
            [*prefix, "unshare", "-m", "--propagation", "private", "sh", "-c",
             "mount -t tmpfs nydus-py-run /run && exec sleep infinity"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        deadline = time.monotonic() + 10
        while "nydus-py-run" not in self.nsx("cat", "/proc/self/mounts", check=False).stdout:
            if time.monotonic() > deadline or self.holder.poll() is not None:
                raise RuntimeError("the mount namespace holder did not come up")
            time.sleep(0.05)
        self.d.mkdir(parents=True, exist_ok=True)
        (self.work / "nydusd-config.json").write_text(json.dumps(NYDUSD_TEMPLATE, indent=2))
        (self.work / "snapshotter.toml").write_text(SNAPSHOTTER_TOML.format(
            root=self.root, address=self.ssock, mode=self.mode, system_address=self.d / "system.sock",
            nydusd=VENV_BIN / "nydusd", nydus_image=VENV_BIN / "nydus-image",
            recover_policy=self.recover_policy, nydusd_config=self.work / "nydusd-config.json",
            log_dir=self.root / "logs", log_level=self.log_level,
            metrics_address=self.metrics_address, cache_dir=self.root / "cache"))
        (self.work / "containerd.toml").write_text(CONTAINERD_TOML.format(d=self.d))
        if self.zygote_sock is not None:
            self.zygote = self._spawn([str(VENV_BIN / "nydusd-zygote"), "--socket", str(self.zygote_sock)],
                                      "zygote.out")
            deadline = time.monotonic() + 30
            while "zygote_ready" not in self._tail("zygote.out"):
                if time.monotonic() > deadline or self.zygote.poll() is not None:
                    raise RuntimeError("the zygote did not come up:\n" + self._tail("zygote.out"))
                time.sleep(0.05)
        self.start_snapshotter()
        self.containerd = self._spawn(["containerd", "--config", str(self.work / "containerd.toml"),
                                       "--log-level", "info"], "containerd.out")
        deadline = time.monotonic() + 30
        while self.ctr("version", check=False).returncode != 0:
            if time.monotonic() > deadline or self.containerd.poll() is not None:
                raise RuntimeError("containerd did not come up:\n" + self._tail("containerd.out"))
            time.sleep(0.1)
        return self

    def _spawn(self, cmd: list[str], out: str, path: str = SYS_PATH,
               env: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
        with open(self.work / "logs" / out, "ab") as f:
            # nsenter, env and the daemon all exec: the Popen pid is the daemon's own
            return subprocess.Popen([*self._enter(), "env", f"PATH={path}", *env, *cmd],
                                    stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def start_snapshotter(self) -> None:
        """Start (or restart) the snapshotter on the same root; waits for its socket."""
        with contextlib.suppress(FileNotFoundError):
            self.ssock.unlink()
        self.snapshotter = self._spawn(
            [str(self.bin_dir / "containerd-nydus-grpc"), "--config", str(self.work / "snapshotter.toml"),
             "--root", str(self.root), "--address", str(self.ssock), "--daemon-mode", self.mode,
             "--fs-driver", "fusedev", "--log-level", self.log_level,
             "--nydusd-config", str(self.work / "nydusd-config.json"),
             "--nydusd", str(VENV_BIN / "nydusd"), "--nydus-image", str(VENV_BIN / "nydus-image")],
            "snapshotter.out", path=f"{VENV_BIN}:{SYS_PATH}",
            env=(f"NYDUSD_ZYGOTE={self.zygote_sock}",) if self.zygote_sock is not None else ())
        deadline = time.monotonic() + 30
        while not self.ssock.exists():
            if time.monotonic() > deadline or self.snapshotter.poll() is not None:
                raise RuntimeError("the snapshotter did not come up:\n" + self._tail("snapshotter.out")
                                   + self.snapshotter_log()[-3000:])
            time.sleep(0.05)

    def stop_snapshotter(self) -> None:
        """SIGINT: the snapshotter exits and (cleanup_on_close = false) leaves its nydusd running."""
        if self.snapshotter is not None:
            stop_pid(self.snapshotter.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.snapshotter.wait(5)
            self.snapshotter = None

    def close(self) -> None:
        """Stop containers, containerd, the snapshotter, its nydusd and shims (by PID), unmount, wipe."""
        if self.holder is None:
            return
        try:
            if self.containerd is not None and self.containerd.poll() is None:
                for c in self.ctr("containers", "ls", "-q", check=False).stdout.split():
                    self.ctr("tasks", "kill", "-s", "KILL", c, check=False, timeout=20)
                    time.sleep(0.2)
                    self.ctr("tasks", "rm", "-f", c, check=False, timeout=20)
                    self.ctr("containers", "rm", c, check=False, timeout=20)
            if self.containerd is not None:
                stop_pid(self.containerd.pid)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.containerd.wait(5)
            self.stop_snapshotter()
            for pid in pids_with_arg(str(self.d)):  # nydusd, shims, the zygote: all pointing into our state
                stop_pid(pid)
            if self.zygote is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.zygote.wait(5)  # reaped (stopped just above)
            self.nsx("sh", "-c", f"awk '$2 ~ \"^{self.d}/\" {{print $2}}' /proc/self/mounts | sort -r | "
                     "while read -r m; do umount -l \"$m\"; done", check=False)
            self.nsx("rm", "-rf", "--one-file-system", str(self.d), check=False)
        finally:
            stop_pid(self.holder.pid)
            self.holder.wait(5)
            self.holder = None

    def __enter__(self) -> SnapshotterRig:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- observation ------------------------------------------------------------------------------
    def _tail(self, name: str) -> str:
        try:
            return (self.work / "logs" / name).read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def snapshotter_log(self) -> str:
        try:
            return (self.root / "logs" / "nydus-snapshotter.log").read_text(errors="replace")
        except OSError:
            return ""

    def api_socks(self) -> list[Path]:
        return sorted((self.root / "socket").glob("*/api.sock"))

    def nydusd_pids(self) -> list[int]:
        """Live nydusd processes of this rig (by their --apisock in our state dir)."""
        return [p for p in pids_with_arg(str(self.root / "socket")) if _alive(p)]

    def api(self, sock: Path, path: str, method: str = "GET") -> Any:
        """One request to a nydusd API socket (HTTP/1.1, JSON reply or None)."""
        import http.client

        class Conn(http.client.HTTPConnection):
            def connect(self) -> None:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(10)
                try:
                    s.connect(str(sock))
                except OSError:
                    s.close()
                    raise
                self.sock = s

        conn = Conn("localhost", timeout=10)
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            raw = resp.read()
            if resp.status >= 300:
                raise RuntimeError(f"{method} {path}: {resp.status} {raw[:300]!r}")
            return json.loads(raw) if raw else None
        finally:
            conn.close()

    def backend_bytes(self) -> int:
        """Sum of ``read_amount_total`` of every nydusd (``GET /api/v1/metrics/backend``)."""
        total = 0
        for sock in self.api_socks():
            info = self.api(sock, "/api/v1/daemon")
            for mountpoint in info.get("backend_collection") or {}:
                q = "" if self.mode == "multiple" else f"?id={mountpoint}"
                total += int(self.api(sock, "/api/v1/metrics/backend" + q)["read_amount_total"])
        return total

    def wait_for(self, cond: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n--- snapshotter log:\n"
                                     + self.snapshotter_log()[-4000:])
            time.sleep(0.1)

    # -- images and containers --------------------------------------------------------------------
    def rpull(self, ref: str) -> None:
        self.nsx(str(self.bin_dir / "nydus-rpull"), "-a", str(self.csock), "-n", self.namespace,
                 "-plain-http", ref)

    def pull_overlayfs(self, ref: str) -> None:
        self.ctr("images", "pull", "--plain-http", ref, timeout=300)

    def run(self, ref: str, name: str, *cmd: str, snapshotter: str = "nydus") -> str:
        """``ctr run --rm``: the container's output."""
        return self.ctr("run", "--snapshotter", snapshotter, "--rm", ref, name, *cmd).stdout

    def run_detached(self, ref: str, name: str, *cmd: str) -> None:
        self.ctr("run", "-d", "--snapshotter", "nydus", ref, name, *cmd)

    def kill_container(self, name: str) -> None:
        self.ctr("tasks", "kill", "-s", "KILL", name, check=False)
        deadline = time.monotonic() + 10
        while self.ctr("tasks", "rm", name, check=False).returncode != 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        self.ctr("containers", "rm", name)


@contextlib.contextmanager
def netns(name: str) -> Iterator[str]:
    """A fresh network namespace with ``lo`` up; deleted afterwards."""
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True,
                       capture_output=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)


def shape_loopback(name: str | None, spec: str) -> None:
    """``tc qdisc add dev lo root SPEC`` on the loopback of network namespace ``name`` (never the
    host's own loopback); ``None``: this process's own namespace, for a caller already inside one
    made by ``netns``."""
    enter = ["ip", "netns", "exec", name] if name is not None else []
    subprocess.run([*enter, "tc", "qdisc", "add", "dev", "lo", "root", *spec.split()], check=True,
                   capture_output=True)
