"""Blob backends: where blob bytes come from (== nydus-storage ``backend``).

Owns: the registry of backend types and ``create_backend(cfg)``. Backend classes are imported
lazily by their import string so that a missing optional library (oss2, botocore) only matters to
a config that uses it. Must not import cache, rafs, fs or daemon.

Types (``backend.type``): ``localfs`` (localfs.py), ``localdisk`` (localdisk.py, GPT partitions),
``registry`` (registry.py over oci.client), ``oss`` (oss.py, oss2), ``s3`` (s3.py, botocore SigV4),
``http-proxy`` (http_proxy.py, HTTP or unix socket). Remote types take an optional Dragonfly
``proxy`` (proxy.py). Retry/backoff/exact-length policy and §8.3 metrics live in base.py.

Public API::

    backend = create_backend(cfg.backend)        # BackendConfig -> BlobBackend
    backend.blob_size(blob_id) -> int
    backend.read(blob_id, offset, size, *, prefetch=False) -> bytes
    backend.metrics() -> dict                    # spec §8.3
    backend.close()

Threading: ``create_backend`` is thread-safe; see ``base.BlobBackend`` for the instances.
"""

from __future__ import annotations

import importlib
from typing import Any

from nydusd.errors import ConfigError, Unsupported
from nydusd.storage.backend.base import BlobBackend, RetryPolicy

__all__ = ["BACKEND_TYPES", "BlobBackend", "RetryPolicy", "create_backend"]

BACKEND_TYPES: dict[str, str] = {
    "localfs": "nydusd.storage.backend.localfs:LocalFsBackend",
    "localdisk": "nydusd.storage.backend.localdisk:LocalDiskBackend",
    "registry": "nydusd.storage.backend.registry:RegistryBackend",
    "oss": "nydusd.storage.backend.oss:OssBackend",
    "s3": "nydusd.storage.backend.s3:S3Backend",
    "http-proxy": "nydusd.storage.backend.http_proxy:HttpProxyBackend",
}


def backend_class(type_: str) -> type[BlobBackend]:
    """The class registered for ``type_``. Raises Unsupported for an unknown or unavailable type."""
    target = BACKEND_TYPES.get(type_)
    if target is None:
        raise Unsupported(f"backend type {type_!r} is not supported "
                          f"(supported: {', '.join(sorted(BACKEND_TYPES))})", field="backend.type")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise Unsupported(f"backend type {type_!r} needs a library that is not installed: {exc.name}",
                          field="backend.type") from exc
    cls: type[BlobBackend] = getattr(module, attr)
    return cls


def create_backend(cfg: Any) -> BlobBackend:
    """Build the backend described by a ``BackendConfig`` (``type`` + the sub-config it names).

    Raises ConfigError if the sub-config is missing, Unsupported for an unknown type.
    """
    type_ = getattr(cfg, "type", None)
    if not type_:
        raise ConfigError("backend.type is required", field="backend.type")
    cls = backend_class(type_)
    sub = getattr(cfg, "sub", None)
    if sub is None:
        sub = getattr(cfg, type_.replace("-", "_"), None)
    if sub is None:
        raise ConfigError(f"backend.{type_} config is missing", field=f"backend.{type_}")
    return cls(sub)
