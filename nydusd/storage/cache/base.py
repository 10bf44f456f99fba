"""One blob's cache and the fetch path every cache shares (design R7).

Owns: ``BlobCache`` -- one blob's cache: ``read_chunks`` (on-demand: cached chunks from local
state, missing ones fetched through singleflight, adjacent misses merged into one ranged backend
read, fetched payloads decoded and verified, refetched once on a mismatch), ``missing`` and
``prefetch_chunks`` (background fill that never waits for other fetches). Subclasses (``dummy``,
``blobcache``) supply only local state: ``is_ready``, ``_load`` and ``_persist``. The manager
that owns the caches of one backend (metrics, activity gate, prefetch workers) is in
``manager.py``; a cache sees it only as a ``CacheOwner``.

Must not import rafs, fs, daemon or any transport: the backend is any object with
``read(blob_id, offset, size, *, prefetch)`` and ``metrics()`` (a ``CacheBackend``).

Threading: all methods may be called concurrently from FUSE workers (llfuse lock released) and
prefetch threads. No lock is held across backend I/O: chunk fetches are coordinated per chunk by
``SingleFlight`` (claim -> fetch -> persist -> mark ready -> resolve); local files use
``pread``/``pwrite`` at fixed offsets.
Prefetch streams each merged range (``backend.open_range``) in pieces of ``STREAM_PIECE`` bytes
into a buffer owned by the calling thread (``threading.local``), decoding, storing and resolving
each piece's chunks while the rest of the range is still on the wire.
A chunk key is the chunk's ``compressed_offset`` (unique inside a blob; deduplicated chunks share it).

Over 500 lines because the on-demand and the prefetch paths share the claim, decode, refetch and
settle steps of one protocol (``README.md``); a split would export those internals to each other.
"""

from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, TypeVar

from nydusd.errors import BackendError, IntegrityError, NydusError, Unsupported
from nydusd.log import get_logger
from nydusd.metrics import BlobcacheMetrics
from nydusd.storage.cache.singleflight import SingleFlight
from nydusd.storage.chunk import (
    CHUNK_FLAG_BATCH,
    CHUNK_FLAG_ENCRYPTED,
    BlobInfo,
    ChunkInfo,
    chunk_key,
    decode_chunk,
    decode_chunk_into,
)
from nydusd.storage.waits import BackendWaits

log = get_logger(__name__)
T = TypeVar("T")

#: a streamed prefetch checks whether to pause before every this many bytes it pulls
YIELD_SLICE = 256 << 10
_MAX_ROUNDS = 4  # a chunk whose fetch was abandoned by its leader is looked up again this often
#: payload bytes a prefetch reads from a streamed range before decoding and storing them
STREAM_PIECE = 2 << 20
#: plain bytes one piece may decode to (a piece holds at least one chunk whatever its size)
STREAM_PLAIN = 4 << 20
_tls = threading.local()
#: streamed prefetches decode and store at most this many pieces at once (process-wide): more
#: threads than CPUs doing that work only trade places on the CPUs, the GIL and the file's write
#: lock, while their connections can keep streaming (the socket buffers absorb the wait)
_CPU_SLOTS = threading.BoundedSemaphore(max(2, os.cpu_count() or 2))


def _thread_buffer(name: str, size: int, floor: int) -> memoryview:
    """A writable buffer of ``size`` bytes owned by the calling thread, reused across pieces (fresh
    memory costs page faults on every use). Valid until this thread's next call for ``name``."""
    if size > floor:  # an unusually large chunk: a one-off buffer, so idle workers stay small
        return memoryview(bytearray(size))
    buf: memoryview | None = getattr(_tls, name, None)
    if buf is None:
        buf = memoryview(bytearray(floor))
        setattr(_tls, name, buf)
    return buf[:size]


class CacheBackend(Protocol):
    """What the cache needs of a backend (``nydusd.storage.backend.base.BlobBackend`` fits)."""

    def read(self, blob_id: str, offset: int, size: int, *, prefetch: bool = False) -> bytes: ...

    def metrics(self) -> dict[str, Any]: ...


class CacheOwner(Protocol):
    """What a blob cache needs of the manager that owns it (``manager.BlobCacheManager``)."""

    backend: CacheBackend
    batch_size: int
    verify_fetched: bool
    verify_cached: bool
    #: blob cache metrics (spec §8.4); the API reads them through the manager's ``metrics()``
    counters: BlobcacheMetrics
    waits: BackendWaits

    def ondemand(self) -> AbstractContextManager[None]: ...

    def prefetch_yield(self, wanted: Callable[[], bool], *, bulk: bool = False) -> None: ...


@dataclass
class Fetched:
    """One fetched chunk: its stored payload and its verified plain bytes (None when nobody needs
    them: a prefetch into a cache that stores payloads, without verification)."""

    chunk: ChunkInfo
    payload: memoryview
    plain: bytes | memoryview | None


class BlobCache(ABC):
    """The cache of one blob. See the module docstring for the fetch protocol."""

    #: whether local state keeps the stored (compressed) payload rather than plain bytes
    stores_payload = False
    #: whether ``read_cached`` serves parts of ready chunks (else only whole chunks come out)
    partial_reads = False

    def __init__(self, blob: BlobInfo, manager: CacheOwner) -> None:
        self.blob = blob
        self.manager = manager
        self.backend = manager.backend
        self._flights: SingleFlight[int] = SingleFlight()

    # ------------------------------------------------------------------ subclass hooks
    @abstractmethod
    def is_ready(self, chunk: ChunkInfo) -> bool:
        """Whether the chunk's bytes are in local state (cheap, non-blocking)."""

    @abstractmethod
    def _load(self, chunk: ChunkInfo) -> bytes | None:
        """Plain bytes of a ready chunk from local state; ``None`` if unusable (short, corrupt)."""

    @abstractmethod
    def _persist(self, items: Sequence[Fetched]) -> None:
        """Store fetched chunks durably, then mark them ready. May raise OSError."""

    def read_nowait(self, chunk: ChunkInfo, lo: int, hi: int) -> memoryview | None:
        """Plain bytes ``[lo, hi)`` of a ready chunk if they can be had without blocking (no lock
        held for long, no disk wait), in a buffer owned by the calling thread that stays valid
        until its next call; else None (nothing counted). For callers that hold a global lock
        (llfuse's) and reply before their next read."""
        return None

    def read_cached(self, chunks: Sequence[ChunkInfo], lo: int, hi: int) -> bytes | None:
        """Plain bytes of consecutive file chunks ``chunks`` (all of this blob) from byte ``lo`` of
        the first to byte ``hi`` of the last, straight from local state, when the cache can serve
        parts of chunks without reading and verifying them whole (counted as one read whose
        chunks were all cached); else None (nothing counted: the caller takes ``read_chunks``)."""
        return None

    def all_ready(self) -> bool:
        """Whether every chunk of the blob is in local state (never, without local state)."""
        return False

    def close(self) -> None:  # noqa: B027 - optional hook; caches without local state keep nothing
        """Release local resources. Idempotent."""

    def bulk_write(self) -> AbstractContextManager[None]:
        """Context of a bulk (streamed prefetch) write: a cache may defer its syncs meanwhile."""
        return nullcontext()

    # ------------------------------------------------------------------ on-demand path
    def read_chunks(self, chunks: Iterable[ChunkInfo], *,
                    amplify: Sequence[ChunkInfo] = ()) -> dict[int, bytes]:
        """Verified plain bytes of ``chunks``, keyed by ``chunk_key``.

        ``amplify``: further chunks (in file order) worth fetching in the same backend request
        when they directly follow a missing chunk (user I/O amplification, ``batch_size``).
        Raises IntegrityError when a chunk fails verification twice, BackendError/BlobNotFound
        when the backend fails, Unsupported for chunk kinds this cache cannot serve.
        """
        want = _unique(chunks)
        out: dict[int, bytes] = {}
        force: set[int] = set()
        for key, chunk in want.items():
            if self.is_ready(chunk):
                data = self._load(chunk)
                if data is None:
                    force.add(key)
                else:
                    out[key] = data
        hits = len(out)
        missing = {k: c for k, c in want.items() if k not in out}
        if missing:
            # on a helper thread: the waiting reader is bounded and woken at umount (storage/waits.py)
            out = self.manager.waits.run(partial(self._fetch_on_demand, missing, force, amplify, out))
        self.manager.counters.record_read(len(want), hits)
        return out

    def _fetch_on_demand(self, missing: dict[int, ChunkInfo], force: set[int],
                         amplify: Sequence[ChunkInfo], out: dict[int, bytes]) -> dict[int, bytes]:
        with self.manager.ondemand():
            self._fetch_missing(missing, force, amplify, out)
        return out

    def _fetch_missing(self, missing: dict[int, ChunkInfo], force: set[int],
                       amplify: Sequence[ChunkInfo], out: dict[int, bytes]) -> None:
        for _ in range(_MAX_ROUNDS):
            claim = self._flights.claim(missing, is_ready=self._ready_check(missing, force))
            if claim.owned:
                owned = [missing[k] for k in claim.owned]
                try:
                    extra = self._claim_amplify(owned, amplify)
                except BaseException as exc:
                    self._withdraw(claim.owned, exc)
                    raise
                fetched = self._fetch_owned(owned + extra, prefetch=False)
                out.update((k, fetched[k]) for k in claim.owned)
            for key in claim.ready:
                data = self._load(missing[key])
                if data is None:
                    force.add(key)
                else:
                    out[key] = data
            for key, flight in claim.waiting.items():
                try:
                    data = flight.wait()
                except NydusError:
                    if not flight.prefetch:
                        raise
                    data = None  # a failed prefetch must not fail a read: fetch it ourselves
                if data is not None:
                    out[key] = data
            missing = {k: c for k, c in missing.items() if k not in out}
            if not missing:
                return
        raise BackendError("chunk fetch did not settle", blob_id=self.blob.blob_id,
                           chunks=len(missing))

    def _claim_amplify(self, owned: list[ChunkInfo], amplify: Sequence[ChunkInfo]) -> list[ChunkInfo]:
        """Claim chunks of ``amplify`` that extend the last missing run without a gap."""
        limit = self.manager.batch_size
        if not amplify or limit <= 0:
            return []
        ordered = sorted(owned, key=chunk_key)
        start = ordered[-1].compressed_offset
        end = start + ordered[-1].compressed_size
        for prev in reversed(ordered[:-1]):
            if prev.compressed_offset + prev.compressed_size != start:
                break
            start = prev.compressed_offset
        extra: list[ChunkInfo] = []
        owned_keys = {chunk_key(c) for c in owned}
        for chunk in amplify:
            if chunk_key(chunk) in owned_keys:
                continue
            if chunk.compressed_offset != end or end + chunk.compressed_size - start > limit:
                break
            if not self._flights.try_claim(chunk_key(chunk),
                                           is_ready=self._ready_check({chunk_key(chunk): chunk})):
                break
            extra.append(chunk)
            end += chunk.compressed_size
        return extra

    def _ready_check(self, by_key: dict[int, ChunkInfo],
                     force: AbstractSet[int] = frozenset()) -> Callable[[int], bool]:
        """An ``is_ready`` callback for the singleflight table (``force``: keys to refetch anyway)."""
        def ready(key: int) -> bool:
            return key not in force and self.is_ready(by_key[key])
        return ready

    def _withdraw(self, keys: Iterable[int], exc: BaseException) -> None:
        """Fail flights this caller claimed but will not fetch (claiming more failed, e.g. the
        cache was closed meanwhile): their waiters must not block forever."""
        err = exc if isinstance(exc, NydusError) else BackendError(f"chunk claim failed: {exc}")
        for key in keys:
            self._flights.fail(key, err)

    # ------------------------------------------------------------------ prefetch path
    def missing(self, chunks: Iterable[ChunkInfo]) -> list[ChunkInfo]:
        """The chunks of ``chunks`` (deduplicated) not yet in local state."""
        return [c for c in _unique(chunks).values() if not self.is_ready(c)]

    def prefetch_chunks(self, chunks: Iterable[ChunkInfo], *, merge_limit: int | None = None,
                        bulk: bool = False) -> tuple[int, int]:
        """Fetch the missing ones of ``chunks`` into local state; skips chunks someone else is
        already fetching. Adjacent chunks merge into requests of up to ``merge_limit`` bytes
        (default: the manager's ``batch_size``). Returns ``(chunks fetched, payload bytes
        fetched)``. Raises like ``read_chunks`` (the prefetcher logs and drops such failures).

        ``bulk`` (speculative whole-image prefetch, streaming backends): chunks are claimed piece
        by piece as the stream reaches them, not all at once, so a reader never waits for a long
        stream to reach its chunk: it fetches the chunk itself, and the stream drops those bytes
        (see ``_stream_group``)."""
        missing = {chunk_key(c): c for c in self.missing(chunks)}
        if bulk and hasattr(self.backend, "open_range"):
            return self._prefetch_lazily(list(missing.values()), merge_limit)
        ready = self._ready_check(missing)
        owned: list[ChunkInfo] = []
        try:
            for k, c in missing.items():
                if self._flights.try_claim(k, is_ready=ready, prefetch=True):
                    owned.append(c)
        except BaseException as exc:
            self._withdraw([chunk_key(c) for c in owned], exc)
            raise
        if not owned:
            return 0, 0
        self._fetch_owned(owned, prefetch=True, limit=merge_limit, bulk=bulk)
        return len(owned), sum(c.compressed_size for c in owned)

    def _prefetch_lazily(self, chunks: list[ChunkInfo], limit: int | None) -> tuple[int, int]:
        claimed: list[ChunkInfo] = []
        pending: set[int] = set()
        try:
            for group in self._plan(chunks, self.manager.batch_size if limit is None else limit):
                with self.bulk_write():
                    self._stream_group(group, pending, True, claimed)
        except BaseException as exc:
            err = exc if isinstance(exc, NydusError) else BackendError(f"chunk fetch failed: {exc}")
            for key in pending:
                self._flights.fail(key, err)
            if err is exc:
                raise
            raise err from exc
        return len(claimed), sum(c.compressed_size for c in claimed)

    def _claim_piece(self, piece: list[ChunkInfo], pending: set[int],
                     claimed: list[ChunkInfo]) -> list[ChunkInfo]:
        """Claim the chunks of ``piece`` nobody fetches and that are not ready (lazy claims)."""
        mine: list[ChunkInfo] = []
        for chunk in piece:
            key = chunk_key(chunk)
            if self._flights.try_claim(key, is_ready=self._ready_check({key: chunk}), prefetch=True):
                pending.add(key)
                mine.append(chunk)
        claimed.extend(mine)
        return mine

    # ------------------------------------------------------------------ shared fetch
    def _fetch_owned(self, chunks: list[ChunkInfo], *, prefetch: bool,
                     limit: int | None = None, bulk: bool = False) -> dict[int, bytes]:
        """Fetch chunks this caller leads; every flight is resolved or failed before returning.
        Returns the plain bytes of the chunks that were decoded (all of them on demand)."""
        result: dict[int, bytes] = {}
        pending = {chunk_key(c) for c in chunks}
        stream = prefetch and hasattr(self.backend, "open_range")
        try:
            for group in self._plan(chunks, self.manager.batch_size if limit is None else limit):
                if stream:
                    with self.bulk_write():
                        self._stream_group(group, pending, bulk)
                    continue
                fetched, failed = self._fetch_group(group, prefetch)
                self._settle(fetched, pending)
                # bytes(): free for bytes; a view into a reusable thread buffer must never escape
                result.update((chunk_key(it.chunk), bytes(it.plain)) for it in fetched
                              if it.plain is not None)
                if failed:
                    raise failed
        except BaseException as exc:
            err = exc if isinstance(exc, NydusError) else BackendError(f"chunk fetch failed: {exc}")
            for key in pending:
                self._flights.fail(key, err)
            pending.clear()
            if err is exc:
                raise
            raise err from exc
        return result

    def _plan(self, chunks: list[ChunkInfo], limit: int) -> list[list[ChunkInfo]]:
        """Group chunks into runs that are adjacent in the blob and fit the merge limit."""
        groups: list[list[ChunkInfo]] = []
        for chunk in sorted(chunks, key=chunk_key):
            if chunk.flags & (CHUNK_FLAG_BATCH | CHUNK_FLAG_ENCRYPTED):
                raise Unsupported("batch and encrypted chunks are not supported",
                                  blob_id=self.blob.blob_id, chunk_index=chunk.index)
            if groups:
                group = groups[-1]
                prev = group[-1]
                end = prev.compressed_offset + prev.compressed_size
                span = chunk.compressed_offset + chunk.compressed_size - group[0].compressed_offset
                if chunk.compressed_offset == end and span <= limit:
                    group.append(chunk)
                    continue
            groups.append([chunk])
        return groups

    def _settle(self, fetched: list[Fetched], pending: set[int], publish: bool = True) -> None:
        """Store fetched chunks, then resolve their flights (ready before resolved). Without
        ``publish`` waiters get None and read the chunks back from the cache."""
        self._store(fetched)
        for item in fetched:
            key = chunk_key(item.chunk)
            self._flights.resolve(key, bytes(item.plain) if publish and item.plain is not None else None)
            pending.discard(key)

    def _stream_group(self, group: list[ChunkInfo], pending: set[int], bulk: bool = False,
                      claimed: list[ChunkInfo] | None = None) -> None:
        """Prefetch one merged run with a single streamed request: read ``STREAM_PIECE`` bytes at a
        time into this thread's buffer, decode, store and resolve them, then read on. Plain bytes
        are not kept (the caller reads them back from the cache). Raises the first chunk failure
        after the whole run was tried, or the backend's error. With ``claimed`` (lazy claims), the
        chunks of each piece are claimed just before it is read (and added to ``claimed`` and
        ``pending``); the bytes of chunks a reader fetched meanwhile are read and dropped."""
        start = group[0].compressed_offset
        size = group[-1].compressed_offset + group[-1].compressed_size - start
        failed: NydusError | None = None
        raw = self.stores_payload and not self.manager.verify_fetched
        backend: Any = self.backend  # streams_ranges backends (checked by the caller) have open_range
        with backend.open_range(self.blob.blob_id, start, size, prefetch=True) as stream:
            i = 0
            while i < len(group):
                j, nbytes = i + 1, group[i].compressed_size
                plain = group[i].uncompressed_size
                while (j < len(group) and nbytes + group[j].compressed_size <= STREAM_PIECE
                       and (raw or plain + group[j].uncompressed_size <= STREAM_PLAIN)):
                    nbytes += group[j].compressed_size
                    plain += group[j].uncompressed_size
                    j += 1
                piece, base = group[i:j], group[i].compressed_offset
                if claimed is not None:  # step aside first: claims held while paused block readers
                    self.manager.prefetch_yield(partial(self._flights.wanted, pending), bulk=bulk)
                    piece = self._claim_piece(piece, pending, claimed)
                view = _thread_buffer("payload", nbytes, STREAM_PIECE)
                # on-demand reads first: stop pulling while readers fetch (TCP flow control then
                # hands them the link), unless one of them waits for a chunk of this prefetch
                wanted = partial(self._flights.wanted, pending)
                for pos in range(0, nbytes, YIELD_SLICE):
                    self.manager.prefetch_yield(wanted, bulk=bulk)
                    stream.readinto(view[pos:pos + YIELD_SLICE])
                if not piece:
                    i = j
                    continue
                with _CPU_SLOTS:
                    if raw:  # stored as fetched; a reader decodes (and refetches a bad one) on load
                        fetched = [Fetched(c, view[c.compressed_offset - base:][:c.compressed_size], None)
                                   for c in piece]
                        bad = None
                    else:
                        fetched, bad = self._decode_piece(piece, view, base)
                    self._settle(fetched, pending, publish=False)
                failed = failed or bad
                i = j
        if failed:
            raise failed

    def _decode_piece(self, piece: list[ChunkInfo], data: memoryview,
                      start: int) -> tuple[list[Fetched], NydusError | None]:
        """``_decode`` into this thread's plain buffer, laid out as in the cache's plain file, so
        that adjacent chunks leave as one write. Falls back to ``_decode`` for chunks whose plain
        ranges are out of order."""
        ustart = piece[0].uncompressed_offset
        uend = ustart
        for chunk in piece:
            if chunk.uncompressed_offset < uend:
                return self._decode(piece, data, start, True)
            uend = chunk.uncompressed_offset + chunk.uncompressed_size
        out = _thread_buffer("plain", uend - ustart, STREAM_PLAIN)
        verify = self.manager.verify_fetched
        fetched: list[Fetched] = []
        failed: NydusError | None = None
        for chunk in piece:
            payload = data[chunk.compressed_offset - start:][:chunk.compressed_size]
            slot = out[chunk.uncompressed_offset - ustart:][:chunk.uncompressed_size]
            got = self._decode_or_refetch(chunk, payload, True, partial(
                decode_chunk_into, chunk=chunk, blob=self.blob, out=slot, verify=verify))
            if isinstance(got, NydusError):
                failed = failed or got
                continue
            fetched.append(Fetched(chunk, got[0], slot))
        return fetched, failed

    def _fetch_group(self, group: list[ChunkInfo], prefetch: bool) -> tuple[list[Fetched], NydusError | None]:
        start = group[0].compressed_offset
        last = group[-1]
        data = memoryview(self._backend_read(start, last.compressed_offset + last.compressed_size - start,
                                             prefetch))
        return self._decode(group, data, start, prefetch)

    def _decode(self, group: list[ChunkInfo], data: memoryview, start: int,
                prefetch: bool) -> tuple[list[Fetched], NydusError | None]:
        """Decode the chunks of ``group`` from ``data`` (which begins at blob offset ``start``); a
        chunk that fails is fetched alone once more. Returns the good ones and the first failure."""
        verify = self.manager.verify_fetched
        fetched: list[Fetched] = []
        failed: NydusError | None = None
        if prefetch and self.stores_payload and not verify:
            # Prefetch into a payload cache: store as fetched; a reader decodes (and on a bad
            # payload refetches) when it loads the chunk. Waiters are told to look again.
            return [Fetched(c, data[c.compressed_offset - start:][:c.compressed_size], None)
                    for c in group], None
        for chunk in group:
            payload = data[chunk.compressed_offset - start:][:chunk.compressed_size]
            got = self._decode_or_refetch(chunk, payload, prefetch, partial(
                decode_chunk, chunk=chunk, blob=self.blob, verify=verify))
            if isinstance(got, NydusError):
                failed = failed or got
                continue
            fetched.append(Fetched(chunk, *got))
        return fetched, failed

    def _decode_or_refetch(self, chunk: ChunkInfo, payload: memoryview, prefetch: bool,
                           decode: Callable[[memoryview], T]) -> tuple[memoryview, T] | NydusError:
        """``decode(payload)``; on an integrity failure the chunk is fetched alone once more and
        that payload decoded. Returns the payload that decoded and the result, or (logged) the
        NydusError of the second attempt. Other errors of the first attempt propagate."""
        try:
            return payload, decode(payload)
        except IntegrityError as exc:
            log.warning("chunk_refetched", blob_id=self.blob.blob_id, chunk_index=chunk.index,
                        offset=chunk.compressed_offset, cause=str(exc))
        try:
            payload = memoryview(self._backend_read(chunk.compressed_offset, chunk.compressed_size,
                                                    prefetch))
            return payload, decode(payload)
        except NydusError as again:
            log.error("chunk_corrupted", blob_id=self.blob.blob_id, chunk_index=chunk.index,
                      offset=chunk.compressed_offset, cause=str(again))
            return again

    def _backend_read(self, offset: int, size: int, prefetch: bool) -> bytes:
        try:
            data = self.backend.read(self.blob.blob_id, offset, size, prefetch=prefetch)
        except NydusError:
            raise
        except OSError as exc:
            raise BackendError(f"backend read failed: {exc}", blob_id=self.blob.blob_id,
                               offset=offset, size=size) from exc
        if len(data) != size:
            raise BackendError("backend returned a short chunk range", blob_id=self.blob.blob_id,
                               offset=offset, size=size, got=len(data))
        return data

    def _store(self, items: list[Fetched]) -> None:
        if not items:
            return
        try:
            self._persist(items)
        except OSError as exc:
            # The data is good; only caching it failed (disk full ...). Serve it anyway.
            log.warning("cache_write_failed", blob_id=self.blob.blob_id, cause=str(exc))


def _unique(chunks: Iterable[ChunkInfo]) -> dict[int, ChunkInfo]:
    out: dict[int, ChunkInfo] = {}
    for chunk in chunks:
        out.setdefault(chunk_key(chunk), chunk)
    return out
