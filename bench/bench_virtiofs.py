"""virtio-fs benchmark: our nydusd as the vhost-user-fs back-end against the reference C virtiofsd,
both measured inside ONE guest (QEMU TCG, the cached Debian kernel + busybox initramfs of
tests/harness/guest.py), in the same run, over the same content.

Rows (each a median of ``--reps`` rounds after a warm-up round):
- sequential read of a 256 MiB file (``dd bs=1M``): nydusd with its blob cache warm (the warm-up
  round filled it) vs virtiofsd over ``nydus-image unpack`` of the image (host page cache warm);
  the guest's page cache is dropped before each pass, so every byte crosses virtio-fs.
- ``find`` over a ~7,000-entry tree: cold (guest dentries/inodes dropped: every entry is a LOOKUP)
  and warm (second pass right after: the guest's entry/attr caches answer).
Ratio = virtiofsd time / nydusd time (1.0 = as fast as the C daemon; the aim is >= 0.5).
Times come from the guest's /proc/uptime (10 ms resolution) -- the same clock for both daemons.
Also printed: nydusd CPU seconds over the whole run (the Python daemon is CPU-bound: see README).

Needs root, qemu-system-x86, qemu-system-common (virtiofsd). Run:
``.venv/bin/python bench/bench_virtiofs.py [--reps N] [--size-mib 256]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_fuse import make_big_tree, make_rootfs_like  # noqa: E402

from tests.harness.guest import (  # noqa: E402
    RefVirtiofsd,
    beside_reference,
    guest_missing,
    prepare,
    start_backend,
    unpack,
)
from tests.harness.images import DaemonImage, build_daemon_image  # noqa: E402

MiB = 1 << 20

SCRIPT = """
mkdir -p /n /r
mount -t virtiofs nydus /n || exit 3
mount -t virtiofs ref /r || exit 4
t() {{ cut -d' ' -f1 /proc/uptime; }}
for r in $(seq 0 {reps}); do
  for d in n r; do
    echo 3 > /proc/sys/vm/drop_caches
    a=$(t); dd if=/$d/big.bin of=/dev/null bs=1M 2>/dev/null; b=$(t); echo "M READ $d $r $a $b"
    echo 3 > /proc/sys/vm/drop_caches
    a=$(t); find /$d/tree > /dev/null; b=$(t); echo "M FIND $d $r $a $b"
    a=$(t); find /$d/tree > /dev/null; b=$(t); echo "M FIND2 $d $r $a $b"
  done
done
echo "ENTRIES $(find /n/tree | wc -l) $(find /r/tree | wc -l)"
"""


def engine_costs(img: DaemonImage) -> tuple[float, float, float]:
    """In-process cost of our engine (no guest, no virtqueue): microseconds per LOOKUP and per
    GETATTR, and MiB/s of 128 KiB READs from the warm blob cache -- the daemon-side floor."""
    from nydusd.config import load_config
    from nydusd.daemon.instance import build_rafs_instance
    from nydusd.fs.proto.engine import FuseEngine
    from nydusd.fs.vfs import Vfs
    from tests.harness.fuse_wire import FuseClient

    inst = build_rafs_instance("/", img.bootstrap, load_config(img.config_text(None)))
    vfs = Vfs()
    vfs.attach("/", inst.fs, inst.stats)
    engine = FuseEngine(vfs)
    client = FuseClient(lambda req: b"".join(bytes(s) for s in engine.handle(req) or []))
    client.init()
    tree = client.lookup(1, b"tree").nodeid
    n = 20000
    t = time.perf_counter()
    for _ in range(n):
        client.lookup(tree, b"usr0")
    lookup_us = (time.perf_counter() - t) / n * 1e6
    t = time.perf_counter()
    for _ in range(n):
        client.getattr(tree)
    getattr_us = (time.perf_counter() - t) / n * 1e6
    big = client.lookup(1, b"big.bin").nodeid
    fh = client.open(big)
    t = time.perf_counter()
    total = 0
    for off in range(0, 256 * MiB, 128 << 10):
        total += len(client.read(big, fh, off, 128 << 10))
    mibs = total / MiB / (time.perf_counter() - t)
    inst.close()
    return lookup_us, getattr_us, mibs


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--threads", type=int, default=4)
    args = ap.parse_args()
    missing = guest_missing()
    if missing:
        print(f"bench_virtiofs: skipped: {missing}")
        return 0
    image = prepare()
    with tempfile.TemporaryDirectory(prefix="bench-virtiofs-") as tmp:
        work = Path(tmp)
        src = work / "src"
        make_big_tree(src, args.size_mib * MiB)
        make_rootfs_like(src / "tree")
        t0 = time.perf_counter()
        img = build_daemon_image(src, work / "img")
        print(f"image built in {time.perf_counter() - t0:.1f}s")
        ref_dir = unpack(img.bootstrap, img.blob_dir, work / "unpacked")
        cfg = img.write_config(work / "config.json", work / "cache")
        lookup_us, getattr_us, read_mibs = engine_costs(img)
        d, sock = start_backend(work, "--config", cfg, "--bootstrap", img.bootstrap,
                                "--thread-num", str(args.threads))
        ref = RefVirtiofsd(ref_dir, str(work / "ref.sock"), work / "virtiofsd.log")
        try:
            assert d.proc is not None
            with beside_reference(image, sock, ref, SCRIPT.format(reps=args.reps), work,
                                  mem_mb=1024) as guest:
                cpu0 = cpu_seconds(d.proc.pid)
                lines = guest.start().finish(1800)
                cpu = cpu_seconds(d.proc.pid) - cpu0
        finally:
            d.terminate()
            d.cleanup()
    times: dict[tuple[str, str], list[float]] = {}
    for line in lines:
        parts = line.split()
        if parts[:1] == ["M"] and int(parts[3]) > 0:  # round 0 is the warm-up
            times.setdefault((parts[1], parts[2]), []).append(float(parts[5]) - float(parts[4]))
    entries = next(line for line in lines if line.startswith("ENTRIES")).split()[1:]
    print(f"\nvirtio-fs inside one TCG guest, medians of {args.reps} rounds; "
          f"tree entries: nydusd {entries[0]}, virtiofsd {entries[1]}")
    print(f"{'metric':<36}{'nydusd':>12}{'virtiofsd':>12}{'ratio':>8}   target")
    for key, label in (("READ", f"sequential read {args.size_mib} MiB (s)"),
                       ("FIND", "find ~7k entries, cold (s)"), ("FIND2", "find ~7k entries, warm (s)")):
        ours = statistics.median(times[(key, "n")])
        theirs = statistics.median(times[(key, "r")])
        ratio = theirs / ours if ours > 0 else float("inf")
        extra = ""
        if key == "READ":
            extra = f"  ({args.size_mib / ours:.0f} vs {args.size_mib / theirs:.0f} MiB/s)"
        print(f"{label:<36}{ours:>12.2f}{theirs:>12.2f}{ratio:>7.2f}x   >=0.5x{extra}")
    print(f"nydusd CPU time over the whole guest run: {cpu:.1f}s")
    print(f"engine in-process (no guest): LOOKUP {lookup_us:.0f} us, GETATTR {getattr_us:.0f} us, "
          f"128 KiB READs {read_mibs:.0f} MiB/s (localfs, no blob cache)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
