"""Blob and chunk descriptors shared by the format library (rafs), the builder and storage, and
the blob device that reads file data through the cache.

Owns: ``ChunkInfo`` (one chunk of one blob, as in the 80-byte RAFS chunk record), ``BlobInfo``
(one entry of a bootstrap's blob table, v5 or v6), ``decode_chunk`` (payload -> verified plain
bytes; ``decode_chunk_into`` the same into a caller's buffer) and ``BlobDevice`` (read a file
range across the file's chunks through a cache manager: a warm fast path that reads just the
requested bytes from plain cache files, else whole chunks through the cache's fetch path;
optional sequential readahead; background prefetch). Must not
import rafs, fs or daemon, nor ``storage.cache`` at import time (the cache imports this module;
the device receives a manager object).

Threading: value objects are frozen and thread-safe. ``BlobDevice.read`` runs with llfuse's lock
released and is called concurrently by FUSE workers. Its own mutable state -- the per-blob cache
handles (filled once), the prefetcher (started once) and the readahead stream table -- is guarded
by ``_lock``, held only for dict/list updates, never across I/O.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nydusd.compress import Compressor, decompress, decompress_into
from nydusd.digest import DigestAlgorithm
from nydusd.errors import BackendError, CorruptMetadata, IntegrityError
from nydusd.storage.prefetch import Prefetcher

if TYPE_CHECKING:
    from nydusd.storage.cache.base import BlobCache, BlobCacheManager

#: sequential-read streams tracked for readahead (files being read at the same time)
MAX_STREAMS = 256
#: seconds each prefetch worker is waited for when an aborted device stops prefetching
ABORT_JOIN = 0.1

CHUNK_FLAG_COMPRESSED = 0x01
CHUNK_FLAG_HOLE = 0x02
CHUNK_FLAG_ENCRYPTED = 0x04
CHUNK_FLAG_BATCH = 0x08
CHUNK_FLAG_HAS_CRC32 = 0x10


@dataclass(frozen=True, slots=True)
class ChunkInfo:
    """One chunk (spec §1.6). ``digest`` is H(uncompressed bytes)."""

    digest: bytes
    blob_index: int
    flags: int
    compressed_size: int
    uncompressed_size: int
    compressed_offset: int
    uncompressed_offset: int
    file_offset: int
    index: int
    crc32: int = 0

    @property
    def is_compressed(self) -> bool:
        return bool(self.flags & CHUNK_FLAG_COMPRESSED)


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """One blob of an image (spec §2.5–2.6 for v5, §3.5 for v6).

    v5 blobs inherit compressor/digester from the superblock; the ``ci_*`` fields locate the v6
    blob-meta chunk-info array inside the blob (zero for v5).
    """

    blob_id: str
    blob_index: int
    compressor: Compressor
    digester: DigestAlgorithm
    chunk_size: int
    chunk_count: int
    compressed_size: int
    uncompressed_size: int
    features: int = 0
    readahead_offset: int = 0
    readahead_size: int = 0
    ci_compressor: Compressor = Compressor.NONE
    ci_offset: int = 0
    ci_compressed_size: int = 0
    ci_uncompressed_size: int = 0
    blob_toc_size: int = 0
    blob_toc_digest: bytes = b"\0" * 32
    blob_meta_digest: bytes = b"\0" * 32
    blob_meta_size: int = 0


def decode_chunk(payload: bytes | memoryview, chunk: ChunkInfo, blob: BlobInfo,
                 verify: bool = True) -> bytes:
    """Turn a chunk's stored payload (``compressed_size`` bytes) into its verified plain bytes.

    Raises IntegrityError when the payload has the wrong length, does not decompress to
    ``uncompressed_size`` bytes, or (with ``verify``) its digest differs from ``chunk.digest``.
    """
    if len(payload) != chunk.compressed_size:
        raise IntegrityError(f"short chunk payload: {len(payload)} of {chunk.compressed_size} bytes",
                             blob_id=blob.blob_id, offset=chunk.compressed_offset)
    if chunk.is_compressed:
        data = decompress(payload, blob.compressor, chunk.uncompressed_size)
    else:
        data = bytes(payload)
        if len(data) != chunk.uncompressed_size:
            raise IntegrityError("raw chunk size differs from its uncompressed size",
                                 blob_id=blob.blob_id, offset=chunk.compressed_offset)
    if verify and blob.digester.hash(data) != chunk.digest:
        raise IntegrityError("chunk digest mismatch", blob_id=blob.blob_id,
                             offset=chunk.compressed_offset, chunk_index=chunk.index)
    return data


def decode_chunk_into(payload: bytes | memoryview, chunk: ChunkInfo, blob: BlobInfo, out: memoryview,
                      verify: bool = True) -> None:
    """``decode_chunk`` into ``out`` (writable, exactly ``uncompressed_size`` bytes) instead of new
    bytes. Raises IntegrityError like ``decode_chunk`` (``out`` then holds garbage)."""
    if len(payload) != chunk.compressed_size:
        raise IntegrityError(f"short chunk payload: {len(payload)} of {chunk.compressed_size} bytes",
                             blob_id=blob.blob_id, offset=chunk.compressed_offset)
    if len(out) != chunk.uncompressed_size:
        raise ValueError("output buffer does not match the chunk's uncompressed size")
    if chunk.is_compressed:
        try:
            decompress_into(payload, blob.compressor, out)
        except IntegrityError as exc:
            raise IntegrityError(exc.message, blob_id=blob.blob_id, offset=chunk.compressed_offset,
                                 **exc.context) from None
    elif len(payload) != chunk.uncompressed_size:
        raise IntegrityError("raw chunk size differs from its uncompressed size",
                             blob_id=blob.blob_id, offset=chunk.compressed_offset)
    else:
        out[:] = payload
    if verify and blob.digester.hash(out) != chunk.digest:
        raise IntegrityError("chunk digest mismatch", blob_id=blob.blob_id,
                             offset=chunk.compressed_offset, chunk_index=chunk.index)


def chunk_key(chunk: ChunkInfo) -> int:
    """Identity of a chunk's payload inside its blob (deduplicated chunks share it)."""
    return chunk.compressed_offset


class BlobDevice:
    """The blobs of one image, read through one cache manager.

    ``chunk_size`` defaults to the first blob's; RAFS files are cut in fixed-size chunks, so the
    chunk covering file offset ``o`` is ``chunks[o // chunk_size]``. ``batch_size`` (rafs
    ``batch_size`` / v1 ``amplify_io``) lets a read pull the following chunks of the same file
    into the same backend request. ``prefetch_config`` (a ``PrefetchConfig``) configures the
    workers started by the first ``prefetch`` call. ``readahead`` (bytes, 0 = off) turns on
    asynchronous readahead for sequential readers: when a file is read sequentially, the next
    ``readahead`` bytes of its chunks are queued as urgent prefetch (ahead of background
    prefetch), refilled when the reader is halfway through the window.

    Owns the cache manager: ``close`` closes it. The backend belongs to whoever created it.
    """

    def __init__(self, blobs: Sequence[BlobInfo], cache_manager: BlobCacheManager, *,
                 chunk_size: int | None = None, batch_size: int | None = None,
                 prefetch_config: Any = None, readahead: int = 0) -> None:
        self.blobs = list(blobs)
        self.cache_manager = cache_manager
        self.chunk_size = chunk_size or (self.blobs[0].chunk_size if self.blobs else 0)
        self.batch_size = cache_manager.batch_size if batch_size is None else batch_size
        self.prefetch_config = prefetch_config
        self._caches: list[BlobCache | None] = [None] * len(self.blobs)
        self._lock = threading.Lock()
        self._prefetcher: Prefetcher | None = None
        self._closed = False
        self._aborted = False
        self.readahead = max(0, readahead)
        # per file (keyed by its first chunk + chunk count): [next sequential offset, chunk index
        # up to which readahead was queued]; bounded, oldest dropped first
        self._streams: OrderedDict[tuple[int, int, int], list[int]] = OrderedDict()

    # ------------------------------------------------------------------ reads
    def cache(self, blob_index: int) -> BlobCache:
        """The cache of blob ``blob_index``. Raises CorruptMetadata for an index past the table."""
        if not 0 <= blob_index < len(self.blobs):
            raise CorruptMetadata("chunk refers to a blob the image does not list",
                                  blob_index=blob_index, blobs=len(self.blobs))
        cache = self._caches[blob_index]
        if cache is None:
            with self._lock:
                cache = self._caches[blob_index]
                if cache is None:
                    cache = self._caches[blob_index] = self.cache_manager.get(self.blobs[blob_index])
        return cache

    def read(self, chunks: Sequence[ChunkInfo], offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset + size)`` of the file whose chunks (in file order) are ``chunks``;
        shorter at the end of the file, ``b""`` past it.

        Runs with llfuse's lock released (thread-safe). Raises IntegrityError when chunk data
        fails verification, BackendError/BlobNotFound when it cannot be fetched, CorruptMetadata
        for chunk records that contradict the image.
        """
        if self._closed:
            raise BackendError("blob device closed")
        csize = self.chunk_size
        if size <= 0 or offset < 0 or not chunks:
            return b""
        if csize <= 0:
            raise CorruptMetadata("image has chunks but no chunk size")
        file_end = (len(chunks) - 1) * csize + chunks[-1].uncompressed_size
        end = min(offset + size, file_end)
        if offset >= end:
            return b""
        first, last = offset // csize, (end - 1) // csize
        if self.readahead:
            self._readahead(chunks, offset, end, last)
        cached = self._read_cached(chunks, first, last, offset, end)
        if cached is not None:
            return cached
        plain = self._fetch(chunks, first, last)
        parts: list[memoryview] = []
        for i in range(first, last + 1):
            chunk = chunks[i]
            data = plain[(chunk.blob_index, chunk_key(chunk))]
            lo = offset - i * csize if i == first else 0
            hi = end - i * csize if i == last else csize
            if len(data) < hi:
                raise CorruptMetadata("chunk is shorter than the chunk size", chunk_index=chunk.index,
                                      blob_index=chunk.blob_index, size=len(data), chunk_size=csize)
            parts.append(memoryview(data)[lo:hi])
        return b"".join(parts)

    def _read_cached(self, chunks: Sequence[ChunkInfo], first: int, last: int, offset: int,
                     end: int) -> bytes | None:
        """Fast path for warm reads: when every chunk of the range is cached as plain data, read
        just the requested bytes from the cache files (a 128 KiB FUSE read must not pread a whole
        1 MiB chunk). None when any chunk needs the full path."""
        csize = self.chunk_size
        parts: list[bytes] = []
        for i in range(first, last + 1):
            chunk = chunks[i]
            lo = offset - i * csize if i == first else 0
            hi = end - i * csize if i == last else csize
            if chunk.uncompressed_size < hi:
                return None  # the full path reports the malformed chunk
            data = self.cache(chunk.blob_index).read_cached_range(chunk, lo, hi)
            if data is None:
                return None
            parts.append(data)
        n = last - first + 1
        self.cache_manager.metrics_.record_read(n, n)
        return parts[0] if n == 1 else b"".join(parts)

    def _fetch(self, chunks: Sequence[ChunkInfo], first: int, last: int) -> dict[tuple[int, int], bytes]:
        per_blob: dict[int, list[ChunkInfo]] = {}
        for chunk in chunks[first:last + 1]:
            per_blob.setdefault(chunk.blob_index, []).append(chunk)
        plain: dict[tuple[int, int], bytes] = {}
        for blob_index, wanted in per_blob.items():
            got = self.cache(blob_index).read_chunks(
                wanted, amplify=self._amplify(chunks, last, blob_index))
            plain.update(((blob_index, key), data) for key, data in got.items())
        return plain

    def _amplify(self, chunks: Sequence[ChunkInfo], last: int, blob_index: int) -> list[ChunkInfo]:
        """The file's chunks after ``last`` in the same blob, up to ``batch_size`` bytes."""
        budget = self.batch_size
        extra: list[ChunkInfo] = []
        for chunk in chunks[last + 1:]:
            if chunk.blob_index != blob_index or chunk.compressed_size > budget:
                break
            budget -= chunk.compressed_size
            extra.append(chunk)
        return extra

    def _readahead(self, chunks: Sequence[ChunkInfo], offset: int, end: int, last: int) -> None:
        """Queue the next window of a sequentially read file (see class docstring)."""
        head = chunks[0]
        key = (head.blob_index, head.compressed_offset, len(chunks))
        with self._lock:
            state = self._streams.get(key)
            if state is None:
                state = self._streams[key] = [0, 0]
                while len(self._streams) > MAX_STREAMS:
                    self._streams.popitem(last=False)
            else:
                self._streams.move_to_end(key)
            sequential, state[0] = state[0] == offset, end
            if not sequential:
                state[1] = 0
                return
            window = max(1, self.readahead // self.chunk_size)
            if state[1] - last > window // 2:
                return  # more than half a window is still queued ahead of the reader
            start = max(state[1], last + 1)
            stop = min(len(chunks), last + 1 + window)
            state[1] = stop
        prefetcher = self.start_prefetch() if start < stop else None
        if prefetcher is not None:
            # half-window requests: few enough to beat per-request latency, two in flight at once
            prefetcher.submit(chunks[start:stop], urgent=True,
                              merge_limit=max(prefetcher.batch_size, self.readahead // 2))

    def is_ready(self, chunk: ChunkInfo) -> bool:
        """Whether ``chunk`` is in local cache state (no I/O)."""
        return self.cache(chunk.blob_index).is_ready(chunk)

    # ------------------------------------------------------------------ prefetch
    def start_prefetch(self, cfg: Any = None) -> Prefetcher | None:
        """Start the prefetch workers (idempotent) from ``cfg`` or ``prefetch_config``.
        Returns None once the device is closed."""
        with self._lock:
            if self._closed:
                return None
            if self._prefetcher is None:
                manager = self.cache_manager
                self._prefetcher = Prefetcher.from_config(
                    cfg if cfg is not None else self.prefetch_config, self.cache,
                    metrics=manager.metrics_, wait_ondemand_idle=manager.wait_ondemand_idle)
                self._prefetcher.start()
            return self._prefetcher

    def prefetch(self, chunks: Iterable[ChunkInfo], *, merge_limit: int | None = None,
                 bulk: bool = False) -> int:
        """Queue chunks for background fetching (starts the workers on first use). Returns the
        number of backend requests queued (0 once the device is closed). ``merge_limit``: largest
        merged request for these chunks (default: the prefetch ``batch_size``; whole-blob
        prefetch does better with ``prefetch.BULK_MERGE_SIZE``). ``bulk``: see ``Prefetcher.submit``."""
        prefetcher = self.start_prefetch()
        return 0 if prefetcher is None else prefetcher.submit(chunks, merge_limit=merge_limit, bulk=bulk)

    def wait_prefetch(self, timeout: float | None = None) -> bool:
        """Block until queued prefetch work is done. True if idle (or never started)."""
        prefetcher = self._prefetcher
        return True if prefetcher is None else prefetcher.wait_idle(timeout)

    def stop_prefetch(self) -> None:
        """Stop and join the prefetch workers (idempotent). After ``abort`` each worker is given
        only ``ABORT_JOIN`` seconds: one stuck on a dead backend finishes (and fails against the
        closed cache) on its own instead of holding up the umount for the backend timeout."""
        with self._lock:
            prefetcher, self._prefetcher = self._prefetcher, None
            aborted = self._aborted
        if prefetcher is not None:
            if aborted:
                prefetcher.stop(timeout=ABORT_JOIN)
            else:
                prefetcher.stop()

    # ------------------------------------------------------------------ metrics / lifecycle
    def metrics(self) -> dict[str, Any]:
        """Blob cache metrics (spec §8.4)."""
        return self.cache_manager.metrics()

    def backend_metrics(self) -> dict[str, Any]:
        """Backend metrics (spec §8.3)."""
        return self.cache_manager.backend_metrics()

    def flush(self) -> None:
        """Make the chunks cached so far durable (blocking; normally done in the background)."""
        self.cache_manager.flush()

    def abort(self, reason: str = "image unmounted") -> None:
        """Fail every read waiting on the backend now and refuse new ones (EIO), without waiting
        for anything: the first step of an umount, before the slower ``close``."""
        with self._lock:
            self._closed = self._aborted = True
        self.cache_manager.waits.cancel(reason)

    def close(self) -> None:
        """Stop prefetching and close the cache manager. Idempotent; the backend stays open."""
        with self._lock:
            self._closed = True
        self.stop_prefetch()
        self.cache_manager.close()
