"""On-demand reads go first (pure tier), proven by the order of backend requests, not wall time.

A streaming in-memory backend records every on-demand request and every piece a streamed prefetch
pulls, in the order they happen, into one event list. The tests check that a reader's miss is
fetched before the prefetch requests queued ahead of it, that a streamed prefetch stops pulling
while a reader fetches (and keeps pulling when the reader waits for one of its own chunks), and
that no chunk's bytes are fetched twice.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from nydusd.config import CacheConfig, FileCacheConfig, PrefetchConfig
from nydusd.storage.cache import base as cache_base
from nydusd.storage.cache import create_cache
from nydusd.storage.cache import manager as cache_manager
from nydusd.storage.device import BlobDevice
from tests.harness.fakes.backends import MemoryBackend
from tests.harness.fakes.blobs import TestBlob, build_blob

CHUNK = 0x10000


class _Stream:
    def __init__(self, backend: StreamingBackend, blob_id: str, offset: int, size: int) -> None:
        self.backend, self.blob_id, self.pos, self.end = backend, blob_id, offset, offset + size

    def readinto(self, view: memoryview) -> None:
        self.backend.piece_started.set()
        gate = self.backend.piece_gate
        if gate is not None:
            gate.wait(30)
        n = len(view)
        view[:] = self.backend.blobs[self.blob_id][self.pos:self.pos + n]
        self.backend.record(("piece", self.pos, n))
        self.pos += n

    def close(self) -> None:
        pass


class StreamingBackend(MemoryBackend):
    """Ranges stream piece by piece; ``events`` is the order of on-demand reads and prefetch pieces
    (``("read", offset, size)`` when an on-demand read is served, ``("piece", offset, size)`` per
    piece a prefetch stream pulls). ``read_gate`` holds on-demand reads, ``piece_gate`` pieces."""

    streams_ranges = True

    def __init__(self, blobs: dict[str, bytes]) -> None:
        super().__init__(blobs)
        self.events: list[tuple[str, int, int]] = []
        self.read_gate: threading.Event | None = None
        self.piece_gate: threading.Event | None = None
        self.read_started = threading.Event()
        self.piece_started = threading.Event()

    def record(self, event: tuple[str, int, int]) -> None:
        with self._lock:
            self.events.append(event)

    def try_read(self, blob_id: str, offset: int, size: int, *, prefetch: bool = False) -> bytes:
        assert not prefetch, "prefetch must stream"
        self.read_started.set()
        gate = self.read_gate
        if gate is not None:
            gate.wait(30)
        self.record(("read", offset, size))
        return self.blobs[blob_id][offset:offset + size]

    def try_open_range(self, blob_id: str, offset: int, size: int, *, prefetch: bool = False) -> Any:
        return _Stream(self, blob_id, offset, size)


@pytest.fixture
def blob() -> TestBlob:
    return build_blob([os.urandom(16 * CHUNK), os.urandom(4 * CHUNK)], chunk_size=CHUNK)


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    # one chunk per streamed piece, and a pause bound far beyond any test: the order of events
    # alone decides, never a timeout
    monkeypatch.setattr(cache_base, "STREAM_PIECE", CHUNK)
    monkeypatch.setattr(cache_manager, "PREFETCH_YIELD_SECONDS", 60.0)


def make_device(blob: TestBlob, backend: MemoryBackend, work_dir: Path, **prefetch: object) -> BlobDevice:
    cfg = CacheConfig(type="blobcache", filecache=FileCacheConfig(work_dir=str(work_dir)))
    return BlobDevice([blob.info], create_cache(cfg, backend, batch_size=0),
                      prefetch_config=PrefetchConfig(enable=True, **prefetch))  # type: ignore[arg-type]


def assert_fetched_once(events: list[tuple[str, int, int]], blob: TestBlob) -> None:
    """Every byte of the blob that was fetched at all was fetched by exactly one event."""
    seen = bytearray(len(blob.data))
    for _kind, offset, size in events:
        for i in range(offset, offset + size):
            seen[i] += 1
    assert max(seen) == 1, "a chunk was fetched twice"


def reader(device: BlobDevice, chunks: Any, offset: int, size: int, out: list[bytes]) -> threading.Thread:
    t = threading.Thread(target=lambda: out.append(device.read(chunks, offset, size)), daemon=True)
    t.start()
    return t


def test_a_miss_overtakes_queued_prefetch_and_is_not_fetched_again(tmp_path: Path, blob: TestBlob) -> None:
    backend = StreamingBackend({blob.blob_id: blob.data})
    backend.piece_gate = threading.Event()           # the prefetch stream is stuck in its first piece
    device = make_device(blob, backend, tmp_path, threads=1, batch_size=4 * CHUNK)
    try:
        assert device.prefetch(blob.files[0]) == 4   # 4 runs of 4 chunks, one worker
        out: list[bytes] = []
        t = reader(device, blob.files[0], 14 * CHUNK + 5, 100, out)   # in the last queued run
        t.join(10)
        assert out == [blob.contents[0][14 * CHUNK + 5:14 * CHUNK + 105]]
        assert backend.events[0][0] == "read"        # served while the prefetch is still stuck
        backend.piece_gate.set()
        assert device.wait_prefetch(10)
        assert all(device.is_ready(c) for c in blob.files[0])
        reads = [e for e in backend.events if e[0] == "read"]
        assert reads == [("read", blob.files[0][14].compressed_offset, blob.files[0][14].compressed_size)]
        assert_fetched_once(backend.events, blob)
    finally:
        backend.piece_gate.set()
        device.close()


def test_streamed_prefetch_stops_pulling_while_a_reader_fetches(tmp_path: Path, blob: TestBlob) -> None:
    backend = StreamingBackend({blob.blob_id: blob.data})
    backend.piece_gate = threading.Event()
    backend.read_gate = threading.Event()
    device = make_device(blob, backend, tmp_path, threads=1, batch_size=16 * CHUNK)
    try:
        assert device.prefetch(blob.files[0]) == 1   # one stream of 16 pieces
        assert backend.piece_started.wait(10)        # the stream is in its first piece
        out: list[bytes] = []
        t = reader(device, blob.files[1], 0, 100, out)   # a chunk the prefetch does not cover
        assert backend.read_started.wait(10)         # the reader is inside its backend request
        backend.piece_gate.set()                     # the stream may go on: it must not, yet
        assert not device.wait_prefetch(0.3)
        assert all(e[0] == "piece" for e in backend.events) and len(backend.events) <= 1
        backend.read_gate.set()
        t.join(10)
        assert out == [blob.contents[1][:100]]
        assert device.wait_prefetch(10)
        kinds = [e[0] for e in backend.events]
        assert kinds.count("piece") == 16 and kinds.index("read") == 1
        assert device.cache_manager.prefetch_pauses > 0
        assert_fetched_once(backend.events, blob)
    finally:
        backend.piece_gate.set()
        backend.read_gate.set()
        device.close()


def test_prefetch_that_a_reader_waits_for_keeps_pulling(tmp_path: Path, blob: TestBlob) -> None:
    """A reader waiting for a chunk of a paused stream wakes the stream up, even while another
    reader's fetch is still running (no pause-until-timeout)."""
    backend = StreamingBackend({blob.blob_id: blob.data})
    backend.piece_gate = threading.Event()
    backend.read_gate = threading.Event()
    device = make_device(blob, backend, tmp_path, threads=1, batch_size=16 * CHUNK)
    try:
        device.prefetch(blob.files[0])
        assert backend.piece_started.wait(10)                      # its chunks are claimed
        busy: list[bytes] = []
        slow = reader(device, blob.files[1], 0, 100, busy)         # held in the backend
        assert backend.read_started.wait(10)
        backend.piece_gate.set()
        out: list[bytes] = []
        t = reader(device, blob.files[0], 12 * CHUNK, 100, out)    # claimed by the stream
        t.join(10)
        assert out == [blob.contents[0][12 * CHUNK:12 * CHUNK + 100]]
        assert not busy                                            # the other reader still waits
        assert [e[0] for e in backend.events[:13]] == ["piece"] * 13
        backend.read_gate.set()
        slow.join(10)
        assert device.wait_prefetch(10)
        assert_fetched_once(backend.events, blob)
    finally:
        backend.piece_gate.set()
        backend.read_gate.set()
        device.close()


def test_replayed_order_is_fetched_in_order_in_merged_requests(tmp_path: Path) -> None:
    """A prefetch list (a recorded access order) is fetched in its order; chunks adjacent in the
    blob merge into one request whatever their distance in the list."""
    blob = build_blob([os.urandom(CHUNK) for _ in range(6)], chunk_size=CHUNK)   # f0..f5 in blob order
    backend = StreamingBackend({blob.blob_id: blob.data})
    backend.piece_gate = threading.Event()
    device = make_device(blob, backend, tmp_path, threads=1, batch_size=2 * CHUNK)
    try:
        order = [blob.files[i][0] for i in (4, 1, 5, 0, 2)]
        # f4+f5 and f0+f1 merge (2 chunks per request); f2 alone; f3 never asked for
        assert device.prefetch(order) == 3
        backend.piece_gate.set()
        assert device.wait_prefetch(10)
        starts = [off for kind, off, _ in backend.events if kind == "piece"]
        expect = [blob.files[i][0].compressed_offset for i in (4, 5, 0, 1, 2)]
        assert starts == expect
        assert not device.is_ready(blob.files[3][0])
        assert_fetched_once(backend.events, blob)
    finally:
        backend.piece_gate.set()
        device.close()


@pytest.mark.parametrize("bulk", [False, True])
def test_bulk_prefetch_stays_paused_after_a_reader_fetched(tmp_path: Path, blob: TestBlob, bulk: bool,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A starting container misses in bursts: ``prefetch_all`` (bulk) does not resume between two
    of its fetches; hinted prefetch (a replayed table) resumes at once."""
    monkeypatch.setattr(cache_manager, "BULK_QUIET_SECONDS", 60.0)
    monkeypatch.setattr(cache_manager, "BULK_YIELD_SECONDS", 60.0)
    backend = StreamingBackend({blob.blob_id: blob.data})
    backend.piece_gate = threading.Event()
    device = make_device(blob, backend, tmp_path, threads=1, batch_size=16 * CHUNK)
    try:
        prefetcher = device.start_prefetch()
        assert prefetcher is not None
        assert prefetcher.submit(blob.files[0], bulk=bulk) == 1
        if bulk:   # a fresh mount counts as a read: the container started on it goes first
            assert not backend.piece_started.wait(0.3)
            device.cache_manager._ondemand_ended = 0.0
        assert backend.piece_started.wait(10)
        assert device.read(blob.files[1], 0, 100) == blob.contents[1][:100]   # a finished fetch
        backend.piece_gate.set()
        if bulk:
            assert not device.wait_prefetch(0.3)
            assert [e[0] for e in backend.events] == ["read", "piece"]   # the piece it was in
            device.cache_manager._ondemand_ended = 0.0                   # the quiet period is over
        assert device.wait_prefetch(10)
        assert [e[0] for e in backend.events].count("piece") == 16
    finally:
        backend.piece_gate.set()
        device.close()


def test_a_reader_never_waits_for_a_bulk_stream_to_reach_its_chunk(tmp_path: Path, blob: TestBlob) -> None:
    """``prefetch_all`` streams long ranges; it claims chunks piece by piece, so a reader of a chunk
    far ahead in the stream fetches it at once (the stream drops those bytes when it gets there)."""
    backend = StreamingBackend({blob.blob_id: blob.data})
    backend.piece_gate = threading.Event()
    device = make_device(blob, backend, tmp_path, threads=1, batch_size=16 * CHUNK)
    device.cache_manager._ondemand_ended = 0.0        # mounted long ago: no start-up quiet period
    try:
        prefetcher = device.start_prefetch()
        assert prefetcher is not None
        assert prefetcher.submit(blob.files[0], bulk=True) == 1
        assert backend.piece_started.wait(10)       # the stream is stuck in its first piece
        out: list[bytes] = []
        t = reader(device, blob.files[0], 12 * CHUNK, 100, out)
        t.join(10)
        assert out == [blob.contents[0][12 * CHUNK:12 * CHUNK + 100]]
        assert backend.events == [("read", blob.files[0][12].compressed_offset,
                                   blob.files[0][12].compressed_size)]
        backend.piece_gate.set()
        device.cache_manager._ondemand_ended = 0.0
        assert device.wait_prefetch(10)
        assert all(device.is_ready(c) for c in blob.files[0])
        assert device.metrics()["prefetch_unmerged_chunks"] == 15   # all but the reader's chunk
    finally:
        backend.piece_gate.set()
        device.close()
