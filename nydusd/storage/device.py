"""The blob device: file data of one image read through its cache manager (== nydus-storage
``device::BlobDevice``).

Owns: ``BlobDevice`` (the image's blob table over one cache manager: the chunk arithmetic that
turns a file range into chunk ranges, the warm path that reads just the requested bytes from a
cache file, the full path that fetches whole chunks, and the prefetch entry points, which it
forwards to the manager), ``ChunkedFile`` (one open file's chunk list over the device, the object
a read on a file handle goes to) and ``ChunkBuffer``.

Two caches sit on the read path and do different jobs:
- the blob cache (``storage/cache``) is the node's copy of the blobs: persistent, shared by every
  file and mount of the blob, filled by on-demand reads and prefetch, read with ``pread``. A plain
  (uncompressed, not re-verified) cache file serves any byte range directly: the warm path.
- ``ChunkBuffer`` keeps the last few *decoded* chunks in memory, for caches that can only hand
  out whole verified chunks (compressed cache files, ``cache.validate``, the dummy cache): FUSE
  reads arrive in 128 KiB pieces of a 1 MiB chunk, and without it each piece would read,
  decompress and verify the whole chunk again.

Must not import rafs, fs or daemon, nor ``storage.cache`` (the device receives a manager object).

Threading: ``read`` runs with llfuse's lock released and is called concurrently by FUSE workers.
The per-blob cache handles are filled once under ``_lock``; the chunk buffer has its own lock,
held only for dict operations, never across I/O.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from nydusd.config import PrefetchConfig
from nydusd.errors import BackendError, CorruptMetadata
from nydusd.storage.chunk import BlobInfo, ChunkInfo, chunk_key

if TYPE_CHECKING:
    from nydusd.storage.cache.base import BlobCache
    from nydusd.storage.cache.manager import BlobCacheManager
    from nydusd.storage.cache.prefetch import Prefetcher

#: decoded chunks kept by ``ChunkBuffer`` (1 MiB each by default)
BUFFER_SLOTS = 4


class ChunkBuffer:
    """The last few decoded chunks of an image, keyed by ``(blob index, chunk key)`` (see the
    module docstring for when it is used). Immutable data: no invalidation needed. Guarded by its
    own lock, held only for the dict operations (never across I/O)."""

    def __init__(self, slots: int = BUFFER_SLOTS) -> None:
        self.slots = slots
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[int, int], bytes] = OrderedDict()

    def get(self, key: tuple[int, int]) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: tuple[int, int], data: bytes) -> None:
        with self._lock:
            self._items[key] = data
            self._items.move_to_end(key)
            while len(self._items) > self.slots:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


class ChunkedFile:
    """One regular file's data: its chunks (in file order) over a ``BlobDevice``. ``read`` is the
    whole read path of an open file handle. Immutable; thread-safe."""

    __slots__ = ("chunks", "device", "size")

    def __init__(self, device: BlobDevice, chunks: Sequence[ChunkInfo], size: int) -> None:
        self.device = device
        self.chunks = chunks
        self.size = size

    def read(self, offset: int, size: int) -> bytes | memoryview:
        """Up to ``size`` bytes at ``offset`` (short at the end of the file, ``b""`` past it):
        ``bytes``, or a read-only ``memoryview`` into a buffered chunk. Raises like
        ``BlobDevice.read``."""
        return self.device.read_range(self.chunks, offset, min(offset + size, self.size))

    def read_nowait(self, offset: int, size: int) -> memoryview | None:
        """``read`` for a request inside one chunk whose bytes are in the page cache of a plain
        cache file right now: a view of the calling thread's read buffer, valid until its next
        call (see ``BlobCache.read_nowait``). None when that does not apply (the caller then
        takes ``read``). Never blocks on I/O, takes no lock; for llfuse's lock-held fast path."""
        device = self.device
        end = min(offset + size, self.size)
        csize = device.chunk_size
        if offset >= end or csize <= 0 or offset < 0:
            return None
        index = offset // csize
        base = index * csize
        if end - base > csize or index >= len(self.chunks) or device.closed:
            return None
        chunk = self.chunks[index]
        caches = device.caches
        if chunk.blob_index >= len(caches) or chunk.uncompressed_size < end - base:
            return None
        cache = caches[chunk.blob_index]
        return None if cache is None else cache.read_nowait(chunk, offset - base, end - base)


class BlobDevice:
    """The blobs of one image, read through one cache manager.

    ``chunk_size`` defaults to the first blob's; RAFS files are cut in fixed-size chunks, so the
    chunk covering file offset ``o`` is ``chunks[o // chunk_size]``. ``batch_size`` (rafs
    ``batch_size`` / v1 ``amplify_io``) lets a read pull the following chunks of the same file
    into the same backend request. ``prefetch_config`` (a ``PrefetchConfig``) configures the
    cache manager's prefetch workers, started by the first ``start_prefetch``/``prefetch`` call.

    Owns the cache manager: ``close`` closes it. The backend belongs to whoever created it.
    """

    def __init__(self, blobs: Sequence[BlobInfo], cache_manager: BlobCacheManager, *,
                 chunk_size: int | None = None, batch_size: int | None = None,
                 prefetch_config: PrefetchConfig | None = None) -> None:
        self.blobs = list(blobs)
        self.cache_manager = cache_manager
        self.chunk_size = chunk_size or (self.blobs[0].chunk_size if self.blobs else 0)
        self.batch_size = cache_manager.batch_size if batch_size is None else batch_size
        self.prefetch_config = prefetch_config
        self.buffer = ChunkBuffer()
        #: per-blob cache handles, filled on first use (read without a lock by the fast path)
        self.caches: list[BlobCache | None] = [None] * len(self.blobs)
        self._lock = threading.Lock()
        self.closed = False

    # ------------------------------------------------------------------ reads
    def cache(self, blob_index: int) -> BlobCache:
        """The cache of blob ``blob_index``. Raises CorruptMetadata for an index past the table."""
        if not 0 <= blob_index < len(self.blobs):
            raise CorruptMetadata("chunk refers to a blob the image does not list",
                                  blob_index=blob_index, blobs=len(self.blobs))
        cache = self.caches[blob_index]
        if cache is None:
            with self._lock:
                cache = self.caches[blob_index]
                if cache is None:
                    cache = self.caches[blob_index] = self.cache_manager.get(self.blobs[blob_index])
        return cache

    def open_file(self, chunks: Sequence[ChunkInfo], size: int) -> ChunkedFile:
        """The data of a file of ``size`` bytes cut into ``chunks`` (in file order)."""
        return ChunkedFile(self, chunks, size)

    def read(self, chunks: Sequence[ChunkInfo], offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset + size)`` of the file whose chunks (in file order) are ``chunks``;
        shorter at the end of the file, ``b""`` past it. See ``read_range`` for errors."""
        return bytes(self.read_range(chunks, offset, offset + size))

    def read_range(self, chunks: Sequence[ChunkInfo], offset: int, end: int) -> bytes | memoryview:
        """Bytes ``[offset, end)`` of the file whose chunks are ``chunks`` (clipped to its chunks):
        ``bytes`` or a read-only ``memoryview`` (into a buffered or just fetched chunk).

        Runs with llfuse's lock released (thread-safe). Raises IntegrityError when chunk data
        fails verification, BackendError/BlobNotFound when it cannot be fetched, CorruptMetadata
        for chunk records that contradict the image.
        """
        if self.closed:
            raise BackendError("blob device closed")
        if offset < 0 or offset >= end or not chunks:
            return b""
        csize = self.chunk_size
        if csize <= 0:
            raise CorruptMetadata("image has chunks but no chunk size")
        end = min(end, (len(chunks) - 1) * csize + chunks[-1].uncompressed_size)
        if offset >= end:
            return b""
        first, last = offset // csize, (end - 1) // csize
        chunk = chunks[first]
        blob_index = chunk.blob_index
        lo = offset - first * csize
        if first == last:
            if chunk.uncompressed_size >= end - first * csize:
                cache = self.caches[blob_index] if blob_index < len(self.caches) else None
                data = (cache or self.cache(blob_index)).read_cached((chunk,), lo, end - first * csize)
                if data is not None:
                    return data
        elif self._uniform(chunks, first, last, end):
            data = self.cache(blob_index).read_cached(chunks[first:last + 1], lo, end - last * csize)
            if data is not None:
                return data
        parts = self._read_chunks(chunks, first, last, offset, end)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _uniform(self, chunks: Sequence[ChunkInfo], first: int, last: int, end: int) -> bool:
        """Whether chunks ``first..last`` are in one blob and each as long as the range needs
        (the warm path's precondition; the full path reports malformed chunks)."""
        csize = self.chunk_size
        blob_index = chunks[first].blob_index
        for i in range(first, last):
            chunk = chunks[i]
            if chunk.blob_index != blob_index or chunk.uncompressed_size != csize:
                return False
        tail = chunks[last]
        return tail.blob_index == blob_index and tail.uncompressed_size >= end - last * csize

    def _read_chunks(self, chunks: Sequence[ChunkInfo], first: int, last: int, offset: int,
                     end: int) -> list[memoryview]:
        """The full path: whole chunks ``first..last`` through their caches' fetch path, sliced to
        ``[offset, end)``. With a cache that serves only whole chunks, a piece of one chunk is
        served from (or, read from its first byte, enters) the chunk buffer; a cache that serves
        parts answers the next pieces from its file (the warm path), so nothing is buffered."""
        csize = self.chunk_size
        chunk = chunks[first]
        start = first * csize
        if first == last and (offset > start or end - start < chunk.uncompressed_size) and \
                not self.cache(chunk.blob_index).partial_reads:
            key = (chunk.blob_index, chunk_key(chunk))
            data = self.buffer.get(key)
            if data is None and offset == start:
                # a read starting at a chunk boundary is how a sequential stream enters a
                # chunk; random reads rarely do and would only pay for the whole-chunk copy
                data = self._fetch(chunks, first, first)[key]
                self.buffer.put(key, data)
            if data is not None and len(data) >= end - start:
                return [memoryview(data)[offset - start:end - start]]
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
        return parts

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

    def is_ready(self, chunk: ChunkInfo) -> bool:
        """Whether ``chunk`` is in local cache state (no I/O)."""
        return self.cache(chunk.blob_index).is_ready(chunk)

    # ------------------------------------------------------------------ prefetch (the manager's)
    def start_prefetch(self, cfg: PrefetchConfig | None = None) -> Prefetcher | None:
        """Start the cache manager's prefetch workers (idempotent) from ``cfg`` or
        ``prefetch_config``. Returns the ``Prefetcher``, None once the device is closed."""
        if self.closed:
            return None
        return self.cache_manager.start_prefetch(cfg if cfg is not None else self.prefetch_config,
                                                 self.blobs)

    def prefetch(self, chunks: Iterable[ChunkInfo], *, merge_limit: int | None = None,
                 bulk: bool = False) -> int:
        """Queue chunks for background fetching (starts the workers on first use). Returns the
        number of backend requests queued (0 once the device is closed). ``merge_limit``: largest
        merged request for these chunks (default: the prefetch ``batch_size``; whole-blob
        prefetch does better with ``prefetch.BULK_MERGE_SIZE``). ``bulk``: see ``Prefetcher.submit``."""
        if self.start_prefetch() is None:
            return 0
        return self.cache_manager.prefetch(chunks, merge_limit=merge_limit, bulk=bulk)

    def wait_prefetch(self, timeout: float | None = None) -> bool:
        """Block until queued prefetch work is done. True if idle (or never started)."""
        return self.cache_manager.wait_prefetch(timeout)

    def stop_prefetch(self) -> None:
        """Stop and join the prefetch workers (idempotent)."""
        self.cache_manager.stop_prefetch()

    def wait_ondemand_quiet(self, stop: threading.Event) -> None:
        """Block until no on-demand fetch ran for a while, or ``stop`` is set (the moment for
        speculative work such as walking a whole image, see the manager's method)."""
        self.cache_manager.wait_ondemand_quiet(stop)

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
        self.closed = True
        self.cache_manager.abort(reason)

    def close(self) -> None:
        """Stop prefetching and close the cache manager. Idempotent; the backend stays open."""
        self.closed = True
        self.buffer.clear()
        self.cache_manager.close()
