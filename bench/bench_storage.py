"""Storage data path benchmark: blob chunks through the registry backend + file cache, beside curl.

A ~200 MB file (partly compressible, like real image content) is cut into 1 MiB chunks, compressed
with zstd and with lz4_block into two blobs, and pushed to a real docker-registry on 127.0.0.1.
For each blob, in the same run:

- ``curl``: one GET of the whole blob from the same registry (the baseline: the same bytes moved);
- cold: a fresh work_dir; the file is read end to end through ``BlobDevice`` (registry backend +
  blobcache: ranged GETs, decompression, digest check, pwrite + fdatasync, chunk map), either by
  one reader, by 4 concurrent readers (FUSE worker style) or by the prefetcher (8 threads);
- warm: a fresh device over the filled work_dir reads the file again (no backend traffic).

Each figure is the median of ``--runs`` runs after one warm-up. Throughput is blob bytes (what
crosses the network) per second of reading; the cache's final fdatasync at close is not counted
(it runs in the background while serving). The config is upstream's default (amplify_io 1 MiB, no
digest validation, 8 prefetch threads) except the rows that turn on the device's sequential
readahead, raise the prefetch merging_size or set ``cache.compressed`` (payloads cached as
fetched, decompressed when read).
Targets: cold >= 0.5x curl, warm >= 3x cold.

Run: ``.venv/bin/python bench/bench_storage.py [--quick] [--size-mb N] [--runs N]``.
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

from nydusd.compress import Compressor  # noqa: E402
from nydusd.config import CacheConfig, FileCacheConfig, PrefetchConfig, RegistryConfig  # noqa: E402
from nydusd.storage.backend.registry import RegistryBackend  # noqa: E402
from nydusd.storage.cache import create_cache  # noqa: E402
from nydusd.storage.device import BlobDevice  # noqa: E402
from tests.fakes.blobs import TestBlob, build_blob, mixed_content  # noqa: E402
from tests.servers.registry import RegistryServer  # noqa: E402

MIB = 1 << 20
CHUNK = MIB
REPO = "bench/storage"


def curl_fetch(registry: RegistryServer, blob: TestBlob) -> float:
    """Seconds for curl to GET the whole blob (its own ``time_total``, process start excluded)."""
    url = f"http://{registry.host}/v2/{REPO}/blobs/sha256:{blob.blob_id}"
    out = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{size_download} %{time_total}", url],
                         check=True, capture_output=True, text=True).stdout.split()
    assert int(float(out[0])) == len(blob.data), out
    return float(out[1])


class Scenario:
    """One blob read through a registry backend + blobcache in a scratch work_dir."""

    def __init__(self, registry: RegistryServer, blob: TestBlob, scratch: Path) -> None:
        self.blob = blob
        self.work_dir = scratch / f"cache-{blob.info.compressor.value}"
        self.cfg = RegistryConfig(scheme="http", host=registry.host, repo=REPO, timeout=30)
        self.flush_times: list[float] = []

    def fresh(self) -> None:
        shutil.rmtree(self.work_dir, ignore_errors=True)

    def open(self, merging: int = MIB, readahead: int = 0,
             compressed: bool = False) -> tuple[BlobDevice, RegistryBackend]:
        """Default config (amplify_io 1 MiB, no digest validation); prefetch merging_size, device
        readahead and ``cache.compressed`` as given."""
        backend = RegistryBackend(self.cfg)
        cache = CacheConfig(type="blobcache", compressed=compressed,
                            filecache=FileCacheConfig(work_dir=str(self.work_dir)))
        prefetch = PrefetchConfig(enable=True, threads=8, batch_size=merging)
        device = BlobDevice([self.blob.info], create_cache(cache, backend), prefetch_config=prefetch,
                            readahead=readahead)
        return device, backend

    def run(self, job: Callable[[BlobDevice], None], merging: int = MIB, readahead: int = 0,
            compressed: bool = False) -> float:
        """Time ``job`` on a fresh device; closing it (the final fdatasync) is timed apart."""
        device, backend = self.open(merging, readahead, compressed)
        try:
            start = time.perf_counter()
            job(device)
            elapsed = time.perf_counter() - start
            if self.after is not None:
                self.after(device)
        finally:
            self.after = None
            t0 = time.perf_counter()
            device.close()
            backend.close()
            self.flush_times.append(time.perf_counter() - t0)
        return elapsed

    def read_all(self, device: BlobDevice, readers: int = 1, read_size: int = MIB) -> None:
        size = len(self.blob.contents[0])
        share = (size // readers + MIB - 1) // MIB * MIB
        threads = [threading.Thread(target=self._read_range,
                                    args=(device, i * share, min(size, (i + 1) * share), read_size))
                   for i in range(readers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self.failed:
            raise AssertionError(self.failed)

    failed = ""

    def _read_range(self, device: BlobDevice, start: int, end: int, read_size: int) -> None:
        chunks, content = self.blob.files[0], self.blob.contents[0]
        for off in range(start, end, read_size):
            data = device.read(chunks, off, min(read_size, end - off))
            if data != content[off:off + len(data)]:
                self.failed = f"wrong bytes at {off}"
                return

    def prefetch_all(self, device: BlobDevice) -> None:
        device.prefetch(self.blob.files[0])
        device.wait_prefetch()
        self.after = self.check_prefetched

    after: Callable[[BlobDevice], None] | None = None

    def check_prefetched(self, device: BlobDevice) -> None:
        """Untimed: what was prefetched is there and right; reading it needs no backend request."""
        before = device.backend_metrics()["read_count"]
        self.read_all(device)
        assert device.backend_metrics()["read_count"] == before


def timed(runs: int, fn: Callable[[], float], setup: Callable[[], object] | None = None) -> float:
    """Median of ``fn``'s own timing over ``runs`` runs after one warm-up."""
    times = []
    for i in range(runs + 1):
        if setup is not None:
            setup()
        t = fn()
        if i:
            times.append(t)
    return statistics.median(times)


def bench_blob(registry: RegistryServer, content: bytes, compressor: Compressor, scratch: Path,
               runs: int) -> list[tuple[str, str, float, float]]:
    blob = build_blob([content], chunk_size=CHUNK, compressor=compressor)
    registry.push_blob(REPO, blob.data)
    sc = Scenario(registry, blob, scratch)
    name, blob_mb, file_mb = compressor.value, len(blob.data) / 1e6, len(content) / 1e6
    print(f"# {name}: file {file_mb:.0f} MB, blob {blob_mb:.0f} MB, {blob.info.chunk_count} chunks",
          flush=True)
    t_curl = timed(runs, lambda: curl_fetch(registry, blob))
    cold = [
        ("cold, 1 reader", lambda: sc.run(sc.read_all)),
        ("cold, 1 reader, readahead 8 MiB", lambda: sc.run(sc.read_all, readahead=8 * MIB)),
        ("cold, 4 readers", lambda: sc.run(lambda d: sc.read_all(d, 4))),
        ("cold, prefetch 8 thr, merge 1 MiB", lambda: sc.run(sc.prefetch_all)),
        ("cold, prefetch 8 thr, merge 8 MiB", lambda: sc.run(sc.prefetch_all, merging=8 * MIB)),
        ("cold, prefetch, merge 8 MiB, compressed cache",
         lambda: sc.run(sc.prefetch_all, merging=8 * MIB, compressed=True)),
    ]
    rows = [(name, "curl GET whole blob (baseline)", blob_mb / t_curl, 1.0)]
    t_cold1 = 0.0
    for label, fn in cold:
        t = timed(runs, fn, setup=sc.fresh)
        t_cold1 = t_cold1 or t
        rows.append((name, label, blob_mb / t, t_curl / t))
    sc.flush_times.clear()
    t_warm = timed(runs, lambda: sc.run(sc.read_all))
    rows.append((name, "warm, 1 reader", blob_mb / t_warm, t_cold1 / t_warm))
    t_warm128 = timed(runs, lambda: sc.run(lambda d: sc.read_all(d, read_size=128 << 10)))
    rows.append((name, "warm, 1 reader, 128 KiB reads", blob_mb / t_warm128, t_cold1 / t_warm128))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 MB, 1 run (smoke)")
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    size_mb, runs = (64, 1) if args.quick else (args.size_mb, args.runs)
    if shutil.which("curl") is None or shutil.which("docker-registry") is None:
        print("needs curl and docker-registry (apt install curl docker-registry)", file=sys.stderr)
        return 2

    content = mixed_content(size_mb << 20, seed=42)
    scratch = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    registry = RegistryServer(scratch / "registry")
    rows: list[tuple[str, str, float, float]] = []
    try:
        for compressor in (Compressor.ZSTD, Compressor.LZ4_BLOCK):
            rows += bench_blob(registry, content, compressor, scratch, runs)
    finally:
        registry.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\n{'compressor':<11} {'path':<46} {'blob MB/s':>10} {'ratio':>7}")
    for name, path, mbps, ratio in rows:
        print(f"{name:<11} {path:<46} {mbps:10.1f} {ratio:7.2f}x")
    print("\nratio: cold rows vs curl (target >= 0.5x); warm row vs 'cold, 1 reader' (target >= 3x)")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
          "(other processes on the machine skew every row)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
