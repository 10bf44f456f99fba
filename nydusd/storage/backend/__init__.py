"""Blob backends: where blob bytes come from (== nydus-storage ``backend``).

Owns: ``create_backend(cfg)`` and ``backend_class(type)``. The types are ``nydusd.config``'s
``BACKEND_TYPES`` (read off ``BackendConfig``); each is served by the module named after it (``-`` ->
``_``), imported lazily so that a missing optional library (oss2, botocore) only matters to
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

from nydusd.config import BACKEND_TYPES, BackendConfig
from nydusd.errors import ConfigError, Unsupported
from nydusd.storage.backend.base import BlobBackend, RetryPolicy

__all__ = ["BACKEND_TYPES", "BlobBackend", "RetryPolicy", "backend_class", "create_backend"]


def _module_of(type_: str) -> str:
    """The module serving ``backend.type`` ``type_``: ``http-proxy`` -> ``...backend.http_proxy``."""
    return f"{__name__}.{type_.replace('-', '_')}"


def backend_class(type_: str) -> type[BlobBackend]:
    """The class serving ``type_`` (the ``BlobBackend`` subclass in its module whose ``type`` is
    ``type_``). Raises Unsupported for an unknown or unavailable type."""
    if type_ not in BACKEND_TYPES:
        raise Unsupported(f"backend type {type_!r} is not supported "
                          f"(supported: {', '.join(sorted(BACKEND_TYPES))})", field="backend.type")
    module_name = _module_of(type_)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise Unsupported(f"backend type {type_!r} needs a library that is not installed: {exc.name}",
                          field="backend.type") from exc
    for value in vars(module).values():
        if (isinstance(value, type) and issubclass(value, BlobBackend) and value.type == type_
                and value.__module__ == module_name):
            return value
    raise Unsupported(f"backend type {type_!r}: {module_name} serves no such backend", field="backend.type")


def create_backend(cfg: BackendConfig) -> BlobBackend:
    """Build the backend described by a ``BackendConfig`` (``type`` + the sub-config it names).

    Raises ConfigError if the sub-config is missing, Unsupported for an unknown type.
    """
    if not cfg.type:
        raise ConfigError("backend.type is required", field="backend.type")
    cls = backend_class(cfg.type)
    sub = cfg.sub
    if sub is None:
        raise ConfigError(f"backend.{cfg.type} config is missing", field=f"backend.{cfg.type}")
    # each class takes the sub-config model of its own type, which is what ``sub`` is for this type
    backend: BlobBackend = cls(sub)  # type: ignore[arg-type]
    return backend
