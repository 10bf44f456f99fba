"""The file cache (config ``cache.type`` ``blobcache``, v2 ``filecache``): blob data kept in local
files under ``work_dir``, upstream's layout (spec interfaces.md §2.8, rafs-format.md §4.7).

Owns: ``FileCache`` (one blob) and ``FileCacheManager``. Per blob id:

- default: ``<id>.blob.data`` holds *uncompressed* chunk data at each chunk's
  ``uncompressed_offset`` (sparse file), readiness in ``<id>.blob.data.chunk_map`` (both names
  and the chunk map layout as upstream);
- ``cache.compressed``: ``<id>.blob.raw`` holds the *stored* (compressed) payloads at their
  ``compressed_offset`` (upstream's name), readiness in ``<id>.blob.raw.chunk_map``. Upstream
  keeps raw-mode bits in ``<id>.blob.data.chunk_map`` too; a separate map means switching
  ``compressed`` on an existing work_dir can never make one file's bits vouch for the other's
  (never-written, all-zero) bytes.

``underlying_files`` (metrics) lists each data file's name, as upstream does.

Write protocol (crash safety, group commit): a fetched chunk is ``pwrite``-n to the data file and
at once becomes ready *in this process* (an in-memory "volatile" set: the page cache already
serves the bytes). A per-manager flusher thread then ``fdatasync``-s the data file and only after
that sets the chunks' bits in the persistent chunk map; one sync covers every chunk written
meanwhile, and no reader ever waits for the disk. A crash therefore loses at most recent bits,
never leaves a set bit over missing bytes. On open only set bits are trusted; if the data file
vanished (or is empty) while its chunk map survived, the map is reset. A set bit is checked once
per open against the data file itself (inside the file, in no hole: ``_bytes_present``), so a file
truncated, replaced or left with holes behind our back gets its chunks fetched again, never served
as zeros; an existing shorter file is therefore never extended. A data file that is not a regular
file (a directory, a fifo) fails the open with a clear BackendError. With ``validate`` every chunk read from
the data file is verified again and refetched from the backend on a mismatch.

Over 500 lines because one blob file's lifecycle is one unit: the write protocol above (volatile
set, flusher, chunk-map bits), the damage checks on open and the two modes all act on the same
data file and chunk map under the same lock; split, each half would reach into the other's state.

Must not import rafs, fs, daemon or any transport.

Threading: ``os.pread``/``os.pwrite`` at fixed offsets need no shared position, so reads and writes
run concurrently without a lock. Per cache, ``_lock`` guards the volatile set and the list of
unsynced chunks (held for set operations only) and ``_flush_lock`` serialises flushes (held across
``fdatasync``; only the flusher thread, ``flush`` and ``close`` take it, never a reader). The
flusher's condition variable guards its dirty list. Lock order: ``_flush_lock`` -> ``_lock``.

Closing (an umount while files of the image are still being read): every entry point that touches
the data file or the chunk map (``is_ready``, ``read_cached``, ``_load``, ``_persist``)
registers as a user first (``_users``, a small condition of its own, held for the counter only).
``close`` marks the cache closing -- from then on every entry point raises
``BackendError("cache closed")`` -- and waits up to ``CLOSE_WAIT`` for running users to leave
before it closes the descriptor and the map; if they do not leave in time, the last one out closes
them. A descriptor is therefore never used after ``os.close``: a stale ``pwrite`` through a number
the next mount's cache file reused would corrupt another blob's cache.

The warm read of a FUSE request (``read_nowait``) takes no lock: the reading thread announces
itself in ``_fast`` (thread id -> 1; a GIL-atomic dict store), then checks ``closing``; ``close``
sets ``closing`` first and then waits for ``_fast`` to drain before it closes the descriptor (a
reader that outlives ``CLOSE_WAIT`` leaves the descriptor open rather than risk a reused number).
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from os import RWF_NOWAIT
from threading import get_ident

from nydusd.errors import BackendError, ConfigError, IntegrityError, InvalidArgument
from nydusd.log import get_logger
from nydusd.storage.cache.base import BlobCache, CacheBackend, Fetched
from nydusd.storage.cache.chunkmap import IndexedChunkMap, MemoryChunkMap, open_private
from nydusd.storage.cache.manager import BlobCacheManager
from nydusd.storage.chunk import BlobInfo, ChunkInfo, chunk_key, decode_chunk

log = get_logger(__name__)

DATA_SUFFIX = ".blob.data"
RAW_SUFFIX = ".blob.raw"
#: a work_dir the daemon creates is private to its user (an existing one is left as it is)
PRIVATE_DIR_MODE = 0o700


#: warm reads up to this size land in the calling thread's reusable buffer; larger ones in a fresh
#: one. Kept small because llfuse serves requests from --thread-num + 128 threads (the backend-wait
#: reserve) in turn: every thread's buffer ends up resident, 4 MiB at most in all at this size.
READ_BUFFER = 32 << 10
_tls = threading.local()


def _read_buffer(size: int) -> memoryview:
    """A writable view of ``size`` bytes: of the calling thread's buffer, or fresh if larger."""
    if size > READ_BUFFER:
        return memoryview(bytearray(size))
    buf: memoryview | None = getattr(_tls, "buf", None)
    if buf is None:
        buf = _tls.buf = memoryview(bytearray(READ_BUFFER))
    return buf[:size]


def _adjacent(chunks: Sequence[ChunkInfo]) -> bool:
    """Whether the plain bytes of ``chunks`` follow each other in the blob (one pread reads all)."""
    end = chunks[0].uncompressed_offset
    for chunk in chunks:
        if chunk.uncompressed_offset != end:
            return False
        end += chunk.uncompressed_size
    return True


def _check_blob_id(blob_id: str) -> None:
    if not blob_id or "/" in blob_id or "\0" in blob_id or blob_id in (".", ".."):
        raise InvalidArgument("blob id cannot name a cache file", blob_id=blob_id)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _pwrite_sliced(fd: int, bufs: list[bytes | memoryview], offset: int) -> None:
    """Write ``bufs`` back to back at ``offset``, at most ``WRITE_SLICE`` bytes per syscall.

    The page cache sizes its folios after the write: one multi-MiB write asks for huge folios,
    whose allocation (memory compaction) costs up to ten times the copy on a fragmented host;
    256 KiB writes cost the same syscalls-wise and stay steady."""
    for buf in bufs:
        view = memoryview(buf)
        for pos in range(0, len(view), WRITE_SLICE):
            piece = view[pos:pos + WRITE_SLICE]
            _pwrite_all(fd, piece, offset + pos)
        offset += len(view)


def _write_run(fd: int, bufs: list[bytes | memoryview], offset: int, size: int) -> None:
    """Write one run of back-to-back buffers. The run's blocks are allocated first: filling holes
    of a sparse file block by block (ext4 delayed allocation) costs several times more, and
    stalls under concurrent writers; the file stays sparse where nothing was written."""
    if size >= _FALLOCATE_MIN:
        try:
            os.posix_fallocate(fd, offset, size)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise
            # not supported here (EOPNOTSUPP, EINVAL ...): the write allocates as it goes
    _pwrite_sliced(fd, bufs, offset)


def _write_runs(fd: int, pieces: Sequence[tuple[int, bytes | memoryview]]) -> None:
    """Write ``(offset, data)`` pieces, run by run of back-to-back pieces."""
    run: list[bytes | memoryview] = []
    start = end = 0
    for offset, data in sorted(pieces, key=lambda p: p[0]):
        if run and offset != end:
            _write_run(fd, run, start, end - start)
            run = []
        if not run:
            start = end = offset
        run.append(data)
        end += len(data)
    if run:
        _write_run(fd, run, start, end - start)


def _bytes_present(fd: int, offset: int, size: int) -> bool:
    """Whether ``[offset, offset + size)`` lies inside the file and in no hole of it (data that
    is written but not yet on disk counts as present: the page cache holds it)."""
    if offset + size > os.fstat(fd).st_size:
        return False
    if size == 0:
        return True
    try:
        return os.lseek(fd, offset, os.SEEK_HOLE) >= offset + size
    except OSError:  # no hole support here: the size check is all we have
        return True


#: longest the flusher holds a sync back while streamed prefetches write (``bulk_write``)
BULK_SYNC_DELAY = 0.5
#: how long after a bulk write ends the flusher still holds back (see ``_Flusher._hold_for_bulk``)
BULK_QUIET = 0.05
#: largest single write to a cache file (see ``_pwrite_sliced``)
WRITE_SLICE = 256 << 10
#: runs at least this long are fallocate-d before they are written (see ``_write_run``)
_FALLOCATE_MIN = 256 << 10
#: longest ``FileCache.close`` waits for running reads/writes before leaving the close to them
CLOSE_WAIT = 5.0


class _Users:
    """Threads inside one cache's entry points, and whether the cache is closing (see module
    docstring). ``enter`` raises BackendError once closing; ``leave`` returns True to the last
    thread out of a cache whose close was left to it."""

    def __init__(self, blob_id: str) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._blob_id = blob_id
        self._count = 0
        self.closing = False
        self._deferred = False

    def enter(self) -> None:
        with self._cond:
            if self.closing:
                raise BackendError("cache closed", blob_id=self._blob_id)
            self._count += 1

    def leave(self) -> bool:
        with self._cond:
            self._count -= 1
            if self._count or not self.closing:
                return False
            self._cond.notify_all()
            last, self._deferred = self._deferred, False
            return last

    def start_close(self, timeout: float) -> bool | None:
        """Mark closing and wait for running users. True: close now; False: the last user will;
        None: closing had already started."""
        with self._cond:
            if self.closing:
                return None
            self.closing = True
            if self._cond.wait_for(lambda: self._count == 0, timeout):
                return True
            self._deferred = True
            return False

    @property
    def count(self) -> int:
        return self._count


class FileCache(BlobCache):
    """Cache of one blob in a local data file plus chunk map (see module docstring)."""

    def __init__(self, blob: BlobInfo, manager: FileCacheManager) -> None:
        super().__init__(blob, manager)
        _check_blob_id(blob.blob_id)
        self.compressed = manager.compressed
        self.stores_payload = self.compressed
        self.partial_reads = not (self.compressed or manager.verify_cached)
        self.verify_cached = manager.verify_cached
        base = os.path.join(manager.work_dir, blob.blob_id)
        self.data_path = base + (RAW_SUFFIX if self.compressed else DATA_SUFFIX)
        self.map_path = self.data_path + ".chunk_map"
        existed = os.path.exists(self.data_path)
        self._fd = open_private(self.data_path)
        try:
            st = os.fstat(self._fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
            size = blob.compressed_size if self.compressed else blob.uncompressed_size
            if st.st_size == 0:
                # A new (sparse) file of the blob's size. An existing shorter file is left as it
                # is: extending it would turn its missing tail into zeros behind set bits.
                os.ftruncate(self._fd, size)
            elif st.st_size < size:
                log.warning("cache_data_short", path=self.data_path, size=st.st_size, expected=size)
            use_map = manager.indexed and blob.chunk_count > 0
            self._map = IndexedChunkMap(self.map_path, blob.chunk_count) if use_map else None
        except BaseException:
            os.close(self._fd)
            raise
        if self._map is not None and (not existed or st.st_size == 0) and self._map.ready_count:
            log.warning("cache_data_missing", path=self.data_path, ready_chunks=self._map.ready_count)
            self._map.reset()
        # chunks whose ready bit (from an earlier run) was checked against the data file
        self._present = bytearray(blob.chunk_count if self._map is not None else 0)
        self._mem = MemoryChunkMap()
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self.bulk_writers = 0  # streamed prefetches writing now (see ``bulk_write``)
        self.bulk_ended = 0.0  # monotonic time the last one ended
        self._volatile: set[int] = set()   # written, not yet durable (indexed chunks)
        self._unsynced: list[int] = []
        self._flusher = manager.flusher
        self._users = _Users(blob.blob_id)
        self._fast: dict[int, int] = {}   # threads inside ``read_nowait`` (see module docstring)
        manager.counters.add_underlying_file(os.path.basename(self.data_path))
        if self._map is not None:
            manager.counters.add_entries(self._map.ready_count)

    def _indexed(self, chunk: ChunkInfo) -> bool:
        # 2020-era v5 images record index 0 for every chunk; an index 0 away from the blob start
        # is therefore not trusted for the persistent map (the chunk is tracked in memory).
        return (self._map is not None and self._map.valid_index(chunk.index)
                and (chunk.index != 0 or chunk.compressed_offset == 0))

    def is_ready(self, chunk: ChunkInfo) -> bool:
        self._users.enter()
        try:
            return self._is_ready(chunk)
        finally:
            self._leave()

    def _is_ready(self, chunk: ChunkInfo) -> bool:
        if self._indexed(chunk):
            assert self._map is not None
            if chunk.index in self._volatile:
                return True
            if not self._map.is_ready(chunk.index):
                return False
            return bool(self._present[chunk.index]) or self._check_present(chunk)
        return self._mem.is_ready(chunk_key(chunk))

    def _check_present(self, chunk: ChunkInfo) -> bool:
        """First look at a chunk marked ready: are its bytes in the data file? A file truncated
        or replaced behind our back (or a hole a crash left) must not be served as zeros: the
        chunk's bit is cleared and it is fetched again."""
        assert self._map is not None
        offset, size = ((chunk.compressed_offset, chunk.compressed_size) if self.compressed
                        else (chunk.uncompressed_offset, chunk.uncompressed_size))
        if _bytes_present(self._fd, offset, size):
            self._present[chunk.index] = 1
            return True
        if self._map.clear(chunk.index):
            log.warning("cached_chunk_missing", path=self.data_path, chunk_index=chunk.index,
                        offset=offset, size=size)
        return False

    def _leave(self) -> None:
        if self._users.leave():
            self._release()

    def read_nowait(self, chunk: ChunkInfo, lo: int, hi: int) -> memoryview | None:
        """Plain bytes ``[lo, hi)`` of a ready chunk when they are in the page cache now
        (``RWF_NOWAIT``): a view of this thread's read buffer, valid until the thread's next call
        (the FUSE worker replies from it before it reads the next request). None -- nothing
        counted -- when the cache cannot serve parts of chunks, the chunk is not ready, the read
        would block or came back short, or the cache is closing: the caller takes ``read_cached``
        or the full path. No lock (see the module docstring)."""
        if self.compressed or self.verify_cached:
            return None
        fast = self._fast
        ident = get_ident()
        fast[ident] = 1
        try:
            if self._users.closing or not self._is_ready(chunk):
                return None
            size = hi - lo
            buf = _read_buffer(size)
            if os.preadv(self._fd, (buf,), chunk.uncompressed_offset + lo, RWF_NOWAIT) != size:
                return None
        except OSError:   # EAGAIN: not in the page cache
            return None
        finally:
            del fast[ident]
        self.manager.counters.record_read(1, 1)
        return buf

    def all_ready(self) -> bool:
        return self._map is not None and self._map.ready_count + len(self._volatile) >= self._map.count

    def read_cached(self, chunks: Sequence[ChunkInfo], lo: int, hi: int) -> bytes | None:
        first = chunks[0]
        last = chunks[-1]
        start = first.uncompressed_offset + lo
        size = last.uncompressed_offset + hi - start
        self._users.enter()
        try:
            # Only plain data without re-validation can be read in part; others take the full path.
            if self.compressed or self.verify_cached:
                return None
            for chunk in chunks:
                if not self._is_ready(chunk):
                    return None
            if len(chunks) == 1 or _adjacent(chunks):
                data = os.pread(self._fd, size, start)   # one read for chunks laid out in a row
            else:
                n = len(chunks) - 1
                spans = [(c.uncompressed_offset + (lo if i == 0 else 0),
                          (hi if i == n else c.uncompressed_size) - (lo if i == 0 else 0))
                         for i, c in enumerate(chunks)]
                data = b"".join(os.pread(self._fd, length, at) for at, length in spans)
                size = sum(length for _, length in spans)
        except OSError:
            return None
        finally:
            self._leave()
        if len(data) != size:
            return None
        self.manager.counters.record_read(len(chunks), len(chunks))
        return data

    def _load(self, chunk: ChunkInfo) -> bytes | None:
        offset, size = ((chunk.compressed_offset, chunk.compressed_size) if self.compressed
                        else (chunk.uncompressed_offset, chunk.uncompressed_size))
        self._users.enter()
        try:
            data = os.pread(self._fd, size, offset)
        except OSError as exc:
            log.warning("cached_chunk_unreadable", path=self.data_path, offset=offset, cause=str(exc))
            return None
        finally:
            self._leave()
        if len(data) != size:
            return None
        try:
            if self.compressed:
                return decode_chunk(data, chunk, self.blob, self.verify_cached)
            if self.verify_cached and self.blob.digester.hash(data) != chunk.digest:
                raise IntegrityError("cached chunk digest mismatch")
        except IntegrityError as exc:
            log.warning("cached_chunk_corrupted", path=self.data_path, chunk_index=chunk.index,
                        offset=offset, cause=str(exc))
            return None
        return data

    def _persist(self, items: Sequence[Fetched]) -> None:
        self._users.enter()
        try:
            self._persist_entered(items)
        finally:
            self._leave()

    def _persist_entered(self, items: Sequence[Fetched]) -> None:
        if self.compressed:
            _write_runs(self._fd, [(it.chunk.compressed_offset, it.payload) for it in items])
        else:
            assert all(it.plain is not None for it in items)  # plain caches always decode
            _write_runs(self._fd, [(it.chunk.uncompressed_offset, it.plain) for it in items])  # type: ignore[misc]
        indexed = [it.chunk.index for it in items if self._indexed(it.chunk)]
        new = self._mem.set_ready(chunk_key(it.chunk) for it in items if not self._indexed(it.chunk))
        if indexed:
            assert self._map is not None
            with self._lock:
                fresh = [i for i in indexed if i not in self._volatile and not self._map.is_ready(i)]
                self._volatile.update(fresh)
                self._unsynced.extend(fresh)
            new += len(fresh)
            if fresh and not self._flusher.schedule(self):
                self.flush()  # safe inside a use: close cannot release the files meanwhile
        self.manager.counters.add_entries(new)

    @contextmanager
    def bulk_write(self) -> Iterator[None]:
        """While streamed prefetches write, the flusher holds this cache's syncs back (up to
        ``BULK_SYNC_DELAY``): an ``fdatasync`` in the middle of a burst stalls its writes and
        spends the burst's CPU on writeback. On-demand writes are synced as before."""
        with self._lock:
            self.bulk_writers += 1
        try:
            yield
        finally:
            with self._lock:
                self.bulk_writers -= 1
                self.bulk_ended = time.monotonic()
            self._flusher.kick()

    def flush(self) -> None:
        """Make written chunks durable, then set their chunk-map bits (see module docstring)."""
        with self._flush_lock:
            with self._lock:
                batch, self._unsynced = self._unsynced, []
            if not batch or self._fd < 0:
                return
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                # Not durable: keep serving them from the page cache, never mark them on disk.
                log.warning("cache_sync_failed", path=self.data_path, chunks=len(batch), cause=str(exc))
                return
            assert self._map is not None
            self._map.set_ready(batch)
            with self._lock:
                self._volatile.difference_update(batch)

    def close(self) -> None:
        """Refuse new users, wait (up to ``CLOSE_WAIT``) for running ones, then flush and close
        the files -- or leave that to the last running user. Idempotent."""
        now = self._users.start_close(CLOSE_WAIT)
        if now is None:
            return
        if not now:
            log.warning("cache_close_deferred", path=self.data_path, users=self._users.count,
                        waited_s=CLOSE_WAIT)
            return
        deadline = time.monotonic() + CLOSE_WAIT
        while self._fast and time.monotonic() < deadline:
            time.sleep(0.001)
        if self._fast:
            log.warning("cache_fd_left_open", path=self.data_path, readers=len(self._fast),
                        waited_s=CLOSE_WAIT)
            return
        self._release()

    def _release(self) -> None:
        if self._fd < 0:
            return
        self.flush()
        with self._flush_lock:
            if self._map is not None:
                self._map.close()
            self._mem.close()
            os.close(self._fd)
            self._fd = -1


class _Flusher:
    """Background group commit for the file caches of one manager: one lazily started thread
    flushes every cache that has unsynced chunks. ``schedule`` returns False once closed (the
    caller then flushes inline)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._dirty: dict[int, FileCache] = {}
        self._busy = False
        self._closed = False
        self._thread: threading.Thread | None = None

    def schedule(self, cache: FileCache) -> bool:
        with self._cond:
            if self._closed:
                return False
            if id(cache) in self._dirty:
                return True  # already queued: no need to wake the flusher again
            self._dirty[id(cache)] = cache
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="nydus-cache-flush", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._dirty or self._closed)
                if not self._dirty:
                    return
                self._hold_for_bulk()
                caches = list(self._dirty.values())
                self._dirty.clear()
                self._busy = True
            try:
                for cache in caches:
                    cache.flush()
            except Exception:
                log.exception("cache_flush_crashed")
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _hold_for_bulk(self) -> None:
        """Wait (condition held) while a dirty cache has bulk writers or had one within
        ``BULK_QUIET`` (the next streamed run of a prefetch usually starts right away), at most
        ``BULK_SYNC_DELAY`` in all."""
        deadline = time.monotonic() + BULK_SYNC_DELAY
        while not self._closed:
            now = time.monotonic()
            busy = [c for c in self._dirty.values() if c.bulk_writers or now - c.bulk_ended < BULK_QUIET]
            left = deadline - now
            if not busy or left <= 0:
                return
            if not any(c.bulk_writers for c in busy):
                left = min(left, BULK_QUIET)
            self._cond.wait(left)

    def kick(self) -> None:
        """Wake the flusher (a bulk write ended)."""
        with self._cond:
            self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._dirty and not self._busy, timeout)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()


class FileCacheManager(BlobCacheManager):
    """File caches of the blobs of one backend under ``work_dir`` (created if missing)."""

    type = "blobcache"

    def __init__(self, backend: CacheBackend, *, work_dir: str, compressed: bool = False,
                 indexed: bool = True, **kw: object) -> None:
        try:
            os.makedirs(work_dir, mode=PRIVATE_DIR_MODE, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create cache work_dir {work_dir!r}: {exc.strerror}",
                              field="cache.filecache.work_dir") from None
        super().__init__(backend, work_dir=os.path.abspath(work_dir), **kw)  # type: ignore[arg-type]
        self.compressed = compressed
        self.indexed = indexed
        self.flusher = _Flusher()

    def _open(self, blob: BlobInfo) -> BlobCache:
        try:
            return FileCache(blob, self)
        except OSError as exc:
            raise BackendError(f"cannot open the blob cache files: {exc.strerror}", blob_id=blob.blob_id,
                               work_dir=self.work_dir) from exc

    def flush(self) -> None:
        """Make every chunk fetched so far durable and marked in its chunk map (blocking)."""
        for cache in self._open_caches():
            if isinstance(cache, FileCache):
                cache.flush()

    def close(self) -> None:
        """Stop the flusher (it finishes pending work), then flush and close every cache."""
        self.flusher.close()
        super().close()
