"""Backend waits (storage/waits.py): bounded per image and in total, refused at once beyond the
bounds, and all woken with EIO when the image is unmounted -- through the real blob cache."""

from __future__ import annotations

import errno
import threading
import time
from pathlib import Path

import pytest

from nydusd.config import CacheConfig, FileCacheConfig
from nydusd.errors import BackendError
from nydusd.storage import waits
from nydusd.storage.cache import create_cache
from nydusd.storage.device import BlobDevice
from nydusd.storage.waits import BackendBusy, BackendWaits, ImageDetached
from tests.harness.fakes.backends import MemoryBackend
from tests.harness.fakes.blobs import build_blob

CHUNK = 0x10000


def _blocked(gate: threading.Event, started: threading.Semaphore):  # type: ignore[no-untyped-def]
    def fetch() -> str:
        started.release()
        gate.wait(30)
        return "late"
    return fetch


def _spawn(w: BackendWaits, fetch, results: list) -> threading.Thread:  # type: ignore[no-untyped-def]
    def run() -> None:
        try:
            results.append(w.run(fetch))
        except BaseException as exc:  # noqa: BLE001
            results.append(exc)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_results_and_errors_pass_through() -> None:
    w = BackendWaits("/a")
    assert w.run(lambda: 42) == 42
    with pytest.raises(BackendError, match="boom"):
        w.run(lambda: (_ for _ in ()).throw(BackendError("boom")))
    assert w.waiting == 0


def test_per_mount_bound_refuses_at_once_and_other_mounts_still_run(logs) -> None:  # type: ignore[no-untyped-def]
    gate, started = threading.Event(), threading.Semaphore(0)
    hung, other = BackendWaits("/hang", per_mount=3), BackendWaits("/fresh", per_mount=3)
    results: list = []
    threads = [_spawn(hung, _blocked(gate, started), results) for _ in range(3)]
    for _ in range(3):
        assert started.acquire(timeout=5)
    with logs.expect("backend_waits_exhausted", count=1):
        start = time.monotonic()
        with pytest.raises(BackendBusy) as exc:
            hung.run(lambda: "never")
        assert time.monotonic() - start < 0.1 and exc.value.errno == errno.EIO
        with pytest.raises(BackendBusy):
            hung.run(lambda: "never")  # logged once per second at most
    assert other.run(lambda: "fresh") == "fresh"
    assert hung.refused == 2 and hung.waiting == 3
    gate.set()
    for t in threads:
        t.join(5)
    assert results == ["late"] * 3 and hung.waiting == 0


def test_shared_bound_covers_all_mounts(monkeypatch, logs) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(waits._budget, "limit", 4)
    gate, started = threading.Event(), threading.Semaphore(0)
    a, b, c = BackendWaits("/a"), BackendWaits("/b"), BackendWaits("/c")
    results: list = []
    threads = [_spawn(m, _blocked(gate, started), results) for m in (a, a, b, b)]
    for _ in range(4):
        assert started.acquire(timeout=5)
    with logs.expect("backend_waits_exhausted"), pytest.raises(BackendBusy):
        c.run(lambda: "never")
    gate.set()
    for t in threads:
        t.join(5)
    assert c.run(lambda: "now") == "now"


def test_cancel_wakes_every_waiter_and_refuses_new_ones(logs) -> None:  # type: ignore[no-untyped-def]
    gate, started = threading.Event(), threading.Semaphore(0)
    w = BackendWaits("/hang")
    results: list = []
    threads = [_spawn(w, _blocked(gate, started), results) for _ in range(5)]
    for _ in range(5):
        assert started.acquire(timeout=5)
    start = time.monotonic()
    with logs.expect("backend_waits_cancelled", count=1):
        assert w.cancel() == 5
    for t in threads:
        t.join(5)
    assert time.monotonic() - start < 1.0
    assert len(results) == 5 and all(isinstance(r, ImageDetached) for r in results)
    with pytest.raises(ImageDetached):
        w.run(lambda: "after")
    assert w.cancel() == 0 and w.waiting == 0
    gate.set()  # the helpers finish later, into futures nobody waits for


def test_device_abort_fails_readers_blocked_on_the_backend(tmp_path: Path, logs) -> None:  # type: ignore[no-untyped-def]
    """Through the real cache: readers of a backend that never answers (one fetching, the others
    waiting on its flight) all get EIO at once when the device is aborted (the umount's first step)."""
    blob = build_blob([bytes(range(256)) * (4 * CHUNK // 256)], chunk_size=CHUNK)
    backend = MemoryBackend({blob.blob_id: blob.data})
    backend.gate = threading.Event()
    cfg = CacheConfig(type="blobcache", filecache=FileCacheConfig(work_dir=str(tmp_path)))
    device = BlobDevice([blob.info], create_cache(cfg, backend, batch_size=0))
    results: list = []

    def reader() -> None:
        try:
            results.append(device.read(blob.files[0], 100, 1000))
        except BaseException as exc:  # noqa: BLE001
            results.append(exc)

    threads = [threading.Thread(target=reader, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while device.cache_manager.waits.waiting < 4:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    start = time.monotonic()
    with logs.expect("backend_waits_cancelled", count=1):
        device.abort()
    for t in threads:
        t.join(5)
    assert time.monotonic() - start < 1.0
    assert len(results) == 4 and all(isinstance(r, ImageDetached) for r in results), results
    backend.gate.set()
    device.close()


def test_helper_threads_are_reused() -> None:
    w = BackendWaits("/a")
    w.run(lambda: None)
    before = threading.active_count()
    for _ in range(200):
        assert w.run(lambda: 7) == 7
    assert threading.active_count() - before <= 1
