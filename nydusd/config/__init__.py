"""Daemon / filesystem configuration: one frozen pydantic model in upstream's v2 shape.

``models.py`` owns the models, the backend registry and the semantic checks; ``load.py`` reads
text (JSON v2, TOML v2, legacy v1 JSON) into a ``ConfigV2``. Import the public names from here.

Must not import anything from the project but ``errors`` and ``log`` (it is a leaf package).
Threading: models are immutable; every function is pure apart from logging, so any thread may call.
"""

from __future__ import annotations

from nydusd.config.load import (
    apply_image_pull_auth,
    load_config,
    load_config_file,
    strip_json_comments,
)
from nydusd.config.models import (
    BACKEND_MODELS,
    BACKEND_TYPES,
    CACHE_TYPES,
    DEFAULT_BATCH_SIZE,
    MAX_BATCH_SIZE,
    MAX_CONFIG_SIZE,
    MAX_PREFETCH_THREADS,
    RAFS_MODES,
    V1_BACKEND_TYPES,
    BackendConfig,
    BackendSubConfig,
    CacheConfig,
    ConfigV2,
    FileCacheConfig,
    FsCacheConfig,
    HttpProxyConfig,
    LocalDiskConfig,
    LocalFsConfig,
    OssConfig,
    OverlayConfig,
    PrefetchConfig,
    ProxyConfig,
    RafsConfig,
    RegistryConfig,
    RemoteConfig,
    S3Config,
)

__all__ = [
    "BACKEND_MODELS", "BACKEND_TYPES", "CACHE_TYPES", "DEFAULT_BATCH_SIZE", "MAX_BATCH_SIZE",
    "MAX_CONFIG_SIZE", "MAX_PREFETCH_THREADS", "RAFS_MODES", "V1_BACKEND_TYPES", "BackendConfig",
    "BackendSubConfig", "CacheConfig", "ConfigV2", "FileCacheConfig", "FsCacheConfig",
    "HttpProxyConfig", "LocalDiskConfig", "LocalFsConfig", "OssConfig", "OverlayConfig",
    "PrefetchConfig", "ProxyConfig", "RafsConfig", "RegistryConfig", "RemoteConfig", "S3Config",
    "apply_image_pull_auth", "load_config", "load_config_file", "strip_json_comments",
]
