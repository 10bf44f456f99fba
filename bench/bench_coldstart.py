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
- ``shared, prefetch_all``: as shared, with ``fs_prefetch`` ``prefetch_all``;
- ``shared, replayed``: as shared, on the image rebuilt by ``nydusify optimize --access-pattern`` from
  a recorded run (its prefetch table = the files the workload read, first read first), with
  ``fs_prefetch`` on.

Bytes: blob bytes in the registry's access log, and the namespace's ``lo`` rx bytes. Medians over
``--rounds``; ratios against the full pull measured in the same session. Where a target of the
issue is missed, the daemon's own timestamps (``startup_phase`` events, metrics) break the time down.

    .venv/bin/python bench/bench_coldstart.py [--rounds N] [--rate 100mbit]

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
import signal
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
from tests.harness.containerd_rig import AccessLogRegistry, netns, shape_loopback  # noqa: E402
from tests.harness.daemon import is_mounted  # noqa: E402
from tests.harness.oci_images import tool_env  # noqa: E402

CACHE = Path(os.environ.get("NYDUS_BENCH_CACHE", Path.home() / ".cache/nydus-py/coldstart"))
MIRROR = "http://deb.debian.org/debian"
TOOLS = ("debootstrap", "umoci", "skopeo", "runc", "docker-registry", "ip", "tc", "nsenter", "curl")
WORKLOAD = ["python3", "-c", "import json,sys; print(sys.version)"]
WAYS = ("full pull", "shared", "per-image", "shared, prefetch_all", "shared, replayed")
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
        self.counter = 0

    def config(self, cache: Path, prefetch: str | None = None, pattern: bool = False) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "device": {"backend": {"type": "registry", "config": {
                "scheme": "http", "host": self.registry.host, "repo": self.repo, "timeout": 30,
                "connect_timeout": 10, "retry_limit": 2}},
                "cache": {"type": "blobcache", "config": {"work_dir": str(cache)}}},
            "mode": "direct", "digest_validate": False, "enable_xattr": True,
            "access_pattern": pattern}
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
            self.shared.send_signal(signal.SIGTERM)
            try:
                self.shared.wait(20)
            except subprocess.TimeoutExpired:
                self.shared.kill()
                self.shared.wait()
            umount(self.shared_mnt)

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
            out = sh(["runc", "--root", str(self.tmp / "runc-state"), "run", "--bundle", str(bundle),
                      f"bench-{self.counter}"], timeout=120)
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

    def shared_mount(self, work: Path, tag: str, prefetch: str | None) -> dict[str, Any]:
        cache = work / "cache"
        cache.mkdir(parents=True)
        t0 = time.perf_counter()
        boot = work / "image.boot"
        fetch_bootstrap(self.registry.host, self.repo, self.manifests[tag], boot)
        name = f"/img{self.counter}"
        status, body = api(self.shared_sock, "POST", f"/api/v1/mount?mountpoint={name}",
                           {"source": str(boot), "fs_type": "rafs",
                            "config": json.dumps(self.config(cache, prefetch))})
        if status >= 300:
            raise RuntimeError(f"mount failed: {status} {body}")
        t1 = time.perf_counter()
        out, run_s = self.run_container(self.shared_mnt / name.lstrip("/"), work)
        t2 = time.perf_counter()
        _, cache_m = api(self.shared_sock, "GET", "/api/v1/metrics/blobcache")
        api(self.shared_sock, "DELETE", f"/api/v1/mount?mountpoint={name}")
        return {"prepare": t1 - t0, "container": run_s, "total": t2 - t0, "out": out,
                "prefetched": (cache_m or {}).get("prefetch_data_amount", 0)}

    def per_image(self, work: Path) -> dict[str, Any]:
        cache, mnt = work / "cache", work / "mnt"
        cache.mkdir(parents=True)
        mnt.mkdir()
        cfg = work / "nydusd.json"
        cfg.write_text(json.dumps(self.config(cache)))
        sock = str(work / "api.sock")
        log_path = work / "nydusd.log"
        t0 = time.perf_counter()
        boot = work / "image.boot"
        fetch_bootstrap(self.registry.host, self.repo, self.manifests["nydus"], boot)
        t_boot = time.perf_counter()
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([PY, "-m", "nydusd", "--config", str(cfg), "--bootstrap", str(boot),
                                     "--mountpoint", str(mnt), "--apisock", sock, "--log-level", "info"],
                                    stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                    env={**os.environ, "PYTHONPATH": str(ROOT)})

        def running() -> bool:
            if not os.path.exists(sock):
                return False
            try:
                return api(sock, "GET", "/api/v1/daemon", timeout=2)[1].get("state") == "RUNNING"
            except (OSError, ValueError, AttributeError):
                return False
        try:
            wait_for(running, 60, "nydusd RUNNING")
            t1 = time.perf_counter()
            out, run_s = self.run_container(mnt, work)
            t2 = time.perf_counter()
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
            umount(mnt)
        phases = {}
        for line in log_path.read_text(errors="replace").splitlines():
            if '"startup_phase"' in line:
                ev = json.loads(line)
                phases[ev["phase"]] = ev["since_exec_s"]
        return {"prepare": t1 - t0, "container": run_s, "total": t2 - t0, "out": out,
                "bootstrap_s": t_boot - t0, "exec_to_running_s": t1 - t_boot, **{f"phase_{k}": v
                                                                                  for k, v in phases.items()}}

    def record_pattern(self, work: Path) -> list[dict[str, Any]]:
        """One untimed run with access_pattern on: the files the workload reads, in order."""
        cache = work / "cache"
        cache.mkdir(parents=True)
        boot = work / "image.boot"
        fetch_bootstrap(self.registry.host, self.repo, self.manifests["nydus"], boot)
        name = "/record"
        status, body = api(self.shared_sock, "POST", f"/api/v1/mount?mountpoint={name}",
                           {"source": str(boot), "fs_type": "rafs",
                            "config": json.dumps(self.config(cache, pattern=True))})
        if status >= 300:
            raise RuntimeError(f"mount failed: {status} {body}")
        self.run_container(self.shared_mnt / "record", work)
        _, pattern = api(self.shared_sock, "GET", f"/api/v1/metrics/pattern?id={name}")
        api(self.shared_sock, "DELETE", f"/api/v1/mount?mountpoint={name}")
        return list(pattern or [])


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
    elif way == "shared, prefetch_all":
        res = session.shared_mount(work, "nydus", "all")
    else:
        res = session.shared_mount(work, "replayed", "table")
    # to the container's exit: a way that measured it itself excludes its unmount
    res.setdefault("total", time.perf_counter() - t0)
    if not str(res["out"]).startswith("3."):
        raise RuntimeError(f"{way}: unexpected container output {res['out']!r}")
    res["requests"], res["fetched"] = session.registry.blob_gets(mark)
    res["lo_rx"] = lo_rx() - rx
    shutil.rmtree(work, ignore_errors=True)
    return res


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
        oci = nydus_manifest(registry.host, repo, "v1")
        oci_bytes = sum(int(layer["size"]) for layer in oci["layers"])
        print(f"image: 3-layer bookworm minbase + python3, {oci_bytes / 1e6:.1f} MB compressed; built, "
              f"pushed and converted in {time.perf_counter() - t0:.0f} s (unshaped)", flush=True)
        # record the workload's reads once, then rebuild the image with them as its prefetch table
        session = Session(tmp, registry, repo)
        session.start_shared()
        pattern = session.record_pattern(tmp / "record")
        (tmp / "pattern.json").write_text(json.dumps(pattern))
        sh([PY, "-m", "nydusd.cli.convert", "--log-level", "warn", "optimize", "--source",
            f"{registry.host}/{repo}:nydus", "--target", f"{registry.host}/{repo}:replayed", "--plain-http",
            "--access-pattern", str(tmp / "pattern.json")], env=env, cwd=ROOT)
        session.manifests["replayed"] = nydus_manifest(registry.host, repo, "replayed")
        nydus_blobs = sum(int(d["size"]) for d in session.manifests["nydus"]["layers"][:-1])
        print(f"recorded {len(pattern)} files read by the workload; nydus data blobs "
              f"{nydus_blobs / 1e6:.1f} MB", flush=True)
        shape_loopback(None, f"tbf rate {args.rate} burst 256kb latency 50ms")
        print(f"link: tbf rate {args.rate} burst 256kb latency 50ms on lo of this network namespace; "
              f"{args.rounds} rounds, page cache dropped before each run", flush=True)
        results: dict[str, list[dict[str, Any]]] = {w: [] for w in WAYS}
        for r in range(args.rounds):
            order = WAYS if r % 2 == 0 else tuple(reversed(WAYS))
            for way in order:
                res = one(session, way, tmp / f"run-{r}-{way.replace(' ', '').replace(',', '-')}")
                results[way].append(res)
                print(f"  round {r + 1} {way:22s} total {res['total']:.2f} s (prepare "
                      f"{res['prepare']:.2f}, container {res['container']:.2f})  fetched "
                      f"{res['fetched'] / 1e6:.2f} MB in {res['requests']} GETs, "
                      f"lo {res['lo_rx'] / 1e6:.2f} MB",
                      flush=True)
        report(results, oci_bytes, nydus_blobs)
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
    for way in WAYS:
        print(f"| {way} | {med(way, 'total'):.2f} | {med(way, 'prepare'):.2f} | "
              f"{med(way, 'container'):.2f} | "
              f"{med(way, 'total') / base:.3f}x | {med(way, 'fetched') / 1e6:.2f} | "
              f"{100 * med(way, 'fetched') / oci_bytes:.1f} % | {med(way, 'lo_rx') / 1e6:.2f} |")
    print(f"(image: {oci_bytes / 1e6:.1f} MB OCI layers, {nydus_blobs / 1e6:.1f} MB nydus data blobs; "
          f"medians of {len(results['full pull'])} runs)")
    pi = results["per-image"]
    print(f"per-image breakdown (medians): bootstrap fetch {med('per-image', 'bootstrap_s'):.3f} s, "
          f"exec -> RUNNING {med('per-image', 'exec_to_running_s'):.3f} s (daemon: imports done at "
          f"{med('per-image', 'phase_imported'):.3f} s, image mounted "
          f"{med('per-image', 'phase_image_mounted'):.3f} s, RUNNING "
          f"{med('per-image', 'phase_running'):.3f} s, "
          f"API up {med('per-image', 'phase_api_started'):.3f} s "
          f"since exec), container {med('per-image', 'container'):.3f} s; {len(pi)} runs")
    targets = [("shared <= 0.06x full pull", med("shared", "total") <= 0.06 * base),
               ("per-image <= 0.10x full pull", med("per-image", "total") <= 0.10 * base),
               ("replayed never slower than no prefetch",
                med("shared, replayed", "total") <= med("shared", "total")),
               ("prefetch_all <= 1.10x no prefetch",
                med("shared, prefetch_all", "total") <= 1.10 * med("shared", "total")),
               ("bytes <= 5 % of the image without prefetch table",
                med("shared", "fetched") <= 0.05 * oci_bytes)]
    for name, ok in targets:
        print(f"target {name}: {'met' if ok else 'MISSED'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate", default="100mbit")
    ap.add_argument("--build-only", action="store_true", help="build the cached root filesystems only")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
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
                                "--inside", "--rounds", str(args.rounds), "--rate", args.rate])

if __name__ == "__main__":
    sys.exit(main())
