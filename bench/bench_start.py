"""Start-up benchmark (issues 13 and 17): how soon a freshly exec-ed nydusd serves an image, and how
much memory it holds -- measured the way nydus-snapshotter sees it, with the page cache dropped
before every run.

Three forms:
- ``cli``: ``nydusd --config C --bootstrap B --mountpoint M --apisock S`` (image mounted at start:
  what nydus-snapshotter runs for a dedicated daemon);
- ``api``: ``nydusd --mountpoint M --apisock S``, then ``POST /api/v1/mount?mountpoint=/`` (the
  shared daemon's way);
- ``zygote``: the ``cli`` form with ``NYDUSD_ZYGOTE`` set, served by a fork of ``nydusd-zygote``
  (started once, before the rounds; trees without ``nydusd/cli/zygote.py`` have no such row). The
  page cache is dropped before each run as for the others; the zygote's memory is its own.

Per run: ``sync; echo 3 > /proc/sys/vm/drop_caches``, exec, then poll for the socket file (``socket``),
``GET /api/v1/daemon`` answering ``RUNNING`` (``running``; the snapshotter waits for exactly this),
and in the api form the mount request (``mounted``; ``api mount`` is that request alone). Then
``VmRSS``/threads idle, and ``VmRSS``/``VmHWM`` after reading a few files of the image through the
mount. The daemon's own ``startup_phase`` log events (seconds since exec) break the start down.

A ``floor`` row per round: the same interpreter started cold doing nothing, and importing the
stack every start needs (FastAPI, uvicorn, pydantic, structlog, llfuse) -- what no change to this
project's code can go below.

Code under test: ``--before DIR`` is a copy of another revision's ``nydusd`` and ``api`` packages
(``git archive <rev> nydusd api | tar -x -C DIR``), run with the same interpreter and libraries as
this tree (``PYTHONPATH=DIR``); runs alternate before/after in each round (paired), after one
unmeasured warm-up run of each (writes the .pyc files). Medians over ``--rounds`` (default 5).

    sudo .venv/bin/python bench/bench_start.py --before /tmp/nydus-before [--rounds 5] [--warm]

Needs root (drop_caches, FUSE mounts) and /dev/fuse.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PY = sys.executable
FORMS = ("cli", "api", "zygote", "floor")
POLL = 0.002
TIMEOUT = 30.0
#: files read through the mount for the "after reads" memory figures
READ_FILES = ("bin/tool0", "bin/tool1", "lib/libbig.so", "etc/conf3", "share/doc7")


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def request(sock: str, method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, bytes]:
    conn = UnixHTTPConnection(sock)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, url, body=data, headers={"Content-Type": "application/json"} if data else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------- image
def build_image(tmp: Path) -> tuple[str, str]:
    """A small image (bin/lib/etc/share, ~6 MiB, half compressible) built with this tree's builder;
    returns (bootstrap, v1 config text)."""
    from nydusd.builder import BuildOptions, build
    from nydusd.compress import Compressor

    rnd = random.Random(13)
    src = tmp / "src"
    for d in ("bin", "lib", "etc", "share"):
        (src / d).mkdir(parents=True)
    for i in range(8):
        (src / "bin" / f"tool{i}").write_bytes(rnd.randbytes(200_000))
    (src / "lib" / "libbig.so").write_bytes(rnd.randbytes(1_500_000) + bytes(1_500_000))
    for i in range(30):
        (src / "etc" / f"conf{i}").write_bytes(f"key{i} = {'v' * rnd.randrange(10, 4000)}\n".encode())
        (src / "share" / f"doc{i}").write_bytes(rnd.randbytes(rnd.randrange(1000, 30_000)))
    blobs = tmp / "blobs"
    blobs.mkdir()
    opts = BuildOptions(fs_version=6, bootstrap_path=str(tmp / "image.boot"), blob_dir=str(blobs),
                        chunk_size=1 << 20, compressor=Compressor.ZSTD)
    result = build(str(src), opts)
    config = {"device": {"backend": {"type": "localfs", "config": {"dir": str(blobs)}},
                         "cache": {"type": "blobcache", "config": {"work_dir": str(tmp / "cache")}}},
              "mode": "direct", "digest_validate": False}
    return result.bootstrap_path or str(tmp / "image.boot"), json.dumps(config)


# ------------------------------------------------------------------------------------------- a run
#: ``--warm``: leave the page cache as it is (the daemon's files cached by the previous run)
WARM = False


def drop_caches() -> None:
    if WARM:
        return
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def proc_status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                out[key] = int(value.split()[0])
    return out


def is_mounted(path: str) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path for line in f if len(line.split()) > 2)


def wait_for(what: str, check: Any, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not check():
        if proc.poll() is not None:
            raise RuntimeError(f"nydusd exited ({proc.returncode}) before {what}: {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}: {log.read_text()[-2000:]}")
        time.sleep(POLL)


def running(sock: str) -> bool:
    try:
        status, body = request(sock, "GET", "/api/v1/daemon")
    except OSError:
        return False
    return status == 200 and json.loads(body).get("state") == "RUNNING"


class Zygote:
    """``nydusd-zygote`` of ``code``, started (and warmed) once; the ``zygote`` form's daemons are
    its forks: ``nydusd`` (the ``nydusd.cli.launch`` entry point) with ``NYDUSD_ZYGOTE`` set."""

    def __init__(self, code: Path, tmp: Path) -> None:
        self.sock = str(tmp / f"zygote-{os.getpid()}.sock")
        self.log = tmp / "zygote.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([PY, "-m", "nydusd.cli.zygote", "--socket", self.sock],
                                         env={**os.environ, "PYTHONPATH": str(code)}, cwd=str(code),
                                         stdout=out, stderr=subprocess.STDOUT)
        wait_for("the zygote", lambda: "zygote_ready" in self.log.read_text(), self.proc, self.log)

    def daemon_pid(self) -> int:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        return int(out.stdout.split()[0])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


#: the zygote per code tree (only trees that have one: ``nydusd/cli/zygote.py``)
ZYGOTES: dict[Path, Zygote] = {}


def one_run(code: Path, form: str, tmp: Path, bootstrap: str, config: str) -> dict[str, float]:
    """One cold start of ``form`` with the packages in ``code``; seconds and KiB."""
    work = Path(tempfile.mkdtemp(dir=tmp))
    mnt, sock, log = str(work / "mnt"), str(work / "api.sock"), work / "nydusd.log"
    os.mkdir(mnt)
    (work / "cfg.json").write_text(config)
    zygote = ZYGOTES.get(code) if form == "zygote" else None
    if form == "zygote" and zygote is None:
        return {}  # a tree without a zygote
    args = [PY, "-m", "nydusd.cli.launch" if zygote else "nydusd", "--mountpoint", mnt,
            "--apisock", sock, "--log-level", "info", "--log-file", str(log)]
    if form in ("cli", "zygote"):
        args += ["--config", str(work / "cfg.json"), "--bootstrap", bootstrap]
    env = {**os.environ, "PYTHONPATH": str(code), "NYDUS_LOG_FORMAT": "json"}
    env.pop("NYDUSD_FUSE_SESSION", None)
    if zygote:
        env["NYDUSD_ZYGOTE"] = zygote.sock
    drop_caches()
    r: dict[str, float] = {}
    t0 = time.monotonic()
    proc = subprocess.Popen(args, env=env, cwd=str(code), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for("the socket", lambda: os.path.exists(sock), proc, log)
        r["socket"] = time.monotonic() - t0
        wait_for("RUNNING", lambda: running(sock), proc, log)
        r["running"] = time.monotonic() - t0
        if form == "api":
            t1 = time.monotonic()
            status, body = request(sock, "POST", "/api/v1/mount?mountpoint=/",
                                   {"source": bootstrap, "fs_type": "rafs", "config": config})
            if status != 204:
                raise RuntimeError(f"mount failed: {status} {body[:500]!r}")
            r["api mount"] = time.monotonic() - t1
        r["mounted"] = time.monotonic() - t0
        time.sleep(0.3)  # let start-up threads settle before "idle"
        daemon = zygote.daemon_pid() if zygote else proc.pid  # the fork, not its starter
        idle = proc_status(daemon)
        r["idle RSS KiB"], r["threads"] = idle["VmRSS"], idle["Threads"]
        for name in READ_FILES:
            with open(os.path.join(mnt, name), "rb") as f:
                while f.read(1 << 20):
                    pass
        after = proc_status(daemon)
        r["read RSS KiB"], r["read HWM KiB"] = after["VmRSS"], after["VmHWM"]
        for line in log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == "startup_phase":
                    r[f"phase {event['phase']}"] = float(event["since_exec_s"])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", mnt], check=False, capture_output=True)
    return r


#: what any start of this daemon imports (FastAPI, uvicorn, pydantic, structlog, llfuse): a floor
FLOOR = "import fastapi, uvicorn, pydantic, structlog, llfuse"


def floor_run() -> dict[str, float]:
    """The same interpreter, cold, doing nothing (``python``) and importing the required stack."""
    r: dict[str, float] = {}
    for key, code in (("python -c pass", "pass"), ("import required stack", FLOOR)):
        drop_caches()
        t0 = time.monotonic()
        subprocess.run([PY, "-c", code], check=True, cwd="/")
        r[key] = time.monotonic() - t0
    return r


# ------------------------------------------------------------------------------------------- table
METRICS = ("python -c pass", "import required stack", "socket", "running", "api mount", "mounted",
           "threads", "idle RSS KiB", "read RSS KiB", "read HWM KiB")
TARGETS = {("cli", "running"): 0.3, ("zygote", "running"): 0.3, ("api", "mounted"): 0.3,
           ("api", "api mount"): 0.3,
           ("cli", "read RSS KiB"): 60 * 1024, ("api", "read RSS KiB"): 60 * 1024}


def fmt(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    if "KiB" in key:
        return f"{value / 1024:.1f} MB"
    if key == "threads":
        return f"{value:.0f}"
    return f"{value * 1000:.0f} ms"


def table(results: dict[str, dict[str, list[dict[str, float]]]], labels: list[str]) -> str:
    lines = []
    head = f"{'form':<5} {'metric':<26}" + "".join(f"{lab:>12}" for lab in labels)
    if len(labels) == 2:
        head += f"{'ratio':>8}  target"
    lines += [head, "-" * len(head)]
    for form in FORMS:
        runs = [run for lab in labels for run in results[lab][form]]
        phases = {k for run in runs for k in run if k.startswith("phase")}
        keys = [k for k in METRICS if any(k in run for run in runs)]
        keys += sorted(phases, key=lambda k: statistics.median(run[k] for run in runs if k in run))
        for key in keys:
            meds: list[float | None] = []
            for lab in labels:
                vals = [run[key] for run in results[lab][form] if key in run]
                meds.append(statistics.median(vals) if vals else None)
            row = f"{form:<5} {key:<26}" + "".join(f"{fmt(key, m):>12}" for m in meds)
            if len(labels) == 2:
                a, b = meds
                row += f"{(b / a if a and b is not None else float('nan')):>8.2f}"
                target = TARGETS.get((form, key))
                if target is not None and b is not None:
                    row += f"  {'met' if b <= target else 'missed'} (<= {fmt(key, target)})"
            lines.append(row)
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", type=Path, help="a copy of another revision's nydusd + api packages")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--forms", default="cli,api,zygote")
    p.add_argument("--warm", action="store_true", help="do not drop the page cache before a run")
    a = p.parse_args()
    global WARM
    WARM = a.warm
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("bench_start: needs root and /dev/fuse")
        return 1
    codes = ([("before", a.before.resolve())] if a.before else []) + [("after", ROOT)]
    forms = [f for f in a.forms.split(",") if f in ("cli", "api", "zygote")]
    results: dict[str, dict[str, list[dict[str, float]]]] = {lab: {f: [] for f in FORMS} for lab, _ in codes}
    with tempfile.TemporaryDirectory(prefix="bench-start-") as d:
        tmp = Path(d)
        bootstrap, config = build_image(tmp)
        if "zygote" in forms:
            ZYGOTES.update((code, Zygote(code, tmp)) for _lab, code in codes
                           if (code / "nydusd" / "cli" / "zygote.py").exists())
        for _lab, code in codes:  # warm-up: .pyc files written, nothing measured
            for form in forms:
                one_run(code, form, tmp, bootstrap, config)
        for rnd in range(a.rounds):
            order = codes if rnd % 2 == 0 else codes[::-1]
            for form in forms:
                for lab, code in order:
                    results[lab][form].append(one_run(code, form, tmp, bootstrap, config))
            floor = floor_run()  # the same for both: the interpreter and libraries are shared
            for lab, _code in codes:
                results[lab]["floor"].append(floor)
            print(f"round {rnd + 1}/{a.rounds} done", file=sys.stderr)
        for z in ZYGOTES.values():
            z.stop()
    cache = "warm page cache" if WARM else "page cache dropped before each run"
    print(f"nydusd start, {cache}; medians of {a.rounds} paired rounds "
          f"(python {sys.version.split()[0]}, {os.cpu_count()} CPUs)")
    print(table(results, [lab for lab, _ in codes]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
