"""The ``dummy`` cache (config ``cache.type`` empty or ``dummycache``): no local files.

Owns: ``DummyCache`` and ``DummyCacheManager``. Every read goes to the backend; concurrent reads
of the same chunk still share one fetch (singleflight, in ``base``). The manager keeps the plain
bytes of the last ``RECENT_CHUNKS`` chunks fetched (any blob) in memory, stored before their flight
is resolved like a file cache's: a reader that asks for a chunk just after its flight ended (the
kernel sends the 128 KiB requests into one chunk in parallel, and the fetch runs on a helper
thread, see ``storage/waits.py``) finds it there instead of fetching it again. Must not import
rafs, fs, daemon or any transport.

Threading: the recent-chunk table has its own lock, held for dict operations only (``is_ready`` runs
under the singleflight lock: lock order singleflight -> recent).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

from nydusd.storage.cache.base import BlobCache, Fetched
from nydusd.storage.cache.manager import BlobCacheManager
from nydusd.storage.chunk import BlobInfo, ChunkInfo, chunk_key

#: chunks kept in memory per mount (1 MiB each by default)
RECENT_CHUNKS = 4


class DummyCache(BlobCache):
    """Pass-through cache of one blob."""

    manager: DummyCacheManager

    def is_ready(self, chunk: ChunkInfo) -> bool:
        return self.manager.recent_get(self.blob.blob_id, chunk_key(chunk)) is not None

    def _load(self, chunk: ChunkInfo) -> bytes | None:
        return self.manager.recent_get(self.blob.blob_id, chunk_key(chunk))

    def _persist(self, items: Sequence[Fetched]) -> None:
        for item in items:
            if item.plain is not None:
                self.manager.recent_put(self.blob.blob_id, chunk_key(item.chunk), bytes(item.plain))


class DummyCacheManager(BlobCacheManager):
    type = "dummycache"

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self._recent: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._recent_lock = threading.Lock()

    def _open(self, blob: BlobInfo) -> BlobCache:
        return DummyCache(blob, self)

    def recent_get(self, blob_id: str, key: int) -> bytes | None:
        with self._recent_lock:
            data = self._recent.get((blob_id, key))
            if data is not None:
                self._recent.move_to_end((blob_id, key))
            return data

    def recent_put(self, blob_id: str, key: int, data: bytes) -> None:
        with self._recent_lock:
            self._recent[(blob_id, key)] = data
            self._recent.move_to_end((blob_id, key))
            while len(self._recent) > RECENT_CHUNKS:
                self._recent.popitem(last=False)

    def close(self) -> None:
        super().close()
        with self._recent_lock:
            self._recent.clear()
