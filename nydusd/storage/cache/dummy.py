"""The ``dummy`` cache (config ``cache.type`` empty or ``dummycache``): no local state.

Owns: ``DummyCache`` and ``DummyCacheManager``. Every read goes to the backend; concurrent reads
of the same chunk still share one fetch (singleflight, in ``base``). Must not import rafs, fs,
daemon or any transport.

Threading: stateless beyond ``base``; safe for concurrent use.
"""

from __future__ import annotations

from collections.abc import Sequence

from nydusd.storage.cache.base import BlobCache, BlobCacheManager, Fetched
from nydusd.storage.device import BlobInfo, ChunkInfo


class DummyCache(BlobCache):
    """Pass-through cache of one blob."""

    def is_ready(self, chunk: ChunkInfo) -> bool:
        return False

    def _load(self, chunk: ChunkInfo) -> bytes | None:
        return None

    def _persist(self, items: Sequence[Fetched]) -> None:
        return None


class DummyCacheManager(BlobCacheManager):
    type = "dummycache"

    def _open(self, blob: BlobInfo) -> BlobCache:
        return DummyCache(blob, self)
