"""Crash safety of the file cache: a process killed with SIGKILL in the middle of heavy cache
writes never leaves a chunk marked ready whose bytes are not in place.

A child process (real ``LocalFsBackend`` over blob files, file cache, 6 reader threads) is killed
at random moments, several times over the same work_dir; after each kill every ready bit of the
chunk map is checked against the data file, and at the end a fresh cache serves every byte right.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nydusd.config import CacheConfig, FileCacheConfig
from nydusd.storage.cache import create_cache
from nydusd.storage.cache.chunkmap import HEADER_SIZE
from nydusd.storage.device import BlobDevice
from tests.harness.fakes.backends import MemoryBackend, write_blobs
from tests.harness.fakes.blobs import TestBlob, build_blob, mixed_content

ROOT = Path(__file__).resolve().parents[2]
CHUNK = 0x10000

CHILD = textwrap.dedent("""
    import random, sys, threading
    from nydusd.config import CacheConfig, FileCacheConfig, LocalFsConfig
    from nydusd.storage.backend.localfs import LocalFsBackend
    from nydusd.storage.cache import create_cache
    from nydusd.storage.device import BlobDevice
    from tests.storage.test_cache_crash import make_blob

    blob_dir, work_dir, compressed, seed = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
    blob = make_blob()
    backend = LocalFsBackend(LocalFsConfig(dir=blob_dir))
    cfg = CacheConfig(type="blobcache", compressed=compressed, filecache=FileCacheConfig(work_dir=work_dir))
    device = BlobDevice([blob.info], create_cache(cfg, backend, batch_size=0))

    def reader(n):
        rng = random.Random(seed * 100 + n)
        while True:
            f = rng.randrange(len(blob.files))
            off = rng.randrange(len(blob.contents[f]))
            size = rng.randrange(1, 4 * 65536)
            if device.read(blob.files[f], off, size) != blob.contents[f][off:off + size]:
                print("MISMATCH", f, off, size, flush=True)
                sys.exit(3)

    for n in range(6):
        threading.Thread(target=reader, args=(n,), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()
""")


def make_blob() -> TestBlob:
    return build_blob([mixed_content(16 << 20, seed=s) for s in range(3)], chunk_size=CHUNK)


def ready_chunks_are_intact(blob: TestBlob, work_dir: Path, compressed: bool) -> int:
    """Check every chunk whose ready bit is set against the truth; return how many are ready."""
    data_file = work_dir / (blob.blob_id + (".blob.raw" if compressed else ".blob.data"))
    bitmap = (Path(str(data_file) + ".chunk_map")).read_bytes()[HEADER_SIZE:]
    data = data_file.read_bytes()
    chunks = {c.index: (c, content[c.file_offset:c.file_offset + CHUNK])
              for chunks_, content in zip(blob.files, blob.contents, strict=True) for c in chunks_}
    ready = 0
    for index, (chunk, plain) in chunks.items():
        if not bitmap[index >> 3] & (0x80 >> (index & 7)):
            continue
        ready += 1
        if compressed:
            stored = data[chunk.compressed_offset:chunk.compressed_offset + chunk.compressed_size]
            expected = blob.data[chunk.compressed_offset:chunk.compressed_offset + chunk.compressed_size]
        else:
            stored = data[chunk.uncompressed_offset:chunk.uncompressed_offset + chunk.uncompressed_size]
            expected = plain
        assert stored == expected, f"chunk {index} is marked ready but its bytes are wrong"
    return ready


@pytest.mark.slow
@pytest.mark.parametrize("compressed", [False, True])
def test_kill_during_cache_writes_never_serves_torn_chunks(tmp_path: Path, compressed: bool) -> None:
    blob = make_blob()
    blob_dir = write_blobs({blob.blob_id: blob.data}, tmp_path / "blobs")
    work_dir = tmp_path / "cache"
    rng = random.Random(1)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    progress = []
    for round_ in range(4):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(blob_dir), str(work_dir), "1" if compressed else "0",
             str(round_)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.01, 0.06))
            assert child.poll() is None, "the child died before it was killed"
            child.send_signal(signal.SIGKILL)
            child.wait(10)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            if child.stdout is not None:
                out = child.stdout.read()
                child.stdout.close()
        assert "MISMATCH" not in out
        assert child.returncode == -signal.SIGKILL
        progress.append(ready_chunks_are_intact(blob, work_dir, compressed))
    # the kills must have landed while the cache was still filling, or nothing was exercised
    assert progress[-1] > 0 and progress[0] < blob.info.chunk_count, progress

    # a fresh process-equivalent: everything served is right, cached chunks are not refetched
    backend = MemoryBackend({blob.blob_id: blob.data})
    cfg = CacheConfig(type="blobcache", compressed=compressed,
                      filecache=FileCacheConfig(work_dir=str(work_dir)))
    device = BlobDevice([blob.info], create_cache(cfg, backend, batch_size=0))
    try:
        for chunks, content in zip(blob.files, blob.contents, strict=True):
            assert device.read(chunks, 0, len(content)) == content
        assert backend.read_count == blob.info.chunk_count - progress[-1]
    finally:
        device.close()
