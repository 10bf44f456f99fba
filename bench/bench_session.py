"""FUSE session benchmark: our own /dev/fuse session (``--fuse-session own``: 1 MiB reads through
max_pages, readdirplus) against the llfuse session (libfuse2: 128 KiB reads, no readdirplus),
measured in the same run over the same images, plus the failover and hot-upgrade pauses.

Rows (medians of ``reps`` runs after a warm-up run; one shared daemon per session, 4 FUSE workers
each, localfs backend + blobcache, the blob cache warm in the page cache; both daemons run side by
side and every measurement alternates between them, so load on the shared machine hits both):
- sequential read of a big file, its page cache dropped before each pass (every byte through the
  daemon);
- random 4 KiB preads, 4 threads, O_DIRECT (every read reaches the daemon), for ``seconds`` s;
- ``find -printf %s`` over a ~7,000-entry tree: first pass right after the image was (re)mounted
  through the API (kernel caches empty), second pass (kernel caches warm);
- failover (own session only, the snapshotter's flow): ``kill -9`` of the daemon while a reader
  does 4 KiB O_DIRECT reads; the same command is started again (crash detected -> INIT), takeover
  from a supervisor, start. Reported: the reader's stall (last read before the kill to first read
  after it) and its parts: process start to INIT, takeover, start;
- hot upgrade (own session): successor started beforehand with ``--upgrade``; sendfd, takeover,
  exit of the old daemon, start of the new: the reader's longest stall.
Needs root and /dev/fuse. Run: ``.venv/bin/python bench/bench_session.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_fuse import (  # noqa: E402
    MiB,
    drop_file_cache,
    find_sizes,
    make_big_tree,
    make_rootfs_like,
    random_iops,
    read_all,
)

from tests.harness.apiclient import ApiClient  # noqa: E402
from tests.harness.daemon import Nydusd  # noqa: E402
from tests.harness.images import build_daemon_image  # noqa: E402
from tests.harness.spec_supervisor import SpecSupervisor  # noqa: E402


def wait_state(api: ApiClient, state: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if api.info()["state"] == state:
                return
        except (OSError, AssertionError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"state {state} not reached")
        time.sleep(0.005)


METER = r"""
import json, mmap, os, sys, time
path, out, stop = sys.argv[1:4]
size = os.stat(path).st_size
buf = mmap.mmap(-1, 4096)
fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
last, off, gaps, errors = time.monotonic(), 0, [], 0
while not os.path.exists(stop):
    try:
        os.preadv(fd, [buf], off)
    except OSError:
        errors += 1
    now = time.monotonic()
    if now - last > 0.005:
        gaps.append((last, now - last))
    last = now
    off = (off + (1 << 20)) % (size - 4096) // 4096 * 4096
with open(out, "w") as f:
    json.dump({"gaps": gaps, "errors": errors}, f)
"""


class StallMeter:
    """A process doing 4 KiB O_DIRECT preads over a file, recording gaps between reads. A process,
    not a thread: a process holding files of a FUSE mount whose daemon is dead must not fork (the
    child's close of the inherited fds waits for FUSE_FLUSH, which nobody answers yet)."""

    def __init__(self, path: Path, work: Path) -> None:
        self.out, self.stop = work / "meter.json", work / "meter.stop"
        for f in (self.out, self.stop):
            f.unlink(missing_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-c", METER, str(path), str(self.out),
                                      str(self.stop)])
        time.sleep(0.2)
        self.gaps: list[tuple[float, float]] = []
        self.errors = 0

    def finish(self) -> None:
        self.stop.write_text("")
        self.proc.wait(60)
        result = json.loads(self.out.read_text())
        self.gaps = [tuple(g) for g in result["gaps"]]
        self.errors = result["errors"]

    def stall_after(self, t: float) -> float:
        return max((g for start, g in self.gaps if start + g >= t), default=0.0)


class SessionBench:
    def __init__(self, work: Path, size: int, reps: int, seconds: float) -> None:
        self.work, self.size, self.reps, self.seconds = work, size, reps, seconds
        self.r: dict[str, dict[str, float]] = {"llfuse": {}, "own": {}}

    def build(self) -> None:
        print(f"building images in {self.work} ...", flush=True)
        make_big_tree(self.work / "big_src", self.size)
        self.big_img = build_daemon_image(self.work / "big_src", self.work / "big_img", version=6)
        make_rootfs_like(self.work / "tree_src")
        self.tree_img = build_daemon_image(self.work / "tree_src", self.work / "tree_img", version=6)

    def _daemon(self, name: str, *extra: str) -> list[str]:
        return ["fuse", "--mountpoint", str(self.work / name / "mnt"), "--apisock",
                str(self.work / name / "api.sock"), "--thread-num", "4", "--log-level", "warn", *extra]

    def _mount_images(self, api: ApiClient, name: str, tree: bool = True) -> None:
        for path, image in (("/big", self.big_img), ("/tree", self.tree_img))[:2 if tree else 1]:
            status, body = api.mount(path, image.bootstrap,
                                     image.config_text(self.work / name / f"cache{path}"))
            if status != 204:
                raise RuntimeError(body)

    def sessions(self) -> None:
        """Both daemons up at once; every measurement alternates between them rep by rep (order
        swapped each rep), so a load change on the shared machine hits both alike."""
        daemons, apis, samples = [], {}, {s: {k: [] for k in ("seq", "rand", "find1", "find2")}
                                          for s in self.r}
        try:
            for session in self.r:
                base = self.work / session
                (base / "mnt").mkdir(parents=True)
                sock = str(base / "api.sock")
                daemons.append(Nydusd(self._daemon(session, "--fuse-session", session), base / "mnt",
                                      log_path=base / "d.log", apisock=sock).start())
                apis[session] = ApiClient(sock)
                self._mount_images(apis[session], session)
                big = base / "mnt" / "big" / "big.bin"
                read_all(big)  # fill the blob cache
                random_iops(big, 0.5)  # warm-up
                find_sizes(base / "mnt" / "tree")
            for rep in range(self.reps):
                for session in (list(self.r) if rep % 2 else list(self.r)[::-1]):
                    base = self.work / session
                    big, tree = base / "mnt" / "big" / "big.bin", base / "mnt" / "tree"
                    drop_file_cache(big)
                    t = time.perf_counter()
                    read_all(big)
                    samples[session]["seq"].append(self.size / MiB / (time.perf_counter() - t))
                    samples[session]["rand"].append(random_iops(big, self.seconds))
                    apis[session].umount("/tree")
                    apis[session].mount("/tree", self.tree_img.bootstrap,
                                        self.tree_img.config_text(base / "cache/tree"))
                    samples[session]["find1"].append(find_sizes(tree))
                    samples[session]["find2"].append(find_sizes(tree))
            for session, values in samples.items():
                for key, vals in values.items():
                    self.r[session][key] = statistics.median(vals)
        finally:
            for d in daemons:
                d.terminate()
                d.cleanup()

    def failover(self) -> None:
        base = self.work / "failover"
        (base / "mnt").mkdir(parents=True)
        sock = str(base / "api.sock")
        sup = SpecSupervisor(str(base / "sup.sock"))
        args = self._daemon("failover", "--id", "bench", "--supervisor", str(base / "sup.sock"))
        d = Nydusd(args, base / "mnt", log_path=base / "d0.log", apisock=sock).start()
        api = ApiClient(sock)
        daemons = [d]
        stalls, parts = [], []
        try:
            self._mount_images(api, "failover", tree=False)
            for i in range(self.reps):
                t = sup.expect_sendfd()
                api.request("PUT", "/api/v1/daemon/fuse/sendfd")
                t.join()
                meter = StallMeter(base / "mnt" / "big" / "big.bin", base)
                time.sleep(0.3)
                d.proc.send_signal(signal.SIGKILL)
                killed = time.monotonic()
                d.proc.wait()
                d = Nydusd(args, base / "mnt", log_path=base / f"d{i + 1}.log", apisock=sock)
                daemons.append(d)
                d.start(wait_mount=False)
                wait_state(api, "INIT")
                t_init = time.monotonic()
                t = sup.expect_takeover()
                api.request("PUT", "/api/v1/daemon/fuse/takeover")
                t.join()
                t_take = time.monotonic()
                api.request("PUT", "/api/v1/daemon/start")
                t_start = time.monotonic()
                time.sleep(0.3)
                meter.finish()
                if meter.errors:
                    raise RuntimeError(f"{meter.errors} failed reads during failover")
                stalls.append(meter.stall_after(killed))
                parts.append((t_init - killed, t_take - t_init, t_start - t_take))
            self.r["own"]["failover"] = statistics.median(stalls)
            self.r["own"]["to_init"] = statistics.median(p[0] for p in parts)
            self.r["own"]["takeover"] = statistics.median(p[1] for p in parts)
            self.r["own"]["start"] = statistics.median(p[2] for p in parts)
            self.r["own"]["upgrade"] = self.hot_upgrade(base, args, d, api, sup, daemons)
        finally:
            for daemon in reversed(daemons):
                daemon.terminate()
                daemon.cleanup()
            sup.close()

    def hot_upgrade(self, base: Path, args: list[str], d: Nydusd, api: ApiClient,
                    sup: SpecSupervisor, daemons: list[Nydusd]) -> float:
        stalls = []
        for i in range(self.reps):
            sock = str(base / f"up{i}.sock")
            new_args = [*args, "--upgrade"]
            new_args[new_args.index("--apisock") + 1] = sock
            new = Nydusd(new_args, base / "mnt", log_path=base / f"up{i}.log", apisock=sock)
            daemons.append(new)
            new.start(wait_mount=False)
            new_api = ApiClient(sock)
            wait_state(new_api, "INIT")
            meter = StallMeter(base / "mnt" / "big" / "big.bin", base)
            time.sleep(0.2)
            begin = time.monotonic()
            t = sup.expect_sendfd()
            api.request("PUT", "/api/v1/daemon/fuse/sendfd")
            t.join()
            t = sup.expect_takeover()
            new_api.request("PUT", "/api/v1/daemon/fuse/takeover")
            t.join()
            api.request("PUT", "/api/v1/daemon/exit")
            d.proc.wait(30)
            new_api.request("PUT", "/api/v1/daemon/start")
            time.sleep(0.3)
            meter.finish()
            if meter.errors:
                raise RuntimeError(f"{meter.errors} failed reads during the upgrade")
            stalls.append(meter.stall_after(begin))
            d, api = new, new_api
        return statistics.median(stalls)

    def report(self) -> None:
        ll, own = self.r["llfuse"], self.r["own"]
        print(f"\n{'measurement':<44} {'own':>12} {'llfuse':>12} {'own/llfuse':>11}")

        def line(name: str, key: str, unit: str, higher_better: bool = True) -> None:
            a, b = own[key], ll[key]
            print(f"{name:<44} {a:>9.1f} {unit:<2} {b:>9.1f} {unit:<2} {a / b:>10.2f}x"
                  + ("" if higher_better else "  (time: lower is better)"))

        line("sequential read (MiB/s)", "seq", "")
        line("random 4 KiB O_DIRECT, 4 threads (IOPS)", "rand", "")
        own_ms = {k: v * 1000 for k, v in own.items() if k.startswith("find")}
        ll_ms = {k: v * 1000 for k, v in ll.items() if k.startswith("find")}
        for key, name in (("find1", "find, first pass after mount (ms)"),
                          ("find2", "find, second pass (ms)")):
            print(f"{name:<44} {own_ms[key]:>9.1f}    {ll_ms[key]:>9.1f}    "
                  f"{own_ms[key] / ll_ms[key]:>10.2f}x  (time: lower is better)")
        print(f"\n{'own session hand-over (medians)':<44} {'seconds':>12}")
        for key, name in (("failover", "kill -9 -> reads flowing again (reader stall)"),
                          ("to_init", "  of which: new process to INIT"),
                          ("takeover", "  takeover (state + fd, mounts rebuilt)"),
                          ("start", "  start"),
                          ("upgrade", "hot upgrade: longest reader stall")):
            print(f"{name:<44} {own[key]:>12.3f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="64 MiB file, 3 reps, 2 s IOPS runs")
    args = p.parse_args()
    size, reps, seconds = (64 * MiB, 3, 2.0) if args.quick else (256 * MiB, 5, 3.0)
    with tempfile.TemporaryDirectory(prefix="bench-session-") as tmp:
        bench = SessionBench(Path(tmp), size, reps, seconds)
        bench.build()
        print("measuring the llfuse and own sessions (alternating) ...", flush=True)
        bench.sessions()
        print("measuring failover and hot upgrade ...", flush=True)
        bench.failover()
        bench.report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
