"""Benchmark: container start through containerd 1.6 -- full pull with the overlayfs snapshotter
(the baseline) vs lazy start with the real nydus-snapshotter v0.6.1 and our nydusd, in both daemon
modes (``multiple``: one nydusd per image, started inside ``ctr run``; ``shared``: one nydusd started
with the snapshotter, outside the timed window), and ``multiple`` with ``NYDUSD_ZYGOTE`` (each nydusd
a fork of a ``nydusd-zygote`` started with the snapshotter).

The link is shaped: registry, containerd, snapshotter and nydusd all run in a fresh network namespace
whose ``lo`` is limited with ``tc qdisc add dev lo root tbf rate 100mbit burst 256kb latency 50ms``
(the host's own loopback is never touched). Image: busybox-static + a small text file + a large
random file no container reads (``--big-mb``), converted with our ``nydusify convert``.
Command: ``/bin/cat /etc/greeting``.

Each run is cold: fresh containerd + snapshotter state, ``echo 3 > /proc/sys/vm/drop_caches``, new
nydusd. The ways alternate within each round; medians over ``--rounds``. pull = ``ctr image
pull`` (overlayfs) or ``nydus-rpull``; run = ``ctr run --rm``; fetched = blob bytes in the registry's
access log during pull + run.

    .venv/bin/python bench/bench_containerd.py [--rounds N] [--big-mb M]

Needs root, the nydus-snapshotter rig (built into ~/.cache/nydus-py/nydus-snapshotter by
scripts/setup.sh), containerd, docker-registry, skopeo, umoci, busybox-static, iproute2.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.harness.containerd_rig import (  # noqa: E402
    GREETING,
    AccessLogRegistry,
    SnapshotterRig,
    build_snapshotter,
    busybox_image,
    missing_tools,
    netns,
    shape_loopback,
)

SHAPE = "tbf rate 100mbit burst 256kb latency 50ms"
WAYS = ("overlayfs", "nydus multiple", "nydus multiple+zygote", "nydus shared")


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def one_run(way: str, work: Path, bin_dir: Path, ns: str, registry: AccessLogRegistry,
            image: dict[str, Any]) -> dict[str, float]:
    mode = "shared" if way == "nydus shared" else "multiple"
    rig = SnapshotterRig(work, bin_dir, mode=mode, namespace="nydus-bench", netns=ns,
                         zygote=way.endswith("+zygote"))
    with rig:
        # started with the snapshotter, outside the timed window: the shared nydusd, the zygote
        if mode == "shared":
            rig.wait_for(lambda: bool(rig.api_socks()), 30, "the shared nydusd")
        drop_caches()
        mark = registry.mark()
        t0 = time.perf_counter()
        if way == "overlayfs":
            rig.pull_overlayfs(image["oci"])
        else:
            rig.rpull(image["nydus"])
        t1 = time.perf_counter()
        ref = image["oci"] if way == "overlayfs" else image["nydus"]
        out = rig.run(ref, "c1", "/bin/cat", "/etc/greeting",
                      snapshotter="overlayfs" if way == "overlayfs" else "nydus")
        t2 = time.perf_counter()
        if out != GREETING.decode():
            raise RuntimeError(f"{way}: unexpected container output {out!r}")
        _, fetched = registry.blob_gets(mark)
    return {"pull": t1 - t0, "run": t2 - t1, "total": t2 - t0, "fetched": fetched}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--big-mb", type=int, default=64, help="size of the never-read file (MiB)")
    args = ap.parse_args()
    why = missing_tools()
    if why:
        print(f"bench_containerd: skipped: {why}")
        return 0
    bin_dir = build_snapshotter()
    tmp = Path(tempfile.mkdtemp(prefix="nydus-bench-ctrd-"))
    results: dict[str, list[dict[str, float]]] = {w: [] for w in WAYS}
    with netns(f"nydus-bench-{os.getpid()}") as ns:
        registry = AccessLogRegistry(tmp / "registry", netns=ns).start()
        try:
            t0 = time.perf_counter()
            image = busybox_image(tmp / "image", registry, big_size=args.big_mb << 20)
            print(f"image: OCI layers {image['oci_layer_bytes'] / 1e6:.1f} MB, nydus data blobs "
                  f"{sum(image['data_blobs'].values()) / 1e6:.1f} MB (built and converted in "
                  f"{time.perf_counter() - t0:.1f} s, unshaped)")
            shape_loopback(ns, SHAPE)
            print(f"link: {SHAPE} on lo of network namespace {ns}; {args.rounds} rounds, cold runs")
            for r in range(args.rounds):
                order = WAYS if r % 2 == 0 else tuple(reversed(WAYS))
                for way in order:
                    res = one_run(way, tmp / f"r{r}-{way.replace(' ', '-')}", bin_dir, ns, registry, image)
                    results[way].append(res)
                    print(f"  round {r + 1} {way:15s} pull {res['pull']:.2f} s  run {res['run']:.2f} s  "
                          f"total {res['total']:.2f} s  fetched {res['fetched'] / 1e6:.2f} MB", flush=True)
        finally:
            registry.stop()
    base = statistics.median(x["total"] for x in results["overlayfs"])
    print()
    size = image["oci_layer_bytes"] / 1e6
    print(f"| way | pull s | run s | pull+run s | vs overlayfs | fetched MB (image {size:.1f} MB) |")
    print("|---|---|---|---|---|---|")
    for way in WAYS:
        med = {k: statistics.median(x[k] for x in results[way]) for k in ("pull", "run", "total", "fetched")}
        print(f"| {way} | {med['pull']:.2f} | {med['run']:.2f} | {med['total']:.2f} | "
              f"{med['total'] / base:.2f}x | {med['fetched'] / 1e6:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
