"""Fault suite of the file cache: a data file damaged between two runs (truncated, truncated and
re-extended, holed, replaced by an empty file, a directory, a fifo or a file the daemon user cannot
open) is never served as zeros -- chunks whose bytes are gone are fetched again, a data file that
cannot be used is a clear error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nydusd.errors import BackendError
from nydusd.storage.cache.chunkmap import HEADER_SIZE, MAGIC_ALL_READY
from tests.harness.fakes.backends import MemoryBackend
from tests.harness.fakes.blobs import TestBlob, build_blob
from tests.storage.test_cache import CHUNK, device_for, file_cache


@pytest.fixture
def blob() -> TestBlob:
    """Incompressible chunks (stored raw) so truncating at a chunk boundary is easy to reason about."""
    return build_blob([os.urandom(8 * CHUNK)], chunk_size=CHUNK)


def data_file(tmp_path: Path, blob: TestBlob, compressed: bool) -> Path:
    return tmp_path / (blob.blob_id + (".blob.raw" if compressed else ".blob.data"))


def warm(tmp_path: Path, blob: TestBlob, backend: MemoryBackend, compressed: bool) -> None:
    device = device_for(blob, backend, file_cache(tmp_path, compressed=compressed))
    try:
        assert device.read(blob.files[0], 0, 8 * CHUNK) == blob.contents[0]
    finally:
        device.close()
    raw = (tmp_path / (data_file(tmp_path, blob, compressed).name + ".chunk_map")).read_bytes()
    assert int.from_bytes(raw[12:16], "little") == MAGIC_ALL_READY  # every chunk marked ready


def read_all(tmp_path: Path, blob: TestBlob, backend: MemoryBackend, compressed: bool) -> bytes:
    device = device_for(blob, backend, file_cache(tmp_path, compressed=compressed))
    try:
        return device.read(blob.files[0], 0, 8 * CHUNK)
    finally:
        device.close()


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("damage", ["truncate", "truncate_and_extend", "punch_middle"])
def test_missing_bytes_behind_ready_bits_are_fetched_again(tmp_path: Path, blob: TestBlob, compressed: bool,
                                                           damage: str, logs) -> None:  # type: ignore[no-untyped-def]
    backend = MemoryBackend({blob.blob_id: blob.data})
    warm(tmp_path, blob, backend, compressed)
    path = data_file(tmp_path, blob, compressed)
    full = path.stat().st_size
    if damage == "punch_middle":
        # what an old run's open left after a truncation: a hole in the middle of a full-size file
        data = path.read_bytes()
        os.truncate(path, 2 * CHUNK)
        with path.open("r+b") as f:
            f.seek(5 * CHUNK)
            f.write(data[5 * CHUNK:])
    else:
        os.truncate(path, 2 * CHUNK + 100)  # mid-chunk: chunk 2 is only partly there
        if damage == "truncate_and_extend":
            os.truncate(path, full)
    missing = {2, 3, 4} if damage == "punch_middle" else set(range(2, 8))

    backend.reset_stats()
    with logs.expect("cached_chunk_missing", count=len(missing)):
        if damage == "truncate":
            with logs.expect("cache_data_short", count=1):
                assert read_all(tmp_path, blob, backend, compressed) == blob.contents[0]
        else:
            assert read_all(tmp_path, blob, backend, compressed) == blob.contents[0]
    fetched = {off // CHUNK for _, off, size, _ in backend.requests for off in range(off, off + size, CHUNK)}
    assert fetched == missing
    # the refetched chunks are marked again: the next run reads nothing from the backend
    backend.reset_stats()
    assert read_all(tmp_path, blob, backend, compressed) == blob.contents[0]
    assert backend.read_count == 0
    bits = (tmp_path / (path.name + ".chunk_map")).read_bytes()
    assert bits[HEADER_SIZE] == 0xFF


@pytest.mark.parametrize("compressed", [False, True])
def test_data_file_replaced_by_an_empty_file_is_refetched(tmp_path: Path, blob: TestBlob, compressed: bool,
                                                          logs) -> None:  # type: ignore[no-untyped-def]
    backend = MemoryBackend({blob.blob_id: blob.data})
    warm(tmp_path, blob, backend, compressed)
    path = data_file(tmp_path, blob, compressed)
    path.unlink()
    path.write_bytes(b"")
    backend.reset_stats()
    with logs.expect("cache_data_missing", count=1):
        assert read_all(tmp_path, blob, backend, compressed) == blob.contents[0]
    assert backend.bytes_read == len(blob.data)


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_data_file_that_is_not_a_regular_file_is_a_clear_error(tmp_path: Path, blob: TestBlob,
                                                               kind: str) -> None:
    backend = MemoryBackend({blob.blob_id: blob.data})
    warm(tmp_path, blob, backend, False)
    path = data_file(tmp_path, blob, False)
    path.unlink()
    if kind == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)
    expected = "cannot open the blob cache files: (Is a directory|not a regular file)"
    with pytest.raises(BackendError, match=expected):
        read_all(tmp_path, blob, backend, False)
    assert path.is_dir() if kind == "directory" else path.is_fifo()  # left alone for the operator


CHILD = """
import sys
from nydusd.errors import BackendError
from tests.harness.fakes.backends import MemoryBackend
from tests.harness.fakes.blobs import build_blob
from tests.storage.test_cache import CHUNK, device_for, file_cache

blob = build_blob([bytes(range(256)) * 2048], chunk_size=CHUNK)
try:
    device = device_for(blob, MemoryBackend({blob.blob_id: blob.data}), file_cache(sys.argv[1]))
    data = device.read(blob.files[0], 0, CHUNK)
except BackendError as e:
    print("ERROR", e)
else:
    print("READ", data == blob.contents[0][:CHUNK])
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a file another user cannot read")
def test_data_file_the_daemon_user_cannot_open_is_a_clear_error(tmp_path: Path) -> None:
    import shutil
    import subprocess
    import sys
    import tempfile

    root = Path(__file__).resolve().parents[2]
    work = Path(tempfile.mkdtemp(prefix="nydus-cache-perm-"))  # outside pytest's 0700 tmp tree
    try:
        os.chmod(work, 0o777)
        blob = build_blob([bytes(range(256)) * 2048], chunk_size=CHUNK)
        backend = MemoryBackend({blob.blob_id: blob.data})
        device = device_for(blob, backend, file_cache(work))
        device.read(blob.files[0], 0, 8 * CHUNK)
        device.close()
        for p in work.iterdir():
            os.chmod(p, 0o600)  # root's files: the other user can neither read nor write them
        run = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                              sys.executable, "-c", CHILD, str(work)],
                             capture_output=True, text=True, cwd=root,
                             env={**os.environ, "PYTHONPATH": str(root)}, timeout=60)
        expected = "ERROR cannot open the blob cache files: Permission denied"
        assert expected in run.stdout, run.stdout + run.stderr
    finally:
        shutil.rmtree(work)
