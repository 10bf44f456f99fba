"""Blob caches: local state between the backend and the blob device (== nydus-storage ``cache``).

Owns: ``create_cache``, the factory from a ``CacheConfig`` (spec interfaces.md §2.2, §2.5).
Must not import rafs, fs, daemon or any transport.

Public API::

    manager = create_cache(cfg.cache, backend, digest_validate=rafs.validate,
                           batch_size=rafs.batch_size, id=cfg.id)
    cache = manager.get(blob_info)                 # BlobCache of one blob
    cache.read_chunks(chunks) -> {chunk_key: bytes}
    manager.metrics() -> dict                      # spec §8.4
    manager.close()                                # the backend stays open

Threading: ``create_cache`` is thread-safe; managers and caches are safe for concurrent use.
"""

from __future__ import annotations

from typing import Any

from nydusd.config import DEFAULT_BATCH_SIZE, CacheConfig
from nydusd.errors import ConfigError, Unsupported
from nydusd.storage.cache.base import BlobCache, CacheBackend
from nydusd.storage.cache.blobcache import FileCacheManager
from nydusd.storage.cache.dummy import DummyCacheManager
from nydusd.storage.cache.manager import BlobCacheManager
from nydusd.storage.chunk import chunk_key

__all__ = ["BlobCache", "BlobCacheManager", "chunk_key", "create_cache"]

_FILE_TYPES = ("blobcache", "filecache")
_DUMMY_TYPES = ("", "dummycache")


def create_cache(cfg: CacheConfig, backend: CacheBackend, *, digest_validate: bool = False,
                 batch_size: int = DEFAULT_BATCH_SIZE, id: str = "") -> BlobCacheManager:
    """Build the cache manager described by ``cfg`` (a ``CacheConfig``) over ``backend``.

    ``digest_validate`` (rafs ``validate``, v1 ``digest_validate``) and ``cache.validate`` each
    verify every chunk's digest: fetched from the backend AND read back from the cache files (as
    upstream, where ``digest_validate`` turns the cache's ``cache_validate`` on). With both off
    nothing is verified beyond the payload and decompressed lengths.
    ``batch_size`` (rafs ``batch_size`` / v1 ``amplify_io``) bounds one merged backend request.
    Raises ConfigError for an unknown type or unusable work_dir, Unsupported for fscache and
    encrypted caches.
    """
    type_ = cfg.type
    validate = cfg.validate
    common: dict[str, Any] = {"id": id, "batch_size": batch_size,
                              "verify_fetched": digest_validate or validate,
                              "verify_cached": digest_validate or validate}
    if type_ in _DUMMY_TYPES:
        return DummyCacheManager(backend, **common)
    if type_ in _FILE_TYPES:
        sub = cfg.filecache
        if sub is not None and sub.enable_encryption:
            raise Unsupported("encrypted blob caches are not supported",
                              field="cache.filecache.enable_encryption")
        indexed = not (sub is not None and sub.disable_indexed_map)
        return FileCacheManager(backend, work_dir=cfg.work_dir or ".", compressed=cfg.compressed,
                                indexed=indexed, **common)
    if type_ == "fscache":
        raise Unsupported("the fscache cache needs the kernel EROFS-over-fscache path, which this nydusd "
                          "does not serve", field="cache.type")
    raise ConfigError(f"unknown cache type {type_!r} (expected blobcache, filecache, fscache or dummycache)",
                      field="cache.type")
