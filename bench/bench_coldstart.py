"""Cold-start benchmark: how soon a container runs from an image in a registry behind a 100 Mbit/s
link -- full pull (skopeo copy + umoci unpack + runc) against lazy start through nydusd, measured in
alternating runs of the same session with the page cache dropped before each run.

Image: Debian bookworm ``debootstrap --variant=minbase`` + python3, three layers (base, +python3,
docs removed: whiteouts), built with umoci and converted with our nydusify. The root filesystems
are cached between runs under ``~/.cache/nydus-py/coldstart`` (outside the repository).

Link: registry, skopeo, nydusd, runc and this script's own timed part all run inside a fresh network
namespace whose ``lo`` is shaped with ``tbf rate 100mbit burst 256kb latency 50ms`` (the host's own
network is never touched); the script re-executes itself inside the namespace (nsenter --net).

Ways (each run: fresh blob cache, ``echo 3 > /proc/sys/vm/drop_caches``, then timed from the
first registry request to the container's exit; workload
``python3 -c 'import json,sys; print(sys.version)'`` on overlayfs):
- ``full pull``: skopeo copy docker:// -> oci:, umoci unpack, runc run on the unpacked rootfs;
- ``shared``: one nydusd already running (started outside the timed window); the bootstrap layer is
  fetched and the image mounted with ``PUT /api/v1/mount``;
- ``per-image``: the bootstrap layer is fetched, a new nydusd started with ``--bootstrap``, timed to
  its API answering RUNNING;
- ``per-image, zygote``: the same, with ``NYDUSD_ZYGOTE`` naming a ``nydusd-zygote`` started with the
  session (the new nydusd is served by a fork of it; see docs/containerd.md);
- ``shared, prefetch_all``: as shared, with ``fs_prefetch`` ``prefetch_all``;
- ``shared, replayed``: as shared, on the image rebuilt by ``nydusify optimize --access-pattern`` from
  a recorded run (its prefetch table = the files the workload read, first read first), with
  ``fs_prefetch`` on.

Bytes: blob bytes in the registry's access log, and the namespace's ``lo`` rx bytes. Medians over
``--rounds`` (the order of the ways reversed every other round); ratios against the full pull
measured in the same session; the load average is printed (the machine is shared).

Breakdown: for per-image, shared and replayed, every timestamp on one clock (wall time, since the
run started) -- the bench's own (bootstrap fetched, nydusd exec-ed, RUNNING seen, runc run started,
container exited) and the daemon's: its ``startup_phase`` log events (JSON timestamps, us), the first
read in the image (earliest ``first_access_time`` of ``/api/v1/metrics/pattern``; ``access_pattern``
is on in every run) and prefetch begin/end (``/api/v1/metrics/blobcache``).

``--study``: chunk size (``nydusify convert --chunk-size``, default 256K, 1M, 4M) x ``amplify_io``
(0, 1M, 4M) rows, shared daemon without prefetch: time to the container's exit, GETs, bytes
fetched against the chunks touched (what amplify_io 0 fetches at that chunk size) and against the
read files' whole chunk lists.

    .venv/bin/python bench/bench_coldstart.py [--rounds N] [--rate 100mbit] [--ways a,b] [--study]

Needs root, /dev/fuse, debootstrap, umoci, skopeo, runc, docker-registry, iproute2 (tc), network
access to the Debian mirror for the first build.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.harness.apiclient import ApiClient  # noqa: E402
from tests.harness.containerd_rig import AccessLogRegistry, netns, shape_loopback, stop_pid  # noqa: E402
from tests.harness.daemon import is_mounted  # noqa: E402
from tests.harness.oci_images import tool_env  # noqa: E402

CACHE = Path(os.environ.get("NYDUS_BENCH_CACHE", Path.home() / ".cache/nydus-py/coldstart"))
MIRROR = "http://deb.debian.org/debian"
TOOLS = ("debootstrap", "umoci", "skopeo", "runc", "docker-registry", "ip", "tc", "nsenter", "curl")
WORKLOAD = ["python3", "-c", "import json,sys; print(sys.version)"]
WAYS = ("full pull", "shared", "per-image", "per-image, zygote", "shared, prefetch_all",
        "shared, replayed")
SHORT = {"full": "full pull", "shared": "shared", "per-image": "per-image",
         "zygote": "per-image, zygote",
         "prefetch_all": "shared, prefetch_all", "replayed": "shared, replayed"}
PY = sys.executable


# ------------------------------------------------------------------------------------------ helpers
def sh(cmd: list[str], *, env: dict[str, str] | None = None, timeout: float = 900, **kw: Any) -> str:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def lo_rx() -> int:
    """Bytes received on ``lo`` of this process's network namespace (``/proc/net/dev`` is per
    namespace; ``/sys/class/net`` would show the namespace that mounted sysfs)."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            return int(counters.split()[0])
    raise RuntimeError("no lo in /proc/net/dev")


def api(sock: str, method: str, path: str, body: Any = None, timeout: float = 30) -> tuple[int, Any]:
    return ApiClient(sock, timeout).request(method, path, body)


def wait_for(cond: Any, timeout: float, what: str, step: float = 0.002) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(step)


def umount(path: Path) -> None:
    if is_mounted(path):
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


# ------------------------------------------------------------------------------------------ image
def build_rootfs() -> tuple[Path, Path]:
    """``(base, with python3)`` root filesystems, built once and cached."""
    CACHE.mkdir(parents=True, exist_ok=True)
    base, py = CACHE / "bookworm-minbase", CACHE / "bookworm-python3"
    if not (base / ".done").exists():
        shutil.rmtree(base, ignore_errors=True)
        print(f"building {base} (debootstrap, about a minute) ...", flush=True)
        sh(["debootstrap", "--variant=minbase", "bookworm", str(base), MIRROR], timeout=1800)
        (base / ".done").touch()
    if not (py / ".done").exists():
        shutil.rmtree(py, ignore_errors=True)
        print(f"building {py} (apt-get install python3) ...", flush=True)
        sh(["cp", "-a", str(base), str(py)])
        (py / ".done").unlink(missing_ok=True)
        with contextlib.ExitStack() as stack:
            for d in ("proc", "sys", "dev"):
                sh(["mount", "--bind", f"/{d}", str(py / d)])
                stack.callback(subprocess.run, ["umount", "-l", str(py / d)], check=False)
            shutil.copy("/etc/resolv.conf", py / "etc/resolv.conf")
            env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive"}
            sh(["chroot", str(py), "apt-get", "update"], env=env, timeout=1800)
            sh(["chroot", str(py), "apt-get", "install", "-y", "--no-install-recommends", "python3"],
               env=env, timeout=1800)
            sh(["chroot", str(py), "apt-get", "clean"], env=env)
        shutil.rmtree(py / "var/lib/apt/lists", ignore_errors=True)
        (py / "var/lib/apt/lists").mkdir()
        (py / ".done").touch()
    return base, py


def mirror(src: Path, dst: Path) -> None:
    """Make ``dst`` a copy of ``src`` (``cp -a``, then remove what ``src`` does not have)."""
    sh(["cp", "-a", f"{src}/.", f"{dst}/"])
    for dirpath, dirnames, filenames in os.walk(dst, topdown=False):
        rel = os.path.relpath(dirpath, dst)
        for name in filenames + dirnames:
            if not os.path.lexists(os.path.join(src, rel, name)):
                path = os.path.join(dirpath, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
    (dst / ".done").unlink(missing_ok=True)


def build_layout(tmp: Path, base: Path, py: Path) -> Path:
    """OCI layout ``tmp/oci:v1`` with three layers: base, +python3, docs removed."""
    env = tool_env(tmp)
    layout, bundle = tmp / "oci", tmp / "bundle"
    sh(["umoci", "init", "--layout", str(layout)], env=env)
    sh(["umoci", "new", "--image", f"{layout}:v1"], env=env)
    sh(["umoci", "unpack", "--image", f"{layout}:v1", str(bundle)], env=env)
    rootfs = bundle / "rootfs"
    mirror(base, rootfs)
    sh(["umoci", "repack", "--refresh-bundle", "--image", f"{layout}:v1", str(bundle)], env=env)
    mirror(py, rootfs)
    sh(["umoci", "repack", "--refresh-bundle", "--image", f"{layout}:v1", str(bundle)], env=env)
    for d in ("usr/share/doc", "usr/share/man", "usr/share/info"):
        shutil.rmtree(rootfs / d, ignore_errors=True)
    sh(["umoci", "repack", "--refresh-bundle", "--image", f"{layout}:v1", str(bundle)], env=env)
    shutil.rmtree(bundle)
    return layout


# ------------------------------------------------------------------------------------------ registry
# docker-registry with its access log read back: tests/harness/containerd_rig.py AccessLogRegistry
def startup_marks(log_path: Path) -> dict[str, float]:
    """The daemon's ``startup_phase`` events as wall-clock times (their log timestamps, UTC, us)."""
    from datetime import datetime

    out: dict[str, float] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        if '"startup_phase"' in line:
            ev = json.loads(line)
            stamp = datetime.fromisoformat(ev["timestamp"].replace("Z", "+00:00")).timestamp()
            out[f"daemon: {ev['phase']}"] = stamp
    return out


def daemon_marks(pattern: Any, cache_m: Any) -> dict[str, float]:
    """First read in the image (the access pattern's earliest first_access_time) and the prefetch
    begin/end (blobcache metrics), as wall-clock times; absent ones are left out."""
    out: dict[str, float] = {}
    firsts = [p["first_access_time_secs"] + p["first_access_time_nanos"] / 1e9 for p in pattern or []
              if p.get("first_access_time_secs")]
    if firsts:
        out["daemon: first read"] = min(firsts)
    cache_m = cache_m or {}
    for key, name in (("prefetch_begin", "daemon: prefetch began"),
                      ("prefetch_end", "daemon: prefetch ended")):
        secs = int(cache_m.get(f"{key}_time_secs", 0))
        if secs:
            out[name] = secs + int(cache_m.get(f"{key}_time_millis", 0)) / 1000
    return out


def files_read_bytes(boot: Path, pattern: Any) -> int:
    """Compressed size of every chunk of the files the access pattern says were read (distinct
    chunks): what fetching the read files whole would cost, an upper bound of the chunks touched."""
    from nydusd.rafs import load_bootstrap

    seen: set[tuple[int, int]] = set()
    total = 0
    with load_bootstrap(boot.read_bytes()) as sb:
        for p in pattern or []:
            for c in sb.chunks(int(p["ino"])):
                if (c.blob_index, c.compressed_offset) not in seen:
                    seen.add((c.blob_index, c.compressed_offset))
                    total += c.compressed_size
    return total


def get_blob(host: str, repo: str, digest: str) -> bytes:
    c = http.client.HTTPConnection(host, timeout=60)
    try:
        c.request("GET", f"/v2/{repo}/blobs/{digest}")
        resp = c.getresponse()
        if resp.status in (301, 302, 307):
            raise RuntimeError("blob redirects are not expected here")
        return resp.read()
    finally:
        c.close()


def nydus_manifest(host: str, repo: str, tag: str) -> dict[str, Any]:
    c = http.client.HTTPConnection(host, timeout=30)
    try:
        c.request("GET", f"/v2/{repo}/manifests/{tag}",
                  headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
        return dict(json.loads(c.getresponse().read()))
    finally:
        c.close()


def fetch_bootstrap(host: str, repo: str, manifest: dict[str, Any], out: Path) -> None:
    from nydusd.converter.publish import extract_bootstrap

    out.write_bytes(extract_bootstrap(get_blob(host, repo, manifest["layers"][-1]["digest"])))


# ------------------------------------------------------------------------------------------ runs
class Session:
    """State shared by the runs of one benchmark session (inside the namespace)."""

    def __init__(self, tmp: Path, registry: AccessLogRegistry, repo: str) -> None:
        self.tmp, self.registry, self.repo = tmp, registry, repo
        self.manifests = {"nydus": nydus_manifest(registry.host, repo, "nydus")}
        self.shared_sock = ""
        self.shared_mnt = tmp / "shared-mnt"
        self.shared: subprocess.Popen[bytes] | None = None
        self.zygote: subprocess.Popen[bytes] | None = None
        self.zygote_sock = str(tmp / "zygote.sock")
        self.study: dict[str, tuple[int, int]] = {}   # way -> (chunk size, amplify_io)
        self.counter = 0
        self.runc_start = self.runc_exit = 0.0

    def config(self, cache: Path, prefetch: str | None = None, amplify: int | None = None) -> dict[str, Any]:
        """nydusd config; ``access_pattern`` is on in every run: its first-read timestamps are the
        breakdown's "first read" (a dict update per read, no I/O)."""
        cfg: dict[str, Any] = {
            "device": {"backend": {"type": "registry", "config": {
                "scheme": "http", "host": self.registry.host, "repo": self.repo, "timeout": 30,
                "connect_timeout": 10, "retry_limit": 2}},
                "cache": {"type": "blobcache", "config": {"work_dir": str(cache)}}},
            "mode": "direct", "digest_validate": False, "enable_xattr": True,
            "access_pattern": True}
        if amplify is not None:
            cfg["amplify_io"] = amplify
        if prefetch:
            cfg["fs_prefetch"] = {"enable": True, "threads_count": 8, "prefetch_all": prefetch == "all"}
        return cfg

    def start_shared(self) -> None:
        self.shared_mnt.mkdir(exist_ok=True)
        self.shared_sock = str(self.tmp / "shared.sock")
        log = open(self.tmp / "shared-nydusd.log", "ab")  # noqa: SIM115 - owned by the child
        self.shared = subprocess.Popen([PY, "-m", "nydusd", "--mountpoint", str(self.shared_mnt),
                                        "--apisock", self.shared_sock, "--log-level", "info"],
                                       stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                       env={**os.environ, "PYTHONPATH": str(ROOT)})
        log.close()
        wait_for(lambda: os.path.exists(self.shared_sock) and is_mounted(self.shared_mnt), 60,
                 "the shared nydusd", step=0.05)

    def stop_shared(self) -> None:
        if self.shared is not None:
            stop_pid(self.shared.pid, timeout=20)
            umount(self.shared_mnt)
        if self.zygote is not None:
            stop_pid(self.zygote.pid, timeout=20)

    def start_zygote(self) -> None:
        log_path = self.tmp / "zygote.log"
        with open(log_path, "ab") as log:
            self.zygote = subprocess.Popen([PY, "-m", "nydusd.cli.zygote", "--socket", self.zygote_sock],
                                           stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        wait_for(lambda: "zygote_ready" in log_path.read_text(), 60, "the zygote", step=0.05)

    def run_container(self, lower: Path, work: Path) -> tuple[str, float]:
        """overlayfs over ``lower`` + runc run; returns (output, seconds in runc)."""
        upper, wdir, merged, bundle = work / "upper", work / "ovl-work", work / "merged", work / "bundle"
        for d in (upper, wdir, merged, bundle):
            d.mkdir(parents=True, exist_ok=True)
        sh(["mount", "-t", "overlay", "overlay", "-o",
            f"lowerdir={lower},upperdir={upper},workdir={wdir}", str(merged)])
        try:
            sh(["runc", "spec"], cwd=bundle)
            spec = json.loads((bundle / "config.json").read_text())
            spec["root"] = {"path": str(merged), "readonly": False}
            spec["process"]["terminal"] = False
            spec["process"]["args"] = WORKLOAD
            spec["process"]["env"] = ["PATH=/usr/local/bin:/usr/bin:/bin", "HOME=/root"]
            (bundle / "config.json").write_text(json.dumps(spec))
            t0 = time.perf_counter()
            self.counter += 1
            self.runc_start = time.time()
            out = sh(["runc", "--root", str(self.tmp / "runc-state"), "run", "--bundle", str(bundle),
                      f"bench-{self.counter}"], timeout=120)
            self.runc_exit = time.time()
            return out, time.perf_counter() - t0
        finally:
            umount(merged)

    # ---- ways -------------------------------------------------------------------------------
    def full_pull(self, work: Path) -> dict[str, float]:
        env = tool_env(work)
        t0 = time.perf_counter()
        sh(["skopeo", "--tmpdir", str(work / "home/run"), "copy", "--src-tls-verify=false",
            f"docker://{self.registry.host}/{self.repo}:v1", f"oci:{work / 'oci'}:v1"], env=env)
        sh(["umoci", "unpack", "--image", f"{work / 'oci'}:v1", str(work / "unpacked")], env=env)
        t1 = time.perf_counter()
        out, run_s = self.run_container(work / "unpacked/rootfs", work)
        return {"prepare": t1 - t0, "container": run_s, "out": out}  # type: ignore[dict-item]

    def shared_mount(self, work: Path, tag: str, prefetch: str | None,
                     amplify: int | None = None) -> dict[str, Any]:
        cache = work / "cache"
        cache.mkdir(parents=True)
        w0 = time.time()
        t0 = time.perf_counter()
        boot = work / "image.boot"
        fetch_bootstrap(self.registry.host, self.repo, self.manifests[tag], boot)
        w_boot = time.time()
        name = f"/img{self.counter}"
        status, body = api(self.shared_sock, "POST", f"/api/v1/mount?mountpoint={name}",
                           {"source": str(boot), "fs_type": "rafs",
                            "config": json.dumps(self.config(cache, prefetch, amplify))})
        if status >= 300:
            raise RuntimeError(f"mount failed: {status} {body}")
        w_mounted = time.time()
        t1 = time.perf_counter()
        out, run_s = self.run_container(self.shared_mnt / name.lstrip("/"), work)
        t2 = time.perf_counter()
        _, cache_m = api(self.shared_sock, "GET", "/api/v1/metrics/blobcache")  # the one mount
        _, pattern = api(self.shared_sock, "GET", f"/api/v1/metrics/pattern?id={name}")
        api(self.shared_sock, "DELETE", f"/api/v1/mount?mountpoint={name}")
        files_read = files_read_bytes(boot, pattern)
        marks = {"bootstrap fetched": w_boot, "mounted (API answered)": w_mounted,
                 "runc run started": self.runc_start, **daemon_marks(pattern, cache_m),
                 "container exited": self.runc_exit}
        return {"prepare": t1 - t0, "container": run_s, "total": t2 - t0, "out": out,
                "prefetched": (cache_m or {}).get("prefetch_data_amount", 0), "files_read": files_read,
                **{f"mark {k}": v - w0 for k, v in marks.items() if v}}

    def per_image(self, work: Path, zygote: bool = False) -> dict[str, Any]:
        cache, mnt = work / "cache", work / "mnt"
        cache.mkdir(parents=True)
        mnt.mkdir()
        cfg = work / "nydusd.json"
        cfg.write_text(json.dumps(self.config(cache)))
        sock = str(work / "api.sock")
        log_path = work / "nydusd.log"
        w0 = time.time()
        t0 = time.perf_counter()
        boot = work / "image.boot"
        fetch_bootstrap(self.registry.host, self.repo, self.manifests["nydus"], boot)
        w_exec = time.time()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        if zygote:
            env["NYDUSD_ZYGOTE"] = self.zygote_sock
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([PY, "-m", "nydusd.cli.launch", "--config", str(cfg), "--bootstrap",
                                     str(boot), "--mountpoint", str(mnt), "--apisock", sock,
                                     "--log-level", "info"],
                                    stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)

        def running() -> bool:
            if not os.path.exists(sock):
                return False
            try:
                return api(sock, "GET", "/api/v1/daemon", timeout=2)[1].get("state") == "RUNNING"
            except (OSError, ValueError, AttributeError):
                return False
        try:
            wait_for(running, 60, "nydusd RUNNING")
            w_running = time.time()
            t1 = time.perf_counter()
            out, run_s = self.run_container(mnt, work)
            t2 = time.perf_counter()
            _, pattern = api(sock, "GET", "/api/v1/metrics/pattern")
            _, cache_m = api(sock, "GET", "/api/v1/metrics/blobcache")
        finally:
            stop_pid(proc.pid, timeout=20)
            umount(mnt)
        marks = {"bootstrap fetched": w_exec, **startup_marks(log_path),
                 "RUNNING seen by the poller": w_running, "runc run started": self.runc_start,
                 **daemon_marks(pattern, cache_m), "container exited": self.runc_exit}
        return {"prepare": t1 - t0, "container": run_s, "total": t2 - t0, "out": out,
                **{f"mark {k}": v - w0 for k, v in marks.items() if v}}

    def record_pattern(self, work: Path) -> list[dict[str, Any]]:
        """One untimed run with access_pattern on: the files the workload reads, in order."""
        cache = work / "cache"
        cache.mkdir(parents=True)
        boot = work / "image.boot"
        fetch_bootstrap(self.registry.host, self.repo, self.manifests["nydus"], boot)
        name = "/record"
        status, body = api(self.shared_sock, "POST", f"/api/v1/mount?mountpoint={name}",
                           {"source": str(boot), "fs_type": "rafs",
                            "config": json.dumps(self.config(cache))})
        if status >= 300:
            raise RuntimeError(f"mount failed: {status} {body}")
        self.run_container(self.shared_mnt / "record", work)
        _, pattern = api(self.shared_sock, "GET", f"/api/v1/metrics/pattern?id={name}")
        api(self.shared_sock, "DELETE", f"/api/v1/mount?mountpoint={name}")
        return list(pattern or [])


def study_way(chunk: int, amplify: int) -> str:
    return f"chunk {chunk >> 10}K, amplify {amplify >> 10}K"


def one(session: Session, way: str, work: Path) -> dict[str, Any]:
    drop_caches()
    mark, rx = session.registry.mark(), lo_rx()
    t0 = time.perf_counter()
    if way == "full pull":
        res: dict[str, Any] = session.full_pull(work)
    elif way == "shared":
        res = session.shared_mount(work, "nydus", None)
    elif way == "per-image":
        res = session.per_image(work)
    elif way == "per-image, zygote":
        res = session.per_image(work, zygote=True)
    elif way == "shared, prefetch_all":
        res = session.shared_mount(work, "nydus", "all")
    elif way == "shared, replayed":
        res = session.shared_mount(work, "replayed", "table")
    else:
        chunk, amplify = session.study[way]
        res = session.shared_mount(work, chunk_tag(chunk), None, amplify)
    # to the container's exit: a way that measured it itself excludes its unmount
    res.setdefault("total", time.perf_counter() - t0)
    if not str(res["out"]).startswith("3."):
        raise RuntimeError(f"{way}: unexpected container output {res['out']!r}")
    res["requests"], res["fetched"] = session.registry.blob_gets(mark)
    tag = ("replayed" if way == "shared, replayed"
           else chunk_tag(session.study[way][0]) if way in session.study else "nydus")
    if way != "full pull":   # what the data blobs gave: the bootstrap layer GET is one of the requests
        res["data_fetched"] = res["fetched"] - int(session.manifests[tag]["layers"][-1]["size"])
    res["lo_rx"] = lo_rx() - rx
    shutil.rmtree(work, ignore_errors=True)
    return res


def chunk_tag(chunk: int) -> str:
    return "nydus" if chunk == 0x100000 else f"nydus-c{chunk >> 10}k"


# ------------------------------------------------------------------------------------------ main
def inside(args: argparse.Namespace) -> int:
    """The benchmark proper, running inside the network namespace."""
    base, py = CACHE / "bookworm-minbase", CACHE / "bookworm-python3"
    tmp = Path(tempfile.mkdtemp(prefix="nydus-bench-coldstart-"))
    registry = AccessLogRegistry(tmp / "registry").start()
    session: Session | None = None
    try:
        t0 = time.perf_counter()
        layout = build_layout(tmp / "build", base, py)
        repo = "bench/python"
        env = tool_env(tmp / "build")
        sh(["skopeo", "--tmpdir", str(tmp / "build/home/run"), "copy", "--dest-tls-verify=false",
            f"oci:{layout}:v1", f"docker://{registry.host}/{repo}:v1"], env=env)
        sh([PY, "-m", "nydusd.cli.convert", "--log-level", "warn", "convert", "--source",
            f"{registry.host}/{repo}:v1", "--target", f"{registry.host}/{repo}:nydus", "--plain-http",
            "--work-dir", str(tmp / "convert")], env=env, cwd=ROOT)
        for chunk in sorted({c for c in args.chunk_sizes if chunk_tag(c) != "nydus"}):
            sh([PY, "-m", "nydusd.cli.convert", "--log-level", "warn", "convert", "--source",
                f"{registry.host}/{repo}:v1", "--target", f"{registry.host}/{repo}:{chunk_tag(chunk)}",
                "--plain-http", "--chunk-size", hex(chunk), "--work-dir", str(tmp / "convert")],
               env=env, cwd=ROOT)
        oci = nydus_manifest(registry.host, repo, "v1")
        oci_bytes = sum(int(layer["size"]) for layer in oci["layers"])
        print(f"image: 3-layer bookworm minbase + python3, {oci_bytes / 1e6:.1f} MB compressed; built, "
              f"pushed and converted in {time.perf_counter() - t0:.0f} s (unshaped)", flush=True)
        # record the workload's reads once, then rebuild the image with them as its prefetch table
        session = Session(tmp, registry, repo)
        session.start_shared()
        if "per-image, zygote" in args.ways:
            session.start_zygote()
        pattern = session.record_pattern(tmp / "record")
        (tmp / "pattern.json").write_text(json.dumps(pattern))
        sh([PY, "-m", "nydusd.cli.convert", "--log-level", "warn", "optimize", "--source",
            f"{registry.host}/{repo}:nydus", "--target", f"{registry.host}/{repo}:replayed", "--plain-http",
            "--access-pattern", str(tmp / "pattern.json")], env=env, cwd=ROOT)
        session.manifests["replayed"] = nydus_manifest(registry.host, repo, "replayed")
        ways = list(args.ways)
        if args.study:
            for chunk in args.chunk_sizes:
                session.manifests[chunk_tag(chunk)] = nydus_manifest(registry.host, repo, chunk_tag(chunk))
                for amplify in args.amplify:
                    session.study[study_way(chunk, amplify)] = (chunk, amplify)
            ways += list(session.study)
        nydus_blobs = sum(int(d["size"]) for d in session.manifests["nydus"]["layers"][:-1])
        print(f"recorded {len(pattern)} files read by the workload; nydus data blobs "
              f"{nydus_blobs / 1e6:.1f} MB", flush=True)
        shape_loopback(None, f"tbf rate {args.rate} burst 256kb latency 50ms")
        print(f"link: tbf rate {args.rate} burst 256kb latency 50ms on lo of this network namespace; "
              f"{args.rounds} rounds, page cache dropped before each run", flush=True)
        load0 = " ".join(f"{x:.2f}" for x in os.getloadavg())
        results: dict[str, list[dict[str, Any]]] = {w: [] for w in ways}
        for r in range(args.rounds):
            order = ways if r % 2 == 0 else ways[::-1]
            for way in order:
                res = one(session, way, tmp / f"run-{r}-{way.replace(' ', '').replace(',', '-')}")
                results[way].append(res)
                print(f"  round {r + 1} {way:22s} total {res['total']:.2f} s (prepare "
                      f"{res['prepare']:.2f}, container {res['container']:.2f})  fetched "
                      f"{res['fetched'] / 1e6:.2f} MB in {res['requests']} GETs, "
                      f"lo {res['lo_rx'] / 1e6:.2f} MB",
                      flush=True)
        print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
              f"(at the start: {load0})")
        report(results, oci_bytes, nydus_blobs)
        if args.study:
            report_study(results, session)
    finally:
        if session is not None:
            session.stop_shared()
        registry.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def report(results: dict[str, list[dict[str, Any]]], oci_bytes: int, nydus_blobs: int) -> None:
    def med(way: str, key: str) -> float:
        return statistics.median(float(x.get(key, 0)) for x in results[way])

    base = med("full pull", "total")
    print()
    print("| way | total s | prepare s | container s | vs full pull | fetched MB | % of image | lo rx MB |")
    print("|---|---|---|---|---|---|---|---|")
    for way in [w for w in WAYS if w in results]:
        print(f"| {way} | {med(way, 'total'):.2f} | {med(way, 'prepare'):.2f} | "
              f"{med(way, 'container'):.2f} | "
              f"{med(way, 'total') / base:.3f}x | {med(way, 'fetched') / 1e6:.2f} | "
              f"{100 * med(way, 'fetched') / oci_bytes:.1f} % | {med(way, 'lo_rx') / 1e6:.2f} |")
    print(f"(image: {oci_bytes / 1e6:.1f} MB OCI layers, {nydus_blobs / 1e6:.1f} MB nydus data blobs; "
          f"medians of {len(results['full pull'])} runs)")
    for way in ("per-image", "per-image, zygote", "shared", "shared, replayed"):
        if way in results:
            report_marks(way, results[way])
    if not all(w in results for w in WAYS):
        return
    targets = [("shared <= 0.06x full pull", med("shared", "total") <= 0.06 * base),
               ("per-image <= 0.10x full pull", med("per-image", "total") <= 0.10 * base),
               ("per-image with a zygote <= 0.10x full pull",
                med("per-image, zygote", "total") <= 0.10 * base),
               ("replayed never slower than no prefetch",
                med("shared, replayed", "total") <= med("shared", "total")),
               ("prefetch_all <= 1.10x no prefetch",
                med("shared, prefetch_all", "total") <= 1.10 * med("shared", "total")),
               ("bytes <= 5 % of the image without prefetch table",
                med("shared", "fetched") <= 0.05 * oci_bytes)]
    for name, ok in targets:
        print(f"target {name}: {'met' if ok else 'MISSED'}")


def report_marks(way: str, runs: list[dict[str, Any]]) -> None:
    """Where a way's time goes: each timestamp (the bench's own and the daemon's: startup_phase log
    events, the first read from the access pattern, prefetch begin/end from the blobcache metrics)
    as seconds since the run started, and the step from the mark before it; medians over runs."""
    names = {k for r in runs for k in r if k.startswith("mark ")}
    names = {k for k in names if all(k in r for r in runs)}
    order = sorted(names, key=lambda k: statistics.median(r[k] for r in runs))
    print(f"\n{way}: where the time goes (medians of {len(runs)} runs; step = median of the per-run "
          "differences to the mark above)")
    print("| mark | s since start | step s |")
    print("|---|---|---|")
    for i, k in enumerate(order):
        at = statistics.median(r[k] for r in runs)
        step = statistics.median(r[k] - r[order[i - 1]] for r in runs) if i else at
        print(f"| {k[5:]} | {at:.3f} | {step:.3f} |")


def report_study(results: dict[str, list[dict[str, Any]]], session: Session) -> None:
    """Chunk size x amplify_io: time to the container's exit, blob GETs (the bootstrap layer's
    included), data bytes fetched (the bootstrap layer's left out) against the compressed size of
    the chunks the workload touched (= what amplify_io 0 fetches at that chunk size: without
    amplification and prefetch every request is for chunks a read covered)."""
    def med(way: str, key: str) -> float:
        return statistics.median(float(x.get(key, 0)) for x in results[way])

    base = med("full pull", "total")
    default = study_way(0x100000, 0x100000)
    ref = med(default, "total") if default in results else None
    print("\nchunk size x amplify_io (shared daemon, no prefetch)")
    print("| chunk | amplify_io | total s | vs full pull | vs 1M/1M | GETs | data fetched MB | touched MB "
          "| fetched / touched | read files' chunks MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for way, (chunk, amplify) in session.study.items():
        touched_way = study_way(chunk, 0)
        touched = med(touched_way, "data_fetched") if touched_way in results else float("nan")
        print(f"| {chunk >> 10}K | {amplify >> 10}K | {med(way, 'total'):.2f} | "
              f"{med(way, 'total') / base:.3f}x | "
              f"{(med(way, 'total') / ref) if ref else float('nan'):.2f}x | {med(way, 'requests'):.0f} | "
              f"{med(way, 'data_fetched') / 1e6:.2f} | {touched / 1e6:.2f} | "
              f"{med(way, 'data_fetched') / touched:.2f} | {med(way, 'files_read') / 1e6:.2f} |")


def _sizes(text: str) -> list[int]:
    return [int(x, 0) for x in text.split(",") if x]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate", default="100mbit")
    ap.add_argument("--ways", default=",".join(SHORT),
                    help=f"comma-separated subset of {','.join(SHORT)} (default: all; the full pull, the "
                    "baseline, always runs)")
    ap.add_argument("--study", action="store_true",
                    help="add the chunk size x amplify_io rows (shared daemon, no prefetch)")
    ap.add_argument("--chunk-sizes", type=_sizes, default=[0x40000, 0x100000, 0x400000],
                    help="chunk sizes of the study (nydusify convert --chunk-size), default 256K,1M,4M")
    ap.add_argument("--amplify", type=_sizes, default=[0, 0x100000, 0x400000],
                    help="amplify_io values of the study, default 0,1M,4M")
    ap.add_argument("--build-only", action="store_true", help="build the cached root filesystems only")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    chosen = [w.strip() for w in args.ways.split(",") if w.strip()]
    unknown = [w for w in chosen if w not in SHORT]
    if unknown:
        ap.error(f"unknown ways {unknown}; choose from {','.join(SHORT)}")
    args.ways = [w for w in WAYS if w == "full pull" or any(SHORT[c] == w for c in chosen)]
    if args.inside:
        return inside(args)
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse") or missing:
        print(f"bench_coldstart: skipped: needs root, /dev/fuse and {', '.join(missing) or 'its tools'}")
        return 0
    build_rootfs()  # outside the namespace: the first build needs the Debian mirror
    if args.build_only:
        return 0
    with netns(f"nydus-coldstart-{os.getpid()}") as ns:
        # nsenter, not ``ip netns exec``: the latter remounts /sys, hiding the cgroup mounts runc needs
        return subprocess.call(["nsenter", f"--net=/run/netns/{ns}", PY, str(Path(__file__).resolve()),
                                "--inside", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
