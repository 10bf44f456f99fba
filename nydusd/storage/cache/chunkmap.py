"""Chunk readiness maps: which chunks of a blob are durably present in the cache.

Owns: ``IndexedChunkMap`` -- the persistent bitmap file ``<blob file>.chunk_map`` in upstream's
layout (so a cache directory is interchangeable with upstream nydusd and readable by the
snapshotter's GC) -- and ``MemoryChunkMap`` (not persisted; for chunks without a usable index and
for ``disable_indexed_map``).

File layout (little endian): a 4096-byte header ``u32 magic 0x424D4150 ("BMAP")``, ``u32 version
= 1``, ``u32 magic2 0x434D4150``, ``u32 all_ready`` (``0x4D4D4150`` once every chunk is ready),
zero padding; then ``ceil(chunk_count / 8)`` bitmap bytes, chunk ``i`` at byte ``i >> 3`` under mask
``0x80 >> (i & 7)``. A file of any other size or with a foreign header is discarded and recreated
(a reset only costs refetches, never wrong data).

Crash safety: the map is ``mmap``-ed ``MAP_SHARED``; a bit is set only after the caller has made
the chunk's bytes durable (pwrite + fdatasync), and a single-byte store can never tear, so after a
crash every set bit still describes data that is in place.

Must not import backends, rafs, fs or daemon.

Threading: ``is_ready`` reads one byte of the mapping without locking (a stale answer only means
a redundant fetch, which the singleflight table and the idempotent ``set_ready`` absorb);
``set_ready`` and ``close`` serialise on the map's own lock. The owning ``FileCache`` never calls
in after ``close`` (it counts its users); should anything still do so, ``is_ready``/``set_ready``
raise BackendError rather than touch the unmapped memory.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from collections.abc import Hashable, Iterable

from nydusd.errors import BackendError
from nydusd.log import get_logger

log = get_logger(__name__)

MAGIC1 = 0x424D_4150
MAGIC2 = 0x434D_4150
MAGIC_ALL_READY = 0x4D4D_4150
HEADER_SIZE = 4096
VERSION = 1
_HEADER = struct.Struct("<IIII")  # magic, version, magic2, all_ready
#: cache files hold image content: readable by the daemon's user only (the work_dir is 0700)
PRIVATE_FILE_MODE = 0o600


def open_private(path: str) -> int:
    """``os.open`` a cache file read-write, creating it 0600; a file left group/other-readable (by
    an older daemon) is made private too. Raises OSError."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, PRIVATE_FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def chunk_map_size(chunk_count: int) -> int:
    """Size in bytes of the chunk map file for ``chunk_count`` chunks."""
    return HEADER_SIZE + (chunk_count + 7) // 8


class IndexedChunkMap:
    """Persistent ready-bitmap of one blob, indexed by chunk index (see module docstring)."""

    def __init__(self, path: str, chunk_count: int) -> None:
        if chunk_count <= 0:
            raise ValueError("an indexed chunk map needs a positive chunk count")
        self.path = path
        self.count = chunk_count
        self.size = chunk_map_size(chunk_count)
        self._lock = threading.Lock()
        self._fd = open_private(path)
        try:
            self._prepare_file()
            self._mm = mmap.mmap(self._fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self._fd)
            raise
        self._ready = self._count_ready()

    # ------------------------------------------------------------------ open / reset
    def _prepare_file(self) -> None:
        st_size = os.fstat(self._fd).st_size
        if st_size == 0:
            self._write_header()
            return
        if st_size != self.size:
            log.warning("chunk_map_reset", path=self.path, reason="size mismatch", size=st_size,
                        expected=self.size)
            self._write_header()
            return
        magic, version, magic2, _ = _HEADER.unpack(os.pread(self._fd, _HEADER.size, 0))
        if magic == MAGIC1 and (version < 1 or magic2 == MAGIC2):
            return
        if magic == 0 and not any(os.pread(self._fd, self.size, 0)):
            # A crash between sizing the file and writing its header leaves it all zero.
            self._write_header()
            return
        log.warning("chunk_map_reset", path=self.path, reason="bad header", magic=hex(magic))
        self._write_header()

    def _write_header(self) -> None:
        # Size first (all bits clear), then the header: a crash in between leaves an all-zero file,
        # detected above. No fsync is needed for safety: whatever state a crash leaves (no file,
        # wrong size, zero header) is reset on open, and a set bit never depends on this file's
        # durability, only on the data file's fdatasync that precedes it.
        os.ftruncate(self._fd, 0)
        os.ftruncate(self._fd, self.size)
        os.pwrite(self._fd, _HEADER.pack(MAGIC1, VERSION, MAGIC2, 0), 0)

    def _count_ready(self) -> int:
        _, _, _, all_ready = _HEADER.unpack_from(self._mm, 0)
        if all_ready == MAGIC_ALL_READY:
            return self.count
        bits = int.from_bytes(self._mm[HEADER_SIZE:self.size], "big")
        # Ignore stray bits past the last chunk.
        spare = (self.size - HEADER_SIZE) * 8 - self.count
        return min(self.count, (bits >> spare).bit_count())

    def reset(self) -> None:
        """Forget every ready bit (used when the data file was lost)."""
        with self._lock:
            self._mm[HEADER_SIZE:self.size] = bytes(self.size - HEADER_SIZE)
            self._mm[:_HEADER.size] = _HEADER.pack(MAGIC1, VERSION, MAGIC2, 0)
            self._mm.flush()
            self._ready = 0

    # ------------------------------------------------------------------ queries / updates
    def valid_index(self, index: int) -> bool:
        return 0 <= index < self.count

    def is_ready(self, index: int) -> bool:
        if self._ready >= self.count:
            return True
        if self._fd < 0:
            raise BackendError("chunk map closed", path=self.path)
        return bool(self._mm[HEADER_SIZE + (index >> 3)] & (0x80 >> (index & 7)))

    def set_ready(self, indices: Iterable[int]) -> int:
        """Mark chunks ready (their bytes must already be durable). Returns how many were new."""
        new = 0
        with self._lock:
            if self._fd < 0:
                raise BackendError("chunk map closed", path=self.path)
            for index in indices:
                pos = HEADER_SIZE + (index >> 3)
                mask = 0x80 >> (index & 7)
                byte = self._mm[pos]
                if not byte & mask:
                    self._mm[pos] = byte | mask
                    new += 1
            self._ready += new
            if new and self._ready >= self.count:
                self._mark_all_ready()
        return new

    def clear(self, index: int) -> bool:
        """Mark one chunk not ready (its bytes turned out to be missing from the data file).
        Returns whether it was marked before."""
        with self._lock:
            if self._fd < 0:
                raise BackendError("chunk map closed", path=self.path)
            if self._ready >= self.count:
                # "all ready" vouches for every chunk whatever the bits say: spell it out first
                self._mm[HEADER_SIZE:self.size] = b"\xff" * (self.size - HEADER_SIZE)
                _HEADER.pack_into(self._mm, 0, MAGIC1, VERSION, MAGIC2, 0)
                self._ready = self.count
            pos = HEADER_SIZE + (index >> 3)
            mask = 0x80 >> (index & 7)
            byte = self._mm[pos]
            if not byte & mask:
                return False
            self._mm[pos] = byte & ~mask
            self._ready -= 1
            return True

    def _mark_all_ready(self) -> None:
        self._mm.flush()
        _HEADER.pack_into(self._mm, 0, MAGIC1, VERSION, MAGIC2, MAGIC_ALL_READY)
        self._mm.flush(0, mmap.PAGESIZE)

    @property
    def ready_count(self) -> int:
        return self._ready

    def all_ready(self) -> bool:
        return self._ready >= self.count

    def close(self) -> None:
        with self._lock:
            if self._fd < 0:
                return
            self._mm.close()
            os.close(self._fd)
            self._fd = -1


class MemoryChunkMap:
    """Ready set kept in memory only, keyed by any hashable chunk key. Thread-safe (one lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready: set[Hashable] = set()

    def is_ready(self, key: Hashable) -> bool:
        return key in self._ready

    def set_ready(self, keys: Iterable[Hashable]) -> int:
        with self._lock:
            before = len(self._ready)
            self._ready.update(keys)
            return len(self._ready) - before

    def discard(self, key: Hashable) -> None:
        with self._lock:
            self._ready.discard(key)

    @property
    def ready_count(self) -> int:
        return len(self._ready)

    def close(self) -> None:
        with self._lock:
            self._ready.clear()
