"""Backend transport benchmark: the registry backend alone, beside curl, on one blob.

A blob of random bytes (200 MB by default) is pushed to a real docker-registry on 127.0.0.1. In the
same run it is read end to end:

- ``curl``: one GET of the whole blob (the baseline);
- ``backend, N MiB reads``: ``RegistryBackend.read`` in sequential ranges of N MiB (1, 4, 16, 64);
- ``backend, 1 MiB reads x T threads``: T threads reading disjoint 1 MiB ranges concurrently;
- ``backend via tinyproxy, 16 MiB reads``: the same through a Dragonfly stand-in proxy.

Each figure is the median of ``--runs`` runs after one warm-up; every read is checked for length
(and the first and last read for content). The registry's own per-request cost (~3-7 ms here,
curl shows the same with 1 MiB ranges) bounds small sequential reads: callers should merge
adjacent chunks into large ranges or read concurrently.

Run: ``.venv/bin/python bench/bench_backends.py [--quick] [--size-mb N] [--runs N]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nydusd.config import RegistryConfig  # noqa: E402
from nydusd.log import configure_logging  # noqa: E402
from nydusd.storage.backend.registry import RegistryBackend  # noqa: E402
from tests.harness.servers.registry import RegistryServer  # noqa: E402
from tests.harness.servers.tinyproxy import TinyProxy  # noqa: E402

REPO = "bench/backends"
MIB = 1 << 20


def median_time(fn: Callable[[], object], runs: int) -> float:
    times = []
    for i in range(runs + 1):
        start = time.perf_counter()
        fn()
        if i:  # the first run warms up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def sequential(backend: RegistryBackend, blob: str, size: int, step: int, data: bytes) -> None:
    off = 0
    while off < size:
        got = backend.read(blob, off, step)
        assert len(got) == min(step, size - off)
        if off == 0:
            assert got == data[:step]
        off += len(got)
    assert got == data[off - len(got):]


def concurrent(backend: RegistryBackend, blob: str, size: int, threads: int) -> None:
    offsets = list(range(0, size, MIB))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        while True:
            with lock:
                if not offsets:
                    return
                off = offsets.pop()
            try:
                got = backend.read(blob, off, MIB)
                assert len(got) == min(MIB, size - off)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)
                return

    ts = [threading.Thread(target=worker) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="64 MB blob, 2 runs")
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    configure_logging("warn")
    size_mb, runs = (64, 2) if args.quick else (args.size_mb, args.runs)
    if not shutil.which("docker-registry") or not shutil.which("curl"):
        sys.exit("needs docker-registry and curl (apt install docker-registry curl)")
    tmp = Path(tempfile.mkdtemp(prefix="bench-backends-"))
    reg = RegistryServer(tmp / "registry", "none")
    proxy = TinyProxy(tmp / "tinyproxy") if shutil.which("tinyproxy") else None
    rows: list[tuple[str, float]] = []
    try:
        data = os.urandom(size_mb * MIB)
        blob = reg.push_blob(REPO, data)
        size = len(data)
        url = f"http://{reg.host}/v2/{REPO}/blobs/sha256:{blob}"
        curl = median_time(lambda: subprocess.run(["curl", "-sf", "-o", os.devnull, url], check=True), runs)
        rows.append(("curl GET whole blob (baseline)", curl))
        cfg = RegistryConfig(**reg.backend_config(REPO))
        for step in (1, 4, 16, 64):
            with RegistryBackend(cfg) as b:
                t = median_time(lambda b=b, step=step: sequential(b, blob, size, step * MIB, data), runs)
            rows.append((f"backend, {step} MiB reads", t))
        for threads in (4, 8):
            with RegistryBackend(cfg) as b:
                t = median_time(lambda b=b, n=threads: concurrent(b, blob, size, n), runs)
            rows.append((f"backend, 1 MiB reads x {threads} threads", t))
        if proxy is not None:
            pcfg = RegistryConfig(**reg.backend_config(REPO, proxy={"url": proxy.url, "fallback": False}))
            with RegistryBackend(pcfg) as b:
                t = median_time(lambda b=b: sequential(b, blob, size, 16 * MIB, data), runs)
            rows.append(("backend via tinyproxy, 16 MiB reads", t))
    finally:
        if proxy is not None:
            proxy.stop()
        reg.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"# blob {size_mb} MiB, median of {runs} runs after a warm-up")
    print(f"{'path':40} {'MB/s':>8} {'ratio':>7}")
    for name, t in rows:
        print(f"{name:40} {size_mb * MIB / 1e6 / t:8.1f} {curl / t:6.2f}x")
    print("ratio: throughput vs curl (registry backend target >= 0.5x)")


if __name__ == "__main__":
    main()
