"""FUSE read-path benchmark: nydusd (real mount, localfs backend + blobcache) against the native
filesystem the image was built from, measured in the same run (warm-up, medians).

Rows: sequential read of a big file (1 GiB; 256 MiB with --quick), also against a minimal llfuse
passthrough of the same file (the ceiling of any llfuse filesystem here); random 4 KiB pread IOPS
with 4 worker threads (O_DIRECT: every read reaches the filesystem); ``find -printf %s`` over a
~7,000-entry tree (first pass on a fresh mount, second pass with the kernel's entry/attr caches
warm); API mount time; daemon RSS.

Cache states, stated per row (every figure is a median of ``reps`` runs after a warm-up run):
- "nydusd" sequential: the mounted file's page cache is dropped (posix_fadvise DONTNEED) before
  each pass, so every byte goes through the daemon; the blob cache file stays in the page cache
  (a warm node). Its like-for-like calibration is the minimal llfuse passthrough, whose backing
  file is also in the page cache.
- "nydusd cold": the blob cache files' pages are dropped too, so the daemon reads from the disk --
  compared with the native file with its pages dropped (both cold w.r.t. the page cache).
- ``--thread-num 1``: the same warm read through a daemon with one FUSE worker (upstream's default;
  the main run uses 4).
- find: first pass on a fresh mount vs native with dentries/inodes dropped
  (/proc/sys/vm/drop_caches=2) and vs the passthrough's first pass; second pass vs native warm.
Needs root and /dev/fuse. Run: ``.venv/bin/python bench/bench_fuse.py [--quick]``.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.harness.apiclient import ApiClient  # noqa: E402
from tests.harness.daemon import Nydusd  # noqa: E402
from tests.harness.images import DaemonImage, build_daemon_image  # noqa: E402

MiB = 1 << 20


def median_time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


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
        llfuse.main(workers=4)
    finally:
        llfuse.close()
    return 0


class Passthrough:
    """A running passthrough server (see ``passthrough_server``)."""

    def __init__(self, work: Path, name: str, backing: Path) -> None:
        self.mnt = work / name
        self.mnt.mkdir()
        self.proc = subprocess.Popen([sys.executable, __file__, "--passthrough", str(self.mnt),
                                      str(backing)])
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


def measure_passthrough(work: Path, backing: Path, reps: int) -> float:
    """Median seconds to read ``backing`` through the minimal llfuse passthrough (page cache dropped)."""
    server = Passthrough(work, "pt_file", backing)
    try:
        def one() -> None:
            drop_file_cache(server.mnt / "f")
            read_all(server.mnt / "f")
        return median_time(one, reps)
    finally:
        server.close()


def measure_passthrough_find(work: Path, tree: Path, reps: int) -> tuple[float, float]:
    """``find`` first pass (a fresh server each time) and second pass through the passthrough."""
    firsts, seconds = [], []
    for i in range(reps):
        server = Passthrough(work, f"pt_tree{i}", tree)
        try:
            firsts.append(find_sizes(server.mnt))
            seconds.append(min(find_sizes(server.mnt) for _ in range(2)))
        finally:
            server.close()
    return statistics.median(firsts), statistics.median(seconds)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def row(name: str, fuse: str, native: str, ratio: str, target: str) -> None:
    print(f"{name:<38} {fuse:>14} {native:>14} {ratio:>9}  {target}")


class Bench:
    """One benchmark run: the images, the daemon, and one method per measurement (results in ``r``)."""

    def __init__(self, work: Path, size: int, reps: int, quick: bool) -> None:
        self.work, self.size, self.reps, self.quick = work, size, reps, quick
        self.r: dict[str, float] = {}
        self.daemon: Nydusd | None = None

    def build(self) -> None:
        print(f"building images in {self.work} ...", flush=True)
        self.big = make_big_tree(self.work / "big_src", self.size)
        self.big_img = build_daemon_image(self.work / "big_src", self.work / "big_img", version=6)
        self.tree_src = make_rootfs_like(self.work / "tree_src")
        self.tree_img = build_daemon_image(self.tree_src, self.work / "tree_img", version=6)
        self.entries = sum(1 for _ in self.tree_src.rglob("*"))

    def start(self) -> None:
        self.mnt = self.work / "mnt"
        self.mnt.mkdir()
        sock = str(self.work / "api.sock")
        t0 = time.perf_counter()
        self.daemon = Nydusd(["--mountpoint", str(self.mnt), "--apisock", sock, "--thread-num", "4",
                              "--log-level", "warn"], self.mnt, log_path=self.work / "nydusd.log",
                             apisock=sock).start()
        self.r["startup"] = time.perf_counter() - t0
        self.api = ApiClient(sock)

    def mount(self, img: DaemonImage, mp: str) -> float:
        t = time.perf_counter()
        status, body = self.api.mount(mp, img.bootstrap, img.config_text(self.work / "cache",
                                                                         digest_validate=False))
        assert status == 204, body
        return time.perf_counter() - t

    def sequential(self) -> None:
        self.mount(self.big_img, "/big")
        self.fuse_big = fuse_big = self.mnt / "big" / "big.bin"
        read_all(fuse_big)  # fills the blob cache (first fetch from the backend)
        big = self.big
        self.r["native_seq"] = median_time(lambda: read_all(big), self.reps)

        def cold(path: Path) -> None:
            drop_file_cache(path)
            read_all(path)
        self.r["native_cold_seq"] = median_time(lambda: cold(big), self.reps)
        self.r["ceiling_seq"] = measure_passthrough(self.work, big, self.reps)
        self.r["fuse_seq"] = median_time(lambda: cold(fuse_big), self.reps)
        cache_files = [f for f in (self.work / "cache").rglob("*") if f.is_file()]

        def fully_cold() -> None:
            for f in cache_files:
                drop_file_cache(f)
            cold(fuse_big)
        self.r["fuse_cold_seq"] = median_time(fully_cold, self.reps)
        self.r["fuse_seq_1thr"] = self.one_worker_sequential()

    def one_worker_sequential(self) -> float:
        mnt = self.work / "mnt1"
        mnt.mkdir()
        sock = str(self.work / "api1.sock")
        daemon = Nydusd(["--mountpoint", str(mnt), "--apisock", sock, "--thread-num", "1",
                         "--log-level", "warn"], mnt, log_path=self.work / "nydusd1.log",
                        apisock=sock).start()
        try:
            status, body = ApiClient(sock).mount("/big", self.big_img.bootstrap, self.big_img.config_text(
                self.work / "cache", digest_validate=False))
            assert status == 204, body
            path = mnt / "big" / "big.bin"

            def one() -> None:
                drop_file_cache(path)
                read_all(path)
            return median_time(one, self.reps)
        finally:
            daemon.terminate()
            daemon.cleanup()

    def iops(self) -> None:
        drop_file_cache(self.fuse_big)
        secs = 2.0 if self.quick else 4.0
        self.r["fuse_iops"] = statistics.median(
            [random_iops(self.fuse_big, secs) for _ in range(1 if self.quick else 3)])
        self.r["native_iops"] = random_iops(self.big, secs)

    def find(self) -> None:
        tree = self.tree_src
        self.r["native_find"] = median_time(lambda: find_sizes(tree), self.reps)

        def native_cold_find() -> float:
            # drop dentries and inodes (not data pages): what a first walk of a fresh tree costs
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("2\n")
            return find_sizes(tree)
        self.r["native_cold_find"] = statistics.median(native_cold_find() for _ in range(self.reps))
        firsts, seconds, mounts = [], [], []
        for i in range(self.reps):
            mounts.append(self.mount(self.tree_img, f"/tree{i}"))
            firsts.append(find_sizes(self.mnt / f"tree{i}"))
            seconds.append(min(find_sizes(self.mnt / f"tree{i}") for _ in range(2)))
        self.r.update(first=statistics.median(firsts), second=statistics.median(seconds),
                      mount=statistics.median(mounts))
        self.r["pt_first"], self.r["pt_second"] = measure_passthrough_find(self.work, tree, self.reps)
        assert self.daemon is not None
        self.r["rss"] = rss_mb(self.daemon.proc.pid)

    def report(self) -> None:
        r, size = self.r, self.size
        mbs = size / r["fuse_seq"] / 1e6
        print()
        row("benchmark", "nydusd", "native", "ratio", "target")
        row(f"sequential read {size // MiB} MiB (MB/s)", f"{mbs:.0f}", f"{size / r['native_seq'] / 1e6:.0f}",
            f"{r['native_seq'] / r['fuse_seq']:.2f}x", "(native page cache)")
        row("  vs native read from disk (MB/s)", f"{mbs:.0f}", f"{size / r['native_cold_seq'] / 1e6:.0f}",
            f"{r['native_cold_seq'] / r['fuse_seq']:.2f}x", ">= 0.6x")
        row("  minimal llfuse passthrough (MB/s)", f"{mbs:.0f}", f"{size / r['ceiling_seq'] / 1e6:.0f}",
            f"{r['ceiling_seq'] / r['fuse_seq']:.2f}x", "(llfuse ceiling, backing warm)")
        cold_mbs = size / r["fuse_cold_seq"] / 1e6
        row("  nydusd cold vs native cold (MB/s)", f"{cold_mbs:.0f}",
            f"{size / r['native_cold_seq'] / 1e6:.0f}", f"{r['native_cold_seq'] / r['fuse_cold_seq']:.2f}x",
            ">= 0.6x (both from disk)")
        one_mbs = size / r["fuse_seq_1thr"] / 1e6
        row("  --thread-num 1 vs native cold (MB/s)", f"{one_mbs:.0f}",
            f"{size / r['native_cold_seq'] / 1e6:.0f}", f"{r['native_cold_seq'] / r['fuse_seq_1thr']:.2f}x",
            "(blob cache warm)")
        row("random 4 KiB O_DIRECT pread, 4 thr (IOPS)", f"{r['fuse_iops']:.0f}",
            f"{r['native_iops']:.0f}", f"{r['fuse_iops'] / r['native_iops']:.3f}x", ">= 15000 IOPS")
        row(f"find -printf %s, {self.entries} entries, 1st (s)", f"{r['first']:.3f}",
            f"{r['native_find']:.3f}", f"{r['first'] / r['native_find']:.1f}x", "(native dentries cached)")
        row("  vs native with dentries dropped (s)", f"{r['first']:.3f}", f"{r['native_cold_find']:.3f}",
            f"{r['first'] / r['native_cold_find']:.1f}x", "<= 5x")
        row("  minimal llfuse passthrough (s)", f"{r['first']:.3f}", f"{r['pt_first']:.3f}",
            f"{r['first'] / r['pt_first']:.1f}x", "(llfuse ceiling)")
        row("find -printf %s, 2nd pass (s)", f"{r['second']:.3f}", f"{r['native_find']:.3f}",
            f"{r['second'] / r['native_find']:.1f}x", "<= 2x")
        row("  minimal llfuse passthrough (s)", f"{r['second']:.3f}", f"{r['pt_second']:.3f}",
            f"{r['second'] / r['pt_second']:.1f}x", "(llfuse ceiling)")
        row("API mount of the tree image (ms)", f"{r['mount'] * 1000:.1f}", "-", "-", "")
        row("daemon start to RUNNING socket (ms)", f"{r['startup'] * 1000:.0f}", "-", "-", "")
        row("daemon RSS after the run (MB)", f"{r['rss']:.1f}", "-", "-", "<= 100 MB")
        print(json.dumps({k: round(v, 4) for k, v in r.items()}))

    def close(self) -> None:
        if self.daemon is not None:
            self.daemon.terminate()
            self.daemon.cleanup()
        shutil.rmtree(self.work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="256 MiB file, fewer repetitions")
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
        bench.build()
        bench.start()
        bench.sequential()
        bench.iops()
        bench.find()
        bench.report()
        return 0
    finally:
        bench.close()


if __name__ == "__main__":
    raise SystemExit(main())
