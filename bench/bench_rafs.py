"""Benchmark: opening and walking a >=100,000-inode RAFS bootstrap (v5 and v6) vs `find` over the
same tree created on disk.

Generates a tree (directories of files, one chunk each) with the project's writer, then in fresh
child processes measures: open time (``load_bootstrap``), full walk time (``RafsSuper.walk`` with
every inode decoded), a lookup of every tenth path (``resolve``), and the child's own peak RSS
(VmHWM; ``ru_maxrss`` would include the forking parent's peak), and how much of it opening and
then walking added (the walk keeps 10,000 paths for the lookup phase and fills the decode caches; the
mapped bootstrap pages count too). The baseline is ``find DIR`` over the
same tree on local disk (dentries warm after the warm-up run). Each number is the median of several
runs after one warm-up.

Run: ``.venv/bin/python bench/bench_rafs.py [--quick] [--entries N]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nydusd.compress import Compressor  # noqa: E402
from nydusd.digest import DigestAlgorithm  # noqa: E402
from nydusd.rafs.model import Bootstrap, Node  # noqa: E402
from nydusd.rafs.writer import write_bootstrap  # noqa: E402
from nydusd.storage.chunk import BlobInfo, ChunkInfo  # noqa: E402

CHILD = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[3])


def hwm_kb():
    # VmHWM: this process's own peak RSS (reset at exec, unlike ru_maxrss which inherits the
    # forking parent's peak)
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1])



from nydusd.log import configure_logging
from nydusd.rafs import load_bootstrap
configure_logging("warn")
base = hwm_kb()
t0 = time.perf_counter()
sb = load_bootstrap(sys.argv[1])
t1 = time.perf_counter()
after_open = hwm_kb()
n = 0
paths = []
for path, inode in sb.walk():
    n += 1
    if sys.argv[2] == "lookup" and n % 10 == 0:
        paths.append(path)
t2 = time.perf_counter()
for p in paths:
    sb.resolve(p)
t3 = time.perf_counter()
print(json.dumps({"open": t1 - t0, "walk": t2 - t1, "lookup": (t3 - t2) / max(len(paths), 1),
                  "entries": n, "base_rss_kb": base, "rss_kb": hwm_kb(),
                  "open_rss_kb": after_open}))
"""


def make_model(entries: int) -> Bootstrap:
    per_dir = int(entries ** 0.5)
    ndirs = max(1, -(-(entries - 1) // (per_dir + 1)))  # root + ndirs * (dir + files) >= entries
    digest = bytes(32)
    blob = BlobInfo(blob_id="b" * 64, blob_index=0, compressor=Compressor.ZSTD,
                    digester=DigestAlgorithm.BLAKE3, chunk_size=0x100000, chunk_count=ndirs * per_dir,
                    compressed_size=0, uncompressed_size=4096 * ndirs * per_dir, features=0x1)
    root = Node(name=b"/", mode=0o040755)
    k = 0
    for d in range(ndirs):
        dnode = Node(name=b"dir%05d" % d, mode=0o040755, mtime=1_700_000_000)
        for f in range(per_dir):
            chunk = ChunkInfo(digest=k.to_bytes(8, "little") + digest[8:], blob_index=0, flags=0,
                              compressed_size=100, uncompressed_size=100, compressed_offset=100 * k,
                              uncompressed_offset=4096 * k, file_offset=0, index=k)
            dnode.children.append(Node(name=b"file-%06d.txt" % f, mode=0o100644, size=100,
                                       mtime=1_700_000_000, chunks=[chunk]))
            k += 1
        root.children.append(dnode)
    return Bootstrap(root=root, blobs=[blob], chunk_size=0x100000)


def make_disk_tree(model: Bootstrap, dest: Path) -> None:
    for d in model.root.children:
        dpath = dest / d.name.decode()
        dpath.mkdir(parents=True)
        for f in d.children:
            os.close(os.open(dpath / f.name.decode(), os.O_CREAT | os.O_WRONLY, 0o644))


def _hwm(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def run_child(cmd: list[str]) -> tuple[float, str, int]:
    """(wall seconds, stdout, peak RSS KiB) of one child process. The peak is the child's VmHWM,
    polled while it runs (monotonic, so the last reading before exit is its peak)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out_file:
        proc = subprocess.Popen(cmd, stdout=out_file, stderr=subprocess.DEVNULL)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, _hwm(proc.pid) or 0)
            time.sleep(0.001)
        wall = time.perf_counter() - start
        if proc.returncode:
            raise SystemExit(f"{cmd[0]} failed with {proc.returncode}")
        out_file.seek(0)
        return wall, out_file.read().decode(), peak


def bench_rafs(path: Path, runs: int) -> dict[str, float]:
    cmd = [sys.executable, "-c", CHILD, str(path), "lookup", str(ROOT)]
    run_child(cmd)  # warm-up (page cache, pyc)
    samples = []
    for _ in range(runs):
        wall, out, _polled = run_child(cmd)
        doc = json.loads(out)
        doc.update(wall=wall, rss_mb=doc["rss_kb"] / 1024,
                   open_mb=(doc["open_rss_kb"] - doc["base_rss_kb"]) / 1024,
                   rss_delta_mb=(doc["rss_kb"] - doc["base_rss_kb"]) / 1024)
        samples.append(doc)
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]}


def bench_find(tree: Path, runs: int) -> dict[str, float]:
    cmd = ["find", str(tree)]
    run_child(cmd)
    samples = [run_child(cmd) for _ in range(runs)]
    return {"wall": statistics.median(s[0] for s in samples),
            "entries": len(samples[0][1].splitlines()),
            "rss_mb": statistics.median(s[2] for s in samples) / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer runs")
    ap.add_argument("--entries", type=int, default=100_000)
    args = ap.parse_args()
    runs = 3 if args.quick else 7
    tmp = Path(tempfile.mkdtemp(prefix="bench-rafs-"))
    try:
        model = make_model(args.entries)
        results = {}
        for version in (5, 6):
            t0 = time.perf_counter()
            boot = tmp / f"v{version}.boot"
            write_bootstrap(model, boot, version=version)
            write_s = time.perf_counter() - t0
            r = bench_rafs(boot, runs)
            r["write"] = write_s
            r["size_mb"] = boot.stat().st_size / 2**20
            results[f"rafs v{version}"] = r
        make_disk_tree(model, tmp / "tree")
        find = bench_find(tmp / "tree", runs)
        print(f"\nentries: {int(results['rafs v6']['entries'])} (find lists {find['entries']}), "
              f"runs: {runs} (median, after a warm-up)\n")
        head = f"{'':10} {'write s':>8} {'size MB':>8} {'open ms':>8} {'walk ms':>8} {'lookup us':>9} " \
               f"{'proc wall ms':>12} {'peak RSS MB':>11} {'+open MB':>8} {'+walk MB':>8} {'wall / find':>11}"
        print(head)
        print("-" * len(head))
        for name, r in results.items():
            print(f"{name:10} {r['write']:8.2f} {r['size_mb']:8.1f} {r['open'] * 1e3:8.2f} "
                  f"{r['walk'] * 1e3:8.0f} {r['lookup'] * 1e6:9.1f} {r['wall'] * 1e3:12.0f} "
                  f"{r['rss_mb']:11.1f} {r['open_mb']:8.1f} {r['rss_delta_mb']:8.1f} "
                  f"{r['wall'] / find['wall']:11.2f}")
        print(f"{'find':10} {'':8} {'':8} {'':8} {'':8} {'':9} {find['wall'] * 1e3:12.0f} "
              f"{find['rss_mb']:11.1f} {'':8} {'':8} {1.0:11.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
