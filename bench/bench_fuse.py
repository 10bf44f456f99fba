"""FUSE read-path benchmark: nydusd (real mount, localfs backend + blobcache) against the native
filesystem the image was built from, measured in the same run (warm-up, medians).

Rows: sequential read of a big file (1 GiB; 256 MiB with --quick), also against a minimal llfuse
passthrough of the same file (the ceiling of any llfuse filesystem here); random 4 KiB pread IOPS
with 4 worker threads (O_DIRECT: every read reaches the filesystem); ``find -printf %s`` over a
~7,000-entry tree (first pass on a fresh mount, second pass with the kernel's entry/attr caches
warm); API mount time; daemon RSS.

FUSE reads are made to reach the daemon by dropping the kernel's page cache of the mounted file with
posix_fadvise(DONTNEED) before each pass (the blob cache file stays warm, like a warm node).
Two native baselines are printed: the source file/tree with the page/dentry caches warm, and
"cold" (the source file's pages dropped with fadvise; dentries/inodes dropped via
/proc/sys/vm/drop_caches=2), the state a freshly pulled image is in. Needs root and /dev/fuse.
Run: ``.venv/bin/python bench/bench_fuse.py [--quick]``.
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

from tests.integration.apiclient import ApiClient  # noqa: E402
from tests.integration.images import Image, build_image  # noqa: E402
from tests.integration.proc import Nydusd  # noqa: E402

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
    """The llfuse ceiling: a minimal read-only passthrough of one file (no metadata, no cache, no
    checks), run as ``bench_fuse.py --passthrough MNT FILE`` in its own process."""
    import errno
    import stat

    import llfuse

    class Ops(llfuse.Operations):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.fd = os.open(backing, os.O_RDONLY)
            self.size = os.fstat(self.fd).st_size

        def _attr(self, ino: int) -> llfuse.EntryAttributes:
            e = llfuse.EntryAttributes()
            e.st_ino, e.entry_timeout, e.attr_timeout = ino, 3600, 3600
            e.st_mode = stat.S_IFDIR | 0o755 if ino == 1 else stat.S_IFREG | 0o644
            e.st_size = 0 if ino == 1 else self.size
            return e

        def getattr(self, ino: int, ctx: object = None) -> llfuse.EntryAttributes:
            return self._attr(ino)

        def lookup(self, parent: int, name: bytes, ctx: object = None) -> llfuse.EntryAttributes:
            if name != b"f":
                raise llfuse.FUSEError(errno.ENOENT)
            return self._attr(2)

        def open(self, ino: int, flags: int, ctx: object) -> int:
            return 1

        def read(self, fh: int, off: int, size: int) -> bytes:
            with llfuse.lock_released:
                return os.pread(self.fd, size, off)

    llfuse.init(Ops(), mountpoint, {"fsname=passthrough", "ro", "allow_other", *llfuse.default_options})
    try:
        llfuse.main(workers=4)
    finally:
        llfuse.close()
    return 0


def measure_passthrough(work: Path, backing: Path, reps: int) -> float:
    """Median seconds to read ``backing`` through the minimal llfuse passthrough (page cache dropped)."""
    mnt = work / "pt_mnt"
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, __file__, "--passthrough", str(mnt), str(backing)])
    try:
        deadline = time.monotonic() + 15
        while not os.path.ismount(mnt):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("passthrough server did not mount")
            time.sleep(0.05)

        def one() -> None:
            drop_file_cache(mnt / "f")
            read_all(mnt / "f")
        return median_time(one, reps)
    finally:
        subprocess.run(["fusermount", "-u", "-z", str(mnt)], check=False)
        proc.terminate()
        proc.wait(10)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def row(name: str, fuse: str, native: str, ratio: str, target: str) -> None:
    print(f"{name:<38} {fuse:>14} {native:>14} {ratio:>9}  {target}")


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
    size = (256 if args.quick else 1024) * MiB
    reps = 3 if args.quick else 5
    work = Path(tempfile.mkdtemp(prefix="bench-fuse-"))
    d = None
    try:
        print(f"building images in {work} ...", flush=True)
        big_src = work / "big_src"
        big = make_big_tree(big_src, size)
        big_img = build_image(big_src, work / "big_img", version=6, compressor="zstd")
        tree_src = make_rootfs_like(work / "tree_src")
        tree_img = build_image(tree_src, work / "tree_img", version=6)
        n_entries = sum(1 for _ in tree_src.rglob("*"))

        mnt = work / "mnt"
        mnt.mkdir()
        sock = str(work / "api.sock")
        t0 = time.perf_counter()
        d = Nydusd(["--mountpoint", str(mnt), "--apisock", sock, "--thread-num", "4",
                    "--log-level", "warn"], mnt, log_path=work / "nydusd.log", apisock=sock).start()
        startup = time.perf_counter() - t0
        api = ApiClient(sock)

        def mount(img: Image, mp: str) -> float:
            t = time.perf_counter()
            status, body = api.mount(mp, img.bootstrap, img.config_text(work / "cache",
                                                                       digest_validate=False))
            assert status == 204, body
            return time.perf_counter() - t

        mount(big_img, "/big")
        fuse_big = mnt / "big" / "big.bin"
        read_all(fuse_big)  # fills the blob cache (first fetch from the backend)

        native_seq = median_time(lambda: read_all(big), reps)

        def native_cold_pass() -> None:
            drop_file_cache(big)
            read_all(big)
        native_cold_seq = median_time(native_cold_pass, reps)
        ceiling_seq = measure_passthrough(work, big, reps)

        def fuse_pass() -> None:
            drop_file_cache(fuse_big)
            read_all(fuse_big)
        fuse_seq = median_time(fuse_pass, reps)

        drop_file_cache(fuse_big)
        iops_secs = 2.0 if args.quick else 4.0
        fuse_iops = statistics.median(
            [random_iops(fuse_big, iops_secs) for _ in range(1 if args.quick else 3)])
        native_iops = random_iops(big, iops_secs)

        native_find = median_time(lambda: find_sizes(tree_src), reps)

        def native_cold_find() -> float:
            # drop dentries and inodes (not data pages): what a first walk of a fresh tree costs
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("2\n")
            return find_sizes(tree_src)
        native_cold_find_t = statistics.median(native_cold_find() for _ in range(reps))
        firsts, seconds, mounts = [], [], []
        for i in range(reps):
            mounts.append(mount(tree_img, f"/tree{i}"))
            firsts.append(find_sizes(mnt / f"tree{i}"))
            seconds.append(min(find_sizes(mnt / f"tree{i}") for _ in range(2)))
        first, second = statistics.median(firsts), statistics.median(seconds)
        rss = rss_mb(d.proc.pid)

        print()
        row("benchmark", "nydusd", "native", "ratio", "target")
        row(f"sequential read {size // MiB} MiB (MB/s)", f"{size / fuse_seq / 1e6:.0f}",
            f"{size / native_seq / 1e6:.0f}", f"{native_seq / fuse_seq:.2f}x", "(native page cache)")
        row("  vs native read from disk (MB/s)", f"{size / fuse_seq / 1e6:.0f}",
            f"{size / native_cold_seq / 1e6:.0f}", f"{native_cold_seq / fuse_seq:.2f}x", ">= 0.6x")
        row("  minimal llfuse passthrough (MB/s)", f"{size / fuse_seq / 1e6:.0f}",
            f"{size / ceiling_seq / 1e6:.0f}", f"{ceiling_seq / fuse_seq:.2f}x", "(llfuse ceiling)")
        row("random 4 KiB O_DIRECT pread, 4 thr (IOPS)", f"{fuse_iops:.0f}", f"{native_iops:.0f}",
            f"{fuse_iops / native_iops:.3f}x", ">= 15000 IOPS")
        row(f"find -printf %s, {n_entries} entries, 1st (s)", f"{first:.3f}", f"{native_find:.3f}",
            f"{first / native_find:.1f}x", "(native dentries cached)")
        row("  vs native with dentries dropped (s)", f"{first:.3f}", f"{native_cold_find_t:.3f}",
            f"{first / native_cold_find_t:.1f}x", "<= 5x")
        row("find -printf %s, 2nd pass (s)", f"{second:.3f}", f"{native_find:.3f}",
            f"{second / native_find:.1f}x", "<= 2x")
        row("API mount of the tree image (ms)", f"{statistics.median(mounts) * 1000:.1f}", "-", "-", "")
        row("daemon start to RUNNING socket (ms)", f"{startup * 1000:.0f}", "-", "-", "")
        row("daemon RSS after the run (MB)", f"{rss:.1f}", "-", "-", "<= 100 MB")
        print(json.dumps({"seq_ratio": round(native_seq / fuse_seq, 3),
                          "seq_ratio_vs_disk": round(native_cold_seq / fuse_seq, 3),
                          "seq_ratio_vs_llfuse_passthrough": round(ceiling_seq / fuse_seq, 3),
                          "iops": round(fuse_iops),
                          "find_first_ratio": round(first / native_find, 2),
                          "find_first_ratio_vs_cold": round(first / native_cold_find_t, 2),
                          "find_second_ratio": round(second / native_find, 2), "rss_mb": round(rss, 1)}))
        return 0
    finally:
        if d is not None:
            d.terminate()
            d.cleanup()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
