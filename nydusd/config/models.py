"""The configuration models: one frozen pydantic model in upstream's v2 shape, and its checks.

Owns: ``ConfigV2`` and its sub-models, the backend registry (``BACKEND_MODELS``: ``backend.type``
-> its sub-config model, read off ``BackendConfig``'s fields; ``BACKEND_TYPES`` is its keys), the
semantic checks of the ``ConfigV2`` after-validator (errors are ``ConfigError`` whose message starts
with the offending field path, spelt as in the input: v1 paths for v1 documents, see ``_render``)
and the redacted serialised form. Parsing and the v1 -> v2 renaming live in ``load.py``.

Must not import anything from the project but ``errors`` (it is part of the leaf ``config``).
Threading: models are immutable, so any thread may read them.

Decisions (tested in tests/test_config.py):
- The serialised form redacts ``s3`` keys and ``encryption_key`` as well (upstream: ``oss`` only),
  and the password of any URL with credentials (a proxy ``url`` with ``user:password@``).
- No string value may contain a NUL byte (``<path>: must not contain a NUL byte``): checked first,
  so a NUL in a path or name is a config error, not a failure at the first file-system call.
- Semantic errors raise ``ConfigError`` from the ``ConfigV2`` after-validator (so models built in code
  are checked too); type errors are pydantic's, converted by ``load._from_validation_error``.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationInfo,
    model_validator,
)

from nydusd.errors import ConfigError, redact_credentials

MAX_CONFIG_SIZE = 1 << 20
MAX_BATCH_SIZE = 0x10000000
MAX_PREFETCH_THREADS = 1024
DEFAULT_BATCH_SIZE = 1 << 20

U8 = Annotated[StrictInt, Field(ge=0, le=0xFF)]
U32 = Annotated[StrictInt, Field(ge=0, le=0xFFFFFFFF)]
U64 = Annotated[StrictInt, Field(ge=0, le=0xFFFFFFFFFFFFFFFF)]
Strs = tuple[StrictStr, ...]
Secret = Annotated[StrictStr, Field(repr=False)]

CACHE_TYPES = ("", "dummycache", "blobcache", "filecache", "fscache")
RAFS_MODES = ("direct", "cached")


@contextlib.contextmanager
def _shadowing_validate() -> Iterator[None]:
    """The contract names a field ``validate``; it shadows the deprecated ``BaseModel.validate``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", 'Field name "validate"', UserWarning)
        yield


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)


# ----------------------------------------------------------------------------------------- backend
class ProxyConfig(_Model):
    """P2P / Dragonfly proxy in front of a remote backend (interfaces.md §2.4)."""

    url: StrictStr = ""
    ping_url: StrictStr = ""
    fallback: StrictBool = True
    check_interval: U64 = 5
    use_http: StrictBool = False
    check_pause_elapsed: U64 = 300
    dragonfly_scheduler_endpoint: StrictStr = ""


class LocalFsConfig(_Model):
    blob_file: StrictStr = ""
    dir: StrictStr = ""
    alt_dirs: Strs = ()
    # Sent by nydus-snapshotter; upstream's localfs backend no longer reads ahead.
    readahead: StrictBool = False
    readahead_sec: U32 = 10


class LocalDiskConfig(_Model):
    device_path: StrictStr = ""
    disable_gpt: StrictBool = False


class RemoteConfig(_Model):
    """What every remote backend (registry, oss, s3, http-proxy) shares: TLS, timeouts, retries, proxy."""

    skip_verify: StrictBool = False
    ca_cert_files: Strs = ()
    timeout: U32 = 5
    connect_timeout: U32 = 5
    retry_limit: U8 = 0
    proxy: ProxyConfig = ProxyConfig()


class RegistryConfig(RemoteConfig):
    scheme: StrictStr = "https"
    host: StrictStr
    repo: StrictStr
    auth: StrictStr | None = Field(default=None, repr=False)
    registry_token: StrictStr | None = Field(default=None, repr=False)
    blob_url_scheme: StrictStr = ""
    blob_redirected_host: StrictStr = ""


class OssConfig(RemoteConfig):
    endpoint: StrictStr
    bucket_name: StrictStr
    scheme: StrictStr = "https"
    object_prefix: StrictStr = ""
    access_key_id: Secret = ""
    access_key_secret: Secret = ""


class S3Config(OssConfig):
    region: StrictStr


class HttpProxyConfig(RemoteConfig):
    addr: StrictStr
    path: StrictStr = ""


BackendSubConfig = LocalFsConfig | LocalDiskConfig | OssConfig | S3Config | RegistryConfig | HttpProxyConfig
_BACKEND_REQUIRED = {"localdisk": ("device_path",), "oss": ("endpoint", "bucket_name"),
                     "s3": ("region", "bucket_name"), "registry": ("host", "repo"),
                     "http-proxy": ("addr",)}


class BackendConfig(_Model):
    """``type`` plus the sibling sub-config it names (other sub-configs may be present, unused)."""

    type: StrictStr
    localfs: LocalFsConfig | None = None
    localdisk: LocalDiskConfig | None = None
    oss: OssConfig | None = None
    s3: S3Config | None = None
    registry: RegistryConfig | None = None
    http_proxy: HttpProxyConfig | None = Field(default=None, alias="http-proxy")

    @property
    def sub(self) -> BackendSubConfig | None:
        """The sub-config named by ``type`` (validation guarantees a known type and its sub-config;
        None for an unknown type or a missing sub-config in a model built without validation)."""
        field = _BACKEND_FIELD.get(self.type)
        sub: BackendSubConfig | None = getattr(self, field) if field else None
        return sub


def model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model class in ``annotation`` (``X`` or ``X | None``), if any."""
    candidates = getattr(annotation, "__args__", None) or (annotation,)
    for c in candidates:
        if isinstance(c, type) and issubclass(c, BaseModel):
            return c
    return None


# The backend registry, read off BackendConfig: ``backend.type`` -> its sub-config model (and the
# field holding it), in declaration order. Everything that lists backend types derives from it.
BACKEND_MODELS: dict[str, type[BaseModel]] = {
    f.alias or n: m for n, f in BackendConfig.model_fields.items() if (m := model_of(f.annotation))}
_BACKEND_FIELD: dict[str, str] = {f.alias or n: n for n, f in BackendConfig.model_fields.items()
                                  if (f.alias or n) in BACKEND_MODELS}
BACKEND_TYPES: tuple[str, ...] = tuple(BACKEND_MODELS)
#: the types a v1 document may name: upstream's v1 converter predates http-proxy
V1_BACKEND_TYPES: tuple[str, ...] = tuple(t for t in BACKEND_TYPES if t != "http-proxy")


# ------------------------------------------------------------------------------------- cache, rafs
class PrefetchConfig(_Model):
    enable: StrictBool = False
    threads: U64 = 8
    batch_size: U64 = DEFAULT_BATCH_SIZE
    bandwidth_limit: U32 = 0
    prefetch_all: StrictBool = False
    stream_prefetch: StrictBool = False


class FileCacheConfig(_Model):
    work_dir: StrictStr = "."
    disable_indexed_map: StrictBool = False
    enable_encryption: StrictBool = False
    enable_convergent_encryption: StrictBool = False
    encryption_key: Secret = ""


class FsCacheConfig(_Model):
    work_dir: StrictStr = "."


with _shadowing_validate():
    class CacheConfig(_Model):
        """``type``: ""/"dummycache" (no cache), "blobcache"/"filecache", "fscache"."""

        type: StrictStr = ""
        compressed: StrictBool = False
        validate: StrictBool = False  # type: ignore[assignment]
        filecache: FileCacheConfig | None = None
        fscache: FsCacheConfig | None = None
        prefetch: PrefetchConfig = PrefetchConfig()

        @property
        def kind(self) -> Literal["filecache", "fscache", "dummy"]:
            if self.type in ("blobcache", "filecache"):
                return "filecache"
            return "fscache" if self.type == "fscache" else "dummy"

        @property
        def work_dir(self) -> str:
            """The cache directory ("" for the dummy cache)."""
            sub = {"filecache": self.filecache, "fscache": self.fscache}.get(self.kind)
            return sub.work_dir if sub is not None else ""

    class RafsConfig(_Model):
        mode: StrictStr = "direct"
        batch_size: U64 = DEFAULT_BATCH_SIZE
        validate: StrictBool = False  # type: ignore[assignment]
        enable_xattr: StrictBool = False
        iostats_files: StrictBool = False
        access_pattern: StrictBool = False
        latest_read_files: StrictBool = False
        prefetch: PrefetchConfig = PrefetchConfig()


class OverlayConfig(_Model):
    upper_dir: StrictStr
    work_dir: StrictStr


class ConfigV2(_Model):
    """The one normalised configuration (upstream ``ConfigV2``)."""

    version: StrictInt = 2
    id: StrictStr = ""
    backend: BackendConfig | None = None
    cache: CacheConfig = CacheConfig()
    rafs: RafsConfig | None = None
    overlay: OverlayConfig | None = None

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> ConfigV2:
        problem = next(_problems(self), None)
        if problem is not None:
            path = _render(problem[0], v1=bool(info.context and info.context.get("v1")))
            raise ConfigError(f"{path}: {problem[1]}", field=path)
        return self

    @property
    def chunk_validation(self) -> bool:
        """Verify chunk digests on read: ``cache.validate`` or ``rafs.validate`` (v1 digest_validate)."""
        return self.cache.validate or (self.rafs is not None and self.rafs.validate)

    def to_dict(self, *, redact: bool = True) -> dict[str, Any]:
        """Upstream's serialised ``ConfigV2``: every field, null for absent sub-configs, secrets
        removed unless ``redact=False`` (oss/s3 keys -> "", registry auth/token -> null, URL
        passwords -> ``***``)."""
        out = self.model_dump(mode="json", by_alias=True)
        out = {"version": out["version"], "id": out["id"], "backend": out["backend"],
               "external_backends": [], "cache": out["cache"], "rafs": out["rafs"],
               "overlay": out["overlay"]}
        if redact and out["backend"]:
            for name in ("oss", "s3"):
                if out["backend"][name]:
                    out["backend"][name].update(access_key_id="", access_key_secret="")
            if out["backend"]["registry"]:
                out["backend"]["registry"].update(auth=None, registry_token=None)
        if redact and out["cache"]["filecache"]:
            out["cache"]["filecache"]["encryption_key"] = ""
        return _redact_urls(out) if redact else out

    def to_json(self, *, redact: bool = True) -> str:
        """``to_dict`` as a JSON document; ``load_config`` reads it back (if not redacted)."""
        return json.dumps(self.to_dict(redact=redact))


def _redact_urls(value: Any) -> Any:
    """``value`` with the credentials of every URL in its strings masked (a proxy ``url`` such as
    ``http://user:password@peer:65001`` -> ``http://user:***@peer:65001``)."""
    if isinstance(value, str):
        return redact_credentials(value)
    if isinstance(value, dict):
        return {k: _redact_urls(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_urls(v) for v in value]
    return value


# -------------------------------------------------------------------------------------- validation
Loc = tuple[str | int, ...]


def _problems(cfg: ConfigV2) -> Iterator[tuple[Loc, str]]:
    """Upstream's ``validate()`` rules (§2.6), each with the v2 location it concerns."""
    yield from _nul_problems(cfg, ())
    if cfg.version != 2:
        yield ("version",), f"must be 2, got {cfg.version}"
    if cfg.backend is not None:
        yield from _backend_problems(cfg.backend)
    cache = cfg.cache
    if cache.type not in CACHE_TYPES:
        yield ("cache", "type"), f"unsupported cache type {cache.type!r}"
    if cache.kind != "dummy":
        sub = cache.filecache if cache.kind == "filecache" else cache.fscache
        if sub is None:
            yield ("cache", cache.kind), f"required for cache type {cache.type!r}"
        elif not sub.work_dir:
            yield ("cache", cache.kind, "work_dir"), "required field is empty"
    if cfg.rafs is not None:
        if cfg.rafs.mode not in RAFS_MODES:
            yield ("rafs", "mode"), f"must be 'direct' or 'cached', got {cfg.rafs.mode!r}"
        if cfg.rafs.batch_size > MAX_BATCH_SIZE:
            yield ("rafs", "batch_size"), f"must be <= {MAX_BATCH_SIZE:#x}, got {cfg.rafs.batch_size}"
        yield from _prefetch_problems(("rafs", "prefetch"), cfg.rafs.prefetch)
    yield from _prefetch_problems(("cache", "prefetch"), cache.prefetch)


def _nul_problems(value: Any, loc: Loc) -> Iterator[tuple[Loc, str]]:
    """Every string anywhere in the model (paths, names, hosts, secrets) must be free of NUL: no
    file name, URL or header can carry one (upstream's Rust strings reach C paths the same way)."""
    if isinstance(value, str):
        if "\0" in value:
            yield loc, "must not contain a NUL byte"
    elif isinstance(value, BaseModel):
        for name, field in type(value).model_fields.items():
            yield from _nul_problems(getattr(value, name), loc + (field.alias or name,))
    elif isinstance(value, tuple):
        for i, item in enumerate(value):
            yield from _nul_problems(item, loc + (i,))


def _backend_problems(backend: BackendConfig) -> Iterator[tuple[Loc, str]]:
    if backend.type not in BACKEND_TYPES:
        yield ("backend", "type"), (f"unsupported backend type {backend.type!r} "
                                    f"(expected one of {', '.join(BACKEND_TYPES)})")
        return
    sub, loc = backend.sub, ("backend", backend.type)
    if sub is None:
        yield loc, f"required for backend type {backend.type!r}"
        return
    if isinstance(sub, LocalFsConfig) and not (sub.dir or sub.blob_file):
        yield loc + ("dir",), "required field is empty (set dir or blob_file)"
    for name in _BACKEND_REQUIRED.get(backend.type, ()):
        if not getattr(sub, name):
            yield loc + (name,), "required field is empty"
    if isinstance(sub, HttpProxyConfig) and sub.addr:
        addr = sub.addr
        if not (addr.startswith(("http://", "https://")) or (os.path.isabs(addr) and os.path.exists(addr))):
            yield loc + ("addr",), ("must be an http:// or https:// URL or the absolute path of an "
                                    f"existing unix socket, got {addr!r}")


def _prefetch_problems(loc: Loc, p: PrefetchConfig) -> Iterator[tuple[Loc, str]]:
    if not p.enable:
        return
    if not 1 <= p.threads <= MAX_PREFETCH_THREADS:
        yield loc + ("threads",), f"must be in 1..{MAX_PREFETCH_THREADS}, got {p.threads}"
    if p.batch_size > MAX_BATCH_SIZE:
        yield loc + ("batch_size",), f"must be <= {MAX_BATCH_SIZE:#x}, got {p.batch_size}"


# v2 location -> v1 spelling (the v1 converter is a pure renaming, so errors translate back)
_V1_RAFS = {"batch_size": "amplify_io", "validate": "digest_validate"}
_V1_PREFETCH = {"threads": "threads_count", "batch_size": "merging_size", "bandwidth_limit": "bandwidth_rate"}


def _render(loc: Loc, v1: bool = False) -> str:
    """Dotted path of a v2 location, translated to the v1 document's spelling when ``v1``."""
    if v1 and loc:
        head, rest = loc[0], loc[1:]
        if head == "id":
            loc = ("device", "id")
        elif head == "backend":
            loc = ("device", "backend", *(("type",) if rest[:1] == ("type",) else
                                          ("config", *rest[1:]) if rest else ()))
        elif head == "cache" and rest[:1] == ("prefetch",):
            loc = ("fs_prefetch", *(_V1_PREFETCH.get(str(k), k) for k in rest[1:]))
        elif head == "cache":
            loc = ("device", "cache", *(("config", *rest[1:]) if rest[:1] in (("filecache",), ("fscache",))
                                        else rest))
        elif head == "rafs" and rest[:1] == ("prefetch",):
            loc = ("fs_prefetch", *(_V1_PREFETCH.get(str(k), k) for k in rest[1:]))
        elif head == "rafs" and rest:
            loc = (_V1_RAFS.get(str(rest[0]), rest[0]), *rest[1:])
    return ".".join(str(k) for k in loc) or "config"

