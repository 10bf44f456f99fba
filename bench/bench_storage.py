"""Storage data path benchmark: blob chunks through the registry backend + file cache, beside curl.

A ~200 MB file (partly compressible, like real image content) is cut into 1 MiB chunks, compressed
with zstd and with lz4_block into two blobs, and pushed to a real docker-registry on 127.0.0.1.
For each blob, in the same run and interleaved round by round (so that the machine's load hits
every row alike):

- ``curl``: one GET of the whole blob from the same registry (the baseline: the same bytes moved);
- cold: a fresh work_dir, DEFAULT blobcache (plain chunks, chunk map, pwrite + fdatasync protocol,
  no digest validation); the whole blob read through ``BlobDevice`` by
  - one reader with upstream's defaults (amplify_io 1 MiB, no readahead) -- on-demand reference,
  - the prefetcher over every chunk (``prefetch_all``), 8 threads (upstream's default), with
    upstream's default merging_size (1 MiB) and with 32 MiB merged requests, and with 2 threads;
  - and, for reference, the 32 MiB prefetch into ``cache.compressed`` (payloads stored as fetched);
- warm: a fresh device over the filled work_dir reads the file again (no backend traffic);
- on-demand latency: one 4 KiB read of a cold chunk (must stay one small ranged request).

Each figure is the median of ``--runs`` rounds after one warm-up round. Throughput is blob bytes
(what crosses the network) per second. The untimed parts: opening the device, the cache's final
fdatasync at close (it runs in the background while serving) and, before a cold run, deleting the
previous run's cache and ``sync`` + a short pause: this host's ext4 is mounted with ``discard``,
and writing 200 MB right after freeing 200 MB measures the disk's TRIM, not the cache.
"peak MB" is the process's peak RSS growth during the run (the bench itself holds the blobs).

Targets (issue 5): cold >= 0.5x curl, warm >= 3x cold.

Run: ``.venv/bin/python bench/bench_storage.py [--quick] [--size-mb N] [--runs N]``.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nydusd.compress import Compressor  # noqa: E402
from nydusd.config import CacheConfig, FileCacheConfig, PrefetchConfig, RegistryConfig  # noqa: E402
from nydusd.storage.backend.registry import RegistryBackend  # noqa: E402
from nydusd.storage.cache import create_cache  # noqa: E402
from nydusd.storage.device import BlobDevice  # noqa: E402
from tests.harness.fakes.blobs import TestBlob, build_blob, mixed_content  # noqa: E402
from tests.harness.servers.registry import RegistryServer  # noqa: E402

MIB = 1 << 20
CHUNK = MIB
REPO = "bench/storage"
#: the cold row the targets are judged on (whole-blob prefetch as nydusd's prefetch_all does it)
TARGET_ROW = "cold, prefetch_all 8 thr, merge 32 MiB"


def curl_fetch(registry: RegistryServer, blob: TestBlob) -> float:
    """Seconds for curl to GET the whole blob (its own ``time_total``, process start excluded)."""
    url = f"http://{registry.host}/v2/{REPO}/blobs/sha256:{blob.blob_id}"
    out = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{size_download} %{time_total}", url],
                         check=True, capture_output=True, text=True).stdout.split()
    assert int(float(out[0])) == len(blob.data), out
    return float(out[1])


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def _reset_peak() -> bool:
    """Return freed heap to the OS (else earlier runs' memory is reused unseen), then reset the
    peak RSS to the current RSS."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1e3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


@dataclass
class Row:
    label: str
    times: list[float] = field(default_factory=list)
    peaks: list[float] = field(default_factory=list)


class Scenario:
    """One blob read through a registry backend + blobcache in a scratch work_dir."""

    def __init__(self, registry: RegistryServer, blob: TestBlob, scratch: Path) -> None:
        self.blob = blob
        self.work_dir = scratch / f"cache-{blob.info.compressor.value}"
        self.cfg = RegistryConfig(scheme="http", host=registry.host, repo=REPO, timeout=30)
        self.after: Callable[[BlobDevice], None] | None = None
        self.failed = ""

    def fresh(self) -> None:
        """Drop the cache and let the filesystem settle (untimed; see the module docstring)."""
        shutil.rmtree(self.work_dir, ignore_errors=True)
        os.sync()
        time.sleep(0.3)

    def run(self, job: Callable[[BlobDevice], None], *, merging: int = MIB, threads: int = 8,
            compressed: bool = False) -> tuple[float, float]:
        """Time ``job`` on a fresh device (upstream's default config unless told otherwise).
        Returns (seconds, peak RSS growth in MB)."""
        backend = RegistryBackend(self.cfg)
        cache = CacheConfig(type="blobcache", compressed=compressed,
                            filecache=FileCacheConfig(work_dir=str(self.work_dir)))
        prefetch = PrefetchConfig(enable=True, threads=threads, batch_size=merging)
        device = BlobDevice([self.blob.info], create_cache(cache, backend), prefetch_config=prefetch)
        try:
            _reset_peak()
            base = _rss_mb()
            start = time.perf_counter()
            job(device)
            elapsed = time.perf_counter() - start
            peak = max(0.0, _peak_mb() - base)
            if self.after is not None:
                self.after(device)
        finally:
            self.after = None
            device.close()
            backend.close()
        return elapsed, peak

    def read_all(self, device: BlobDevice, read_size: int = MIB) -> None:
        chunks, content = self.blob.files[0], self.blob.contents[0]
        for off in range(0, len(content), read_size):
            data = device.read(chunks, off, read_size)
            if data != content[off:off + len(data)]:
                raise AssertionError(f"wrong bytes at {off}")

    def prefetch_all(self, device: BlobDevice) -> None:
        device.prefetch(self.blob.files[0])
        device.wait_prefetch()
        self.after = self.check_prefetched

    def check_prefetched(self, device: BlobDevice) -> None:
        """Untimed: what was prefetched is there and right; reading it needs no backend request."""
        before = device.backend_metrics()["read_count"]
        self.read_all(device)
        assert device.backend_metrics()["read_count"] == before, "prefetch left chunks behind"

    def small_read_ms(self) -> tuple[float, int, int]:
        """One cold 4 KiB read in the middle of the blob: (ms, backend requests, bytes fetched)."""
        self.fresh()
        backend = RegistryBackend(self.cfg)
        cache = CacheConfig(type="blobcache", filecache=FileCacheConfig(work_dir=str(self.work_dir)))
        device = BlobDevice([self.blob.info], create_cache(cache, backend))
        chunks, content = self.blob.files[0], self.blob.contents[0]
        off = len(content) // 2 + 12345
        try:
            device.read(chunks, 0, 1)  # connection + cache files set up outside the timing
            start = time.perf_counter()
            data = device.read(chunks, off, 4096)
            elapsed = time.perf_counter() - start
            assert data == content[off:off + 4096]
            m = backend.metrics()
            return elapsed * 1000, m["read_count"] - 1, m["read_amount_total"] - chunks[0].compressed_size
        finally:
            device.close()
            backend.close()


def bench_blob(registry: RegistryServer, content: bytes, compressor: Compressor, scratch: Path,
               runs: int) -> tuple[list[tuple[str, float, float, float, str]], str]:
    blob = build_blob([content], chunk_size=CHUNK, compressor=compressor)
    registry.push_blob(REPO, blob.data)
    sc = Scenario(registry, blob, scratch)
    name, blob_mb = compressor.value, len(blob.data) / 1e6
    print(f"# {name}: file {len(content) / 1e6:.0f} MB, blob {blob_mb:.0f} MB, "
          f"{blob.info.chunk_count} chunks", flush=True)
    cold: list[tuple[str, Callable[[], tuple[float, float]]]] = [
        ("cold, 1 reader, defaults (on-demand)", lambda: sc.run(sc.read_all)),
        ("cold, prefetch_all 8 thr, merge 1 MiB", lambda: sc.run(sc.prefetch_all)),
        (TARGET_ROW, lambda: sc.run(sc.prefetch_all, merging=32 * MIB)),
        ("cold, prefetch_all 2 thr, merge 32 MiB", lambda: sc.run(sc.prefetch_all, merging=32 * MIB,
                                                                   threads=2)),
        ("cold, prefetch_all 8 thr, 32 MiB, compressed", lambda: sc.run(sc.prefetch_all, merging=32 * MIB,
                                                                        compressed=True)),
    ]
    warm: list[tuple[str, Callable[[], tuple[float, float]]]] = [
        ("warm, 1 reader, 1 MiB reads", lambda: sc.run(sc.read_all)),
        ("warm, 1 reader, 128 KiB reads", lambda: sc.run(lambda d: sc.read_all(d, 128 << 10))),
    ]
    curl = Row("curl GET whole blob (baseline)")
    rows = {label: Row(label) for label, _ in cold + warm}
    for i in range(runs + 1):  # round 0 warms up
        curl_t = statistics.median(curl_fetch(registry, blob) for _ in range(3))
        results = []
        for label, fn in cold:
            sc.fresh()
            results.append((label, fn()))
        sc.fresh()
        sc.run(sc.prefetch_all, merging=32 * MIB)  # fill the cache for the warm rows
        for label, fn in warm:
            results.append((label, fn()))
        if i:
            curl.times.append(curl_t)
            for label, (t, peak) in results:
                rows[label].times.append(t)
                rows[label].peaks.append(peak)
    t_curl = statistics.median(curl.times)
    t_target = statistics.median(rows[TARGET_ROW].times)
    table = [(name, curl.label, blob_mb / t_curl, 1.0, float("nan"), "")]
    for label, row in rows.items():
        t = statistics.median(row.times)
        vs_cold = f"{t_target / t:.1f}x" if label.startswith("warm") else ""
        table.append((name, label, blob_mb / t, t_curl / t, max(row.peaks), vs_cold))
    ms, requests, nbytes = sc.small_read_ms()
    note = (f"{name}: one cold 4 KiB read: {ms:.1f} ms, {requests} backend request(s), "
            f"{nbytes / 1024:.0f} KiB fetched (amplify_io 1 MiB)")
    return table, note


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 MB, 1 round after the warm-up")
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    size_mb, runs = (64, 1) if args.quick else (args.size_mb, max(1, args.runs))
    if shutil.which("curl") is None or shutil.which("docker-registry") is None:
        print("needs curl and docker-registry (apt install curl docker-registry)", file=sys.stderr)
        return 2

    content = mixed_content(size_mb << 20, seed=42)
    scratch = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    registry = RegistryServer(scratch / "registry")
    table = []
    notes = []
    try:
        for compressor in (Compressor.ZSTD, Compressor.LZ4_BLOCK):
            rows, note = bench_blob(registry, content, compressor, scratch, runs)
            table += rows
            notes.append(note)
    finally:
        registry.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\nmedians of {runs} round(s) after a warm-up round\n")
    print(f"{'compressor':<10} {'path':<46} {'blob MB/s':>9} {'vs curl':>8} {'peak MB':>8} {'vs cold':>8}")
    for name, path, mbps, ratio, peak, vs_cold in table:
        peak_s = "" if peak != peak else f"{peak:.0f}"  # NaN for the curl row
        print(f"{name:<10} {path:<46} {mbps:9.0f} {ratio:7.2f}x {peak_s:>8} {vs_cold:>8}")
    print()
    for note in notes:
        print(note)
    print(f"\ntargets: '{TARGET_ROW}' >= 0.50x curl; warm rows >= 3x that cold row ('vs cold')")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
          "(other processes on the machine skew every row)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
