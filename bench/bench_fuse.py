"""FUSE read-path benchmark: nydusd (real mount, localfs backend + blobcache) against a minimal
llfuse passthrough of the same data, measured in the same run for every row (warm-up, medians of
paired runs: each repetition runs nydusd and the baseline back to back, the ratio is the median of
the per-pair ratios).

Rows, each for nydusd's llfuse session and its own /dev/fuse session (``--fuse-session own``):
- sequential read of a big file (1 GiB; 256 MiB with --quick): the mounted file's page cache is
  dropped before each pass, so every byte goes through the daemon; the blob cache file stays in
  the page cache (a warm node) -- as the passthrough's backing file;
- random 4 KiB reads: ``fio --rw=randread --bs=4k --direct=1 --numjobs=4`` (every read reaches
  the filesystem);
- cold sequential read from localfs: a fresh mount with an empty cache dir and the blob file's
  pages dropped, against the native file read with its pages dropped;
- ``find -printf %s`` over a ~7,000-entry tree: first pass on a fresh mount (a fresh passthrough
  server; native with dentries/inodes dropped), second pass with the kernel's caches warm;
- API mount time and daemon RSS.
Next to throughput each row reports the CPU the serving process used per request (or per MiB, or
per entry): the delta of utime+stime in ``/proc/<pid>/stat`` over the pass, divided by the count.
Needs root, /dev/fuse and fio. Run: ``.venv/bin/python bench/bench_fuse.py [--quick]``
(``--sessions own`` and ``--rows find`` select what runs).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.harness.apiclient import ApiClient  # noqa: E402
from tests.harness.daemon import Nydusd  # noqa: E402
from tests.harness.images import DaemonImage, build_daemon_image  # noqa: E402

MiB = 1 << 20


def drop_file_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_all(path: Path, bs: int = MiB) -> int:
    n = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(bs):
            n += len(chunk)
    return n


def make_big_tree(root: Path, size: int) -> Path:
    root.mkdir(parents=True)
    big = root / "big.bin"
    rnd = random.Random(3)
    with open(big, "wb") as f:
        block = rnd.randbytes(4 * MiB)
        for i in range(size // (4 * MiB)):
            f.write(block[i % 7:] + block[:i % 7])  # distinct chunks, cheap to generate
        f.flush()
        os.fsync(f.fileno())  # dirty pages cannot be dropped: the cold baseline needs them clean
    return big


def make_rootfs_like(root: Path, entries: int = 7000) -> Path:
    """~7,000 entries: nested directories with small files and symlinks, like a minbase rootfs."""
    rnd = random.Random(5)
    made = 0
    d = 0
    while made < entries:
        sub = root / f"usr{d % 4}" / f"lib{d // 4}"
        sub.mkdir(parents=True, exist_ok=True)
        made += 1
        for i in range(24):
            (sub / f"file{i}.so").write_bytes(rnd.randbytes(rnd.randrange(10, 3000)))
            made += 1
        os.symlink(f"file{rnd.randrange(24)}.so", sub / "current")
        made += 1
        d += 1
    return root


def find_sizes(path: Path) -> float:
    t = time.perf_counter()
    subprocess.run(["find", str(path), "-printf", "%s\n"], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def random_iops(path: Path, seconds: float, workers: int = 4) -> float:
    """4 KiB preads at random aligned offsets from ``workers`` threads, with O_DIRECT so that every
    read reaches the filesystem (no page-cache hits after the first touch)."""
    size = path.stat().st_size
    counts = [0] * workers
    stop = time.monotonic() + seconds

    def worker(i: int) -> None:
        rnd = random.Random(i)
        buf = mmap.mmap(-1, 4096)  # page aligned, as O_DIRECT requires
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            n = 0
            while time.monotonic() < stop:
                for _ in range(64):
                    if os.preadv(fd, [buf], rnd.randrange(0, size // 4096) * 4096) != 4096:
                        raise RuntimeError("short read")
                n += 64
            counts[i] = n
        finally:
            os.close(fd)
            buf.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / seconds


def passthrough_server(mountpoint: str, backing: str) -> int:
    """The llfuse ceiling: a minimal read-only passthrough of a file or a directory tree (no cache,
    no checks, same 1 h entry/attr timeouts as nydusd), run as ``bench_fuse.py --passthrough MNT
    SRC`` in its own process. For a file SRC the mount shows it as ``/f``."""
    import errno
    import stat

    import llfuse

    root = backing if os.path.isdir(backing) else os.path.dirname(backing)

    class Ops(llfuse.Operations):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.paths: dict[int, str] = {1: root}
            self.fds: dict[int, int] = {}

        def _attr(self, path: str) -> llfuse.EntryAttributes:
            st = os.lstat(path)
            e = llfuse.EntryAttributes()
            ino = 1 if path == root else st.st_ino
            self.paths[ino] = path
            e.st_ino, e.entry_timeout, e.attr_timeout = ino, 3600, 3600
            e.st_mode, e.st_size, e.st_nlink = st.st_mode, st.st_size, st.st_nlink
            e.st_mtime_ns = st.st_mtime_ns
            return e

        def getattr(self, ino: int, ctx: object = None) -> llfuse.EntryAttributes:
            return self._attr(self.paths[ino])

        def lookup(self, parent: int, name: bytes, ctx: object = None) -> llfuse.EntryAttributes:
            if root != backing and parent == 1:
                if name != b"f":
                    raise llfuse.FUSEError(errno.ENOENT)
                return self._attr(backing)
            try:
                return self._attr(os.path.join(self.paths[parent], os.fsdecode(name)))
            except FileNotFoundError:
                raise llfuse.FUSEError(errno.ENOENT) from None

        def opendir(self, ino: int, ctx: object) -> int:
            return ino

        def readdir(self, fh: int, off: int):  # type: ignore[no-untyped-def]
            entries = sorted(os.scandir(self.paths[fh]), key=lambda e: e.name)
            for i, entry in enumerate(entries[off:], start=off + 1):
                e = llfuse.EntryAttributes()
                e.st_ino, e.st_mode = entry.inode(), stat.S_IFDIR if entry.is_dir() else stat.S_IFREG
                yield os.fsencode(entry.name), e, i

        def open(self, ino: int, flags: int, ctx: object) -> int:
            self.fds[ino] = self.fds.get(ino) or os.open(self.paths[ino], os.O_RDONLY)
            return ino

        def read(self, fh: int, off: int, size: int) -> bytes:
            fd = self.fds[fh]
            with llfuse.lock_released:
                return os.pread(fd, size, off)

    llfuse.init(Ops(), mountpoint, {"fsname=passthrough", "ro", "allow_other", *llfuse.default_options})
    try:
        llfuse.main(workers=int(os.environ.get("PASSTHROUGH_WORKERS", "4")))
    finally:
        llfuse.close()
    return 0


class Passthrough:
    """A running passthrough server (see ``passthrough_server``)."""

    def __init__(self, work: Path, name: str, backing: Path, workers: int = 4) -> None:
        self.mnt = work / name
        self.mnt.mkdir()
        self.proc = subprocess.Popen([sys.executable, __file__, "--passthrough", str(self.mnt),
                                      str(backing)], env={**os.environ, "PASSTHROUGH_WORKERS": str(workers)})
        deadline = time.monotonic() + 15
        while not os.path.ismount(self.mnt):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("passthrough server did not mount")
            time.sleep(0.05)
        # the same 1 MiB kernel readahead nydusd sets (nydusd.fs.session.READAHEAD_KB), so that the
        # calibration differs from nydusd only in the request handling
        from nydusd.fs.session import READAHEAD_KB

        dev = os.stat(self.mnt).st_dev
        with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb", "w") as f:
            f.write(f"{READAHEAD_KB}\n")

    def close(self) -> None:
        subprocess.run(["fusermount", "-u", "-z", str(self.mnt)], check=False)
        self.proc.terminate()
        self.proc.wait(10)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def read_mib(path: Path) -> float:
    return read_all(path) / MiB


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads) in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(fn: Callable[[], Any], pid: int) -> tuple[float, float, Any]:
    """(seconds, CPU seconds of ``pid``, result) of one call."""
    c, t = cpu_seconds(pid), time.perf_counter()
    out = fn()
    return time.perf_counter() - t, cpu_seconds(pid) - c, out


def fio_randread(path: Path, seconds: float) -> int:
    """Requests completed by 4 fio jobs of 4 KiB O_DIRECT random reads in ``seconds``."""
    out = subprocess.run(["fio", "--name=rr", f"--filename={path}", "--rw=randread", "--bs=4k",
                          "--direct=1", "--numjobs=4", "--ioengine=psync", "--readonly",
                          "--time_based", f"--runtime={seconds}", "--group_reporting",
                          "--output-format=json", f"--size={path.stat().st_size}"],
                         check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    return int(job["read"]["total_ios"])


class Pairs:
    """Paired measurements of one row: per repetition (time, cpu, count) of nydusd and baseline."""

    def __init__(self) -> None:
        self.fuse: list[tuple[float, float, float]] = []
        self.base: list[tuple[float, float, float]] = []

    def add(self, fuse: tuple[float, float, float], base: tuple[float, float, float]) -> None:
        self.fuse.append(fuse)
        self.base.append(base)

    @staticmethod
    def rate(runs: list[tuple[float, float, float]]) -> float:
        return statistics.median(n / t for t, _, n in runs)

    @staticmethod
    def cpu(runs: list[tuple[float, float, float]]) -> float:
        return statistics.median(c / n for _, c, n in runs if n)

    def ratio(self) -> float:
        """Median of per-pair rate ratios (nydusd / baseline)."""
        return statistics.median((nf / tf) / (nb / tb) for (tf, _, nf), (tb, _, nb)
                                 in zip(self.fuse, self.base, strict=True))


def row(name: str, fuse: str, base: str, ratio: str, cpu: str, target: str) -> None:
    print(f"{name:<44} {fuse:>10} {base:>10} {ratio:>7} {cpu:>17}  {target}")


class Bench:
    """One benchmark run: images, daemons, baselines, one method per row (results in ``rows``)."""

    def __init__(self, work: Path, size: int, reps: int, quick: bool) -> None:
        self.work, self.size, self.reps, self.quick = work, size, reps, quick
        self.daemons: dict[str, Nydusd] = {}
        self.apis: dict[str, ApiClient] = {}
        self.mounts: dict[str, Path] = {}
        self.pt: Passthrough | None = None
        self.rows: list[tuple[str, str, str, str, str, str]] = []
        self.extra: dict[str, float] = {}
        self.n_cold = 0

    def build(self) -> None:
        print(f"building images in {self.work} ...", flush=True)
        self.big = make_big_tree(self.work / "big_src", self.size)
        self.big_img = build_daemon_image(self.work / "big_src", self.work / "big_img", version=6)
        self.tree_src = make_rootfs_like(self.work / "tree_src")
        self.tree_img = build_daemon_image(self.tree_src, self.work / "tree_img", version=6)
        self.entries = sum(1 for _ in self.tree_src.rglob("*"))

    def start(self, session: str) -> None:
        mnt = self.work / f"mnt_{session}"
        mnt.mkdir()
        sock = str(self.work / f"api_{session}.sock")
        t0 = time.perf_counter()
        self.daemons[session] = Nydusd(["--mountpoint", str(mnt), "--apisock", sock, "--thread-num", "4",
                                        "--fuse-session", session, "--log-level", "warn"], mnt,
                                       log_path=self.work / f"nydusd_{session}.log", apisock=sock).start()
        self.extra[f"startup_{session}"] = time.perf_counter() - t0
        self.apis[session] = ApiClient(sock)
        self.mounts[session] = mnt

    def mount(self, session: str, img: DaemonImage, mp: str, cache: Path | None = None) -> float:
        t = time.perf_counter()
        status, body = self.apis[session].mount(mp, img.bootstrap, img.config_text(
            cache or self.work / "cache", digest_validate=False))
        assert status == 204, body
        return time.perf_counter() - t

    def pid(self, session: str) -> int:
        return self.daemons[session].proc.pid

    def add(self, name: str, pairs: Pairs, unit: str, scale: float, cpu_unit: str, cpu_scale: float,
            target: str) -> None:
        cpu = f"{pairs.cpu(pairs.fuse) * cpu_scale:.1f}/{pairs.cpu(pairs.base) * cpu_scale:.1f} {cpu_unit}"
        self.rows.append((name, f"{pairs.rate(pairs.fuse) * scale:.0f}",
                          f"{pairs.rate(pairs.base) * scale:.0f}", f"{pairs.ratio():.2f}x", cpu, target))
        print(*self.rows[-1], flush=True)

    def data_rows(self, session: str) -> None:
        self.mount(session, self.big_img, "/big")
        fuse_big = self.mounts[session] / "big" / "big.bin"
        read_all(fuse_big)  # fills the blob cache (first fetch from the backend)
        if self.pt is None:
            self.pt = Passthrough(self.work, "pt_file", self.big)
        pt_file, pt_pid = self.pt.mnt / "f", self.pt.proc.pid
        mib = self.size / MiB

        def seq(path: Path) -> float:
            drop_file_cache(path)
            return read_all(path) / MiB
        seq(fuse_big)
        seq(pt_file)
        pairs = Pairs()
        for _ in range(self.reps):
            pairs.add(timed(lambda: seq(fuse_big), self.pid(session)), timed(lambda: seq(pt_file), pt_pid))
        self.add(f"[{session}] sequential {mib:.0f} MiB, warm (MB/s)", pairs, "MB/s", MiB / 1e6,
                 "ms/MiB", 1e3, ">= 0.9x passthrough")
        secs = 3 if self.quick else 5
        pairs = Pairs()
        for _ in range(max(2, self.reps - 1)):
            pairs.add(timed(lambda: fio_randread(fuse_big, secs), self.pid(session)),
                      timed(lambda: fio_randread(pt_file, secs), pt_pid))
        self.add(f"[{session}] random 4 KiB fio direct 4 jobs (IOPS)", pairs, "IOPS", 1.0,
                 "us/req", 1e6, ">= 0.8x passthrough")
        if session == "llfuse":
            # the same passthrough with nydusd's llfuse worker count (--thread-num 4 + the 128 of
            # the backend-wait reserve): the kernel hands requests to idle workers in turn
            wide = Passthrough(self.work, "pt_file_132", self.big, workers=132)
            try:
                wide_pairs = Pairs()
                for _ in range(max(2, self.reps - 1)):
                    wide_pairs.add(timed(lambda: fio_randread(fuse_big, secs), self.pid(session)),
                                   timed(lambda: fio_randread(wide.mnt / "f", secs), wide.proc.pid))
                self.add("  same vs passthrough with 132 workers", wide_pairs, "IOPS", 1.0, "us/req", 1e6,
                         "(worker-pool share of the gap)")
                seq(wide.mnt / "f")
                wide_seq = Pairs()
                for _ in range(self.reps):
                    wide_seq.add(timed(lambda: seq(fuse_big), self.pid(session)),
                                 timed(lambda: seq(wide.mnt / "f"), wide.proc.pid))
                self.add("  sequential vs passthrough with 132 workers", wide_seq, "MB/s", MiB / 1e6,
                         "ms/MiB", 1e3, "(worker-pool share of the gap)")
            finally:
                wide.close()
        pairs = Pairs()
        blobs = [f for f in Path(self.big_img.blob_dir).glob("*") if f.is_file()]
        for _ in range(self.reps):
            self.n_cold += 1
            cache = self.work / f"cold_cache{self.n_cold}"
            self.mount(session, self.big_img, f"/cold{self.n_cold}", cache)
            path = self.mounts[session] / f"cold{self.n_cold}" / "big.bin"
            for f in blobs:
                drop_file_cache(f)
            fuse = timed(partial(read_mib, path), self.pid(session))
            self.apis[session].umount(f"/cold{self.n_cold}")
            shutil.rmtree(cache, ignore_errors=True)
            pairs.add(fuse, timed(partial(seq, self.big), os.getpid()))
        self.add(f"[{session}] cold sequential from localfs (MB/s)", pairs, "MB/s", MiB / 1e6,
                 "ms/MiB", 1e3, ">= 0.5x native (baseline: native cold)")

    def find_rows(self, session: str) -> None:
        tree = self.tree_src

        def native_cold_find() -> float:
            with open("/proc/sys/vm/drop_caches", "w") as f:   # dentries and inodes, not data
                f.write("2\n")
            return find_sizes(tree)
        first, second, native_first, native_second = Pairs(), Pairs(), Pairs(), Pairs()
        mounts = []
        n = self.entries
        for i in range(self.reps):
            mounts.append(self.mount(session, self.tree_img, f"/tree{i}"))
            mp = self.mounts[session] / f"tree{i}"
            f1 = timed(partial(find_sizes, mp), self.pid(session))
            f2 = min((timed(partial(find_sizes, mp), self.pid(session)) for _ in range(2)),
                     key=lambda r: r[0])
            server = Passthrough(self.work, f"pt_tree_{session}{i}", tree)
            try:
                p1 = timed(partial(find_sizes, server.mnt), server.proc.pid)
                p2 = min((timed(partial(find_sizes, server.mnt), server.proc.pid) for _ in range(2)),
                         key=lambda r: r[0])
            finally:
                server.close()
            first.add((f1[0], f1[1], n), (p1[0], p1[1], n))
            second.add((f2[0], f2[1], n), (p2[0], p2[1], n))
            t = native_cold_find()
            native_first.add((f1[0], f1[1], n), (t, 0.0, n))
            t = find_sizes(tree)
            native_second.add((f2[0], f2[1], n), (t, 0.0, n))
        self.add(f"[{session}] find {n} entries, 1st pass (entries/s)", first, "entries/s", 1.0,
                 "us/entry", 1e6, "(vs passthrough)")
        self.add("  same vs native, dentries dropped", native_first, "entries/s", 1.0, "us/entry", 1e6,
                 "<= 3x native time (own session)" if session == "own" else "")
        self.add(f"[{session}] find {n} entries, 2nd pass (entries/s)", second, "entries/s", 1.0,
                 "us/entry", 1e6, "(vs passthrough)")
        self.add("  same vs native, dentries cached", native_second, "entries/s", 1.0, "us/entry", 1e6, "")
        self.extra[f"mount_ms_{session}"] = statistics.median(mounts) * 1000
        self.extra[f"rss_mb_{session}"] = rss_mb(self.pid(session))

    def report(self) -> None:
        print()
        row("benchmark", "nydusd", "baseline", "ratio", "cpu nydusd/base", "target")
        for r in self.rows:
            row(*r)
        for k, v in self.extra.items():
            print(f"{k:<44} {v:10.1f}")

    def close(self) -> None:
        if self.pt is not None:
            self.pt.close()
        for daemon in self.daemons.values():
            daemon.terminate()
            daemon.cleanup()
        shutil.rmtree(self.work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="256 MiB file, fewer repetitions")
    ap.add_argument("--sessions", default="llfuse,own", help="FUSE sessions to measure")
    ap.add_argument("--rows", default="data,find", help="row groups to run: data (read rows), find")
    ap.add_argument("--passthrough", nargs=2, metavar=("MNT", "FILE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.passthrough:
        return passthrough_server(*args.passthrough)
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("bench_fuse: needs root and /dev/fuse", file=sys.stderr)
        return 2
    bench = Bench(Path(tempfile.mkdtemp(prefix="bench-fuse-")),
                  (256 if args.quick else 1024) * MiB, 3 if args.quick else 5, args.quick)
    try:
        rows = args.rows.split(",")
        bench.build()
        for session in args.sessions.split(","):
            bench.start(session)
            if "data" in rows:
                bench.data_rows(session)
            if "find" in rows:
                bench.find_rows(session)
        bench.report()
        return 0
    finally:
        bench.close()


if __name__ == "__main__":
    raise SystemExit(main())
