"""Benchmark: `nydus-image create` (v6, lz4_block and zstd) against `tar -c | gzip -6` and
`tar -c | zstd -3` on the same rootfs-shaped tree, in the same run.

The tree is a debootstrap minbase rootfs if one is given (``--source``), else a deterministic
sample of this machine's own /usr (real binaries, libraries and text: ~7,000 entries, ~200 MB,
mixed sizes) copied under a temp dir. Each command runs as a child process; wall time, output size
and the child's peak RSS (``wait4``) are measured; medians over ``--runs`` after a warm-up.

    .venv/bin/python bench/bench_builder.py [--quick] [--runs N] [--source DIR] [--keep]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NYDUS_IMAGE = str(Path(sys.executable).parent / "nydus-image")


def make_corpus(dest: Path, max_files: int, max_bytes: int, seed: int = 7) -> tuple[int, int]:
    """Copy a seeded random sample of /usr regular files (<= 16 MiB each) into ``dest``."""
    files = []
    for dirpath, dirnames, filenames in os.walk("/usr"):
        dirnames.sort()
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            # rootfs-like mix: symlinks and files of 2 KiB .. 16 MiB (tiny files would inflate the
            # entry count far beyond a real rootfs's ~30 KB average)
            if os.path.islink(p) or (2048 <= st.st_size <= 16 << 20 and os.access(p, os.R_OK)):
                files.append((p, st.st_size if not os.path.islink(p) else 0))
    random.Random(seed).shuffle(files)
    count = total = 0
    for p, size in files:
        if count >= max_files or total + size > max_bytes:
            continue
        target = dest / p.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            if os.path.islink(p):
                os.symlink(os.readlink(p), target)
            else:
                shutil.copy2(p, target)
        except OSError:
            continue
        count += 1
        total += size
    entries = sum(len(d) + len(f) for _, d, f in os.walk(dest))
    return entries, total


def tree_bytes(src: Path) -> tuple[int, int]:
    entries = total = 0
    for dirpath, dirnames, filenames in os.walk(src):
        entries += len(dirnames) + len(filenames)
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                total += os.lstat(p).st_size
    return entries, total


def run(cmd: list[str] | str, out_files: list[Path]) -> tuple[float, int, int]:
    """Run one command; returns (seconds, output bytes, peak RSS in KiB of the child tree)."""
    for f in out_files:
        if f.is_dir():
            shutil.rmtree(f)
            f.mkdir()
        elif f.exists():
            f.unlink()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, shell=isinstance(cmd, str), cwd=ROOT, stdout=subprocess.DEVNULL)
    _, status, rusage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"command failed ({proc.returncode}): {cmd}")
    size = 0
    for f in out_files:
        size += sum(p.stat().st_size for p in f.iterdir()) if f.is_dir() else f.stat().st_size
    return elapsed, size, rusage.ru_maxrss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller tree (~60 MB), one run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--source", type=Path, help="use this rootfs instead of a /usr sample")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args()
    runs = 1 if args.quick else args.runs
    tmp = Path(tempfile.mkdtemp(prefix="bench-builder-"))
    try:
        if args.source:
            src = args.source
            entries, total = tree_bytes(src)
        else:
            src = tmp / "rootfs"
            src.mkdir()
            entries, total = make_corpus(src, 1500 if args.quick else 5000,
                                         60 << 20 if args.quick else 200 << 20)
        print(f"source: {src} ({entries} entries, {total / 1e6:.1f} MB of file data); "
              f"{os.cpu_count()} CPUs; median of {runs} run(s) after a warm-up")
        out = tmp / "out"
        out.mkdir()
        tgz, tzst = tmp / "layer.tar.gz", tmp / "layer.tar.zst"
        cases = {
            "tar | gzip -6": (f"tar -C {src} -cf - . | gzip -6 > {tgz}", [tgz]),
            "tar | zstd -3": (f"tar -C {src} -cf - . | zstd -q -3 > {tzst}", [tzst]),
        }
        for comp in ("lz4_block", "zstd"):
            cases[f"nydus v6 {comp}"] = ([NYDUS_IMAGE, "create", "--log-level", "warn", "--fs-version", "6",
                                          "--compressor", comp, "--blob-dir", str(out), str(src)], [out])
        # the converter's path: a tar stream on stdin, never unpacked
        cases["nydus tar-rafs zstd"] = (f"tar -C {src} -cf - . | {NYDUS_IMAGE} create --log-level warn "
                                        f"--type tar-rafs --compressor zstd --blob-dir {out} -", [out])
        run(f"tar -C {src} -cf - . > /dev/null", [])  # warm the page cache
        results = {}
        for name, (cmd, outs) in cases.items():
            samples = [run(cmd, outs) for _ in range(runs)]
            results[name] = (statistics.median(s[0] for s in samples), samples[-1][1],
                             max(s[2] for s in samples))
        base = results["tar | gzip -6"][0]
        print(f"{'case':<20} {'time s':>8} {'MB/s':>8} {'output MB':>10} {'ratio':>7} {'peak RSS MB':>12} "
              f"{'speed vs tar|gzip':>18}")
        for name, (secs, size, rss) in results.items():
            print(f"{name:<20} {secs:>8.2f} {total / secs / 1e6:>8.1f} {size / 1e6:>10.1f} "
                  f"{size / total:>7.3f} {rss / 1024:>12.1f} {base / secs:>17.2f}x")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
