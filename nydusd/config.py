"""Daemon / filesystem configuration: one frozen pydantic model in upstream's v2 shape.

Owns: the normalised model (``ConfigV2`` and its sub-models), parsing of the three accepted forms
(JSON v2, TOML v2, legacy v1 JSON, in upstream's order), the v1 -> v2 conversion, validation (errors
are ``ConfigError`` whose message starts with the offending field path, spelt as in the input: v1
paths for v1 documents), the ``IMAGE_PULL_AUTH`` override and the redacted serialised form.

Must not import anything from the project but ``errors`` and ``log`` (it is a leaf module).
No environment reads: callers pass ``os.environ`` to ``apply_image_pull_auth`` explicitly.
Threading: models are immutable; every function is pure apart from logging, so any thread may call.

Decisions (tested in tests/test_config.py):
- JSON may carry ``//`` line and ``/* */`` block comments outside strings (upstream's documented
  sample configs have them); they are stripped before parsing, ``"http://..."`` in strings is kept.
- Unknown keys are accepted and ignored like upstream's serde. Each is logged once per load as
  ``config_key_ignored`` with its key path: at debug level for the keys real callers send on purpose
  (``_QUIET_KEYS`` anywhere; inside a backend config also every key of any other backend, because
  nydus-snapshotter emits one union struct for all backends), at warning level for anything else.
- Not modelled, accepted quietly: ``external_backends``, ``metadata_path``, legacy ``mirrors``.
- A present ``prefetch`` table without ``enable`` is accepted (enable=false); upstream rejects it.
- The serialised form redacts ``s3`` keys and ``encryption_key`` as well (upstream: ``oss`` only),
  and the password of any URL with credentials (a proxy ``url`` with ``user:password@``).
- ``IMAGE_PULL_AUTH`` must be base64 of "user:password" (upstream copies any value); an empty value
  counts as unset. A config file's own ``auth`` is not checked (placeholders in samples, as upstream).
- No string value may contain a NUL byte (``<path>: must not contain a NUL byte``): checked first,
  so a NUL in a path or name is a config error, not a failure at the first file-system call.
- Semantic errors raise ``ConfigError`` from the ``ConfigV2`` after-validator (so models built in code
  are checked too); type errors are pydantic's, converted by ``_from_validation_error``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import re
import tomllib
import warnings
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from nydusd.errors import ConfigError, redact_credentials
from nydusd.log import get_logger

log = get_logger(__name__)

MAX_CONFIG_SIZE = 1 << 20
MAX_BATCH_SIZE = 0x10000000
MAX_PREFETCH_THREADS = 1024
DEFAULT_BATCH_SIZE = 1 << 20

U8 = Annotated[StrictInt, Field(ge=0, le=0xFF)]
U32 = Annotated[StrictInt, Field(ge=0, le=0xFFFFFFFF)]
U64 = Annotated[StrictInt, Field(ge=0, le=0xFFFFFFFFFFFFFFFF)]
Strs = tuple[StrictStr, ...]
Secret = Annotated[StrictStr, Field(repr=False)]

BACKEND_TYPES = ("localfs", "localdisk", "oss", "s3", "registry", "http-proxy")
V1_BACKEND_TYPES = ("localfs", "localdisk", "oss", "s3", "registry")
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


class _RemoteConfig(_Model):
    skip_verify: StrictBool = False
    ca_cert_files: Strs = ()
    timeout: U32 = 5
    connect_timeout: U32 = 5
    retry_limit: U8 = 0
    proxy: ProxyConfig = ProxyConfig()


class RegistryConfig(_RemoteConfig):
    scheme: StrictStr = "https"
    host: StrictStr
    repo: StrictStr
    auth: StrictStr | None = Field(default=None, repr=False)
    registry_token: StrictStr | None = Field(default=None, repr=False)
    blob_url_scheme: StrictStr = ""
    blob_redirected_host: StrictStr = ""


class OssConfig(_RemoteConfig):
    endpoint: StrictStr
    bucket_name: StrictStr
    scheme: StrictStr = "https"
    object_prefix: StrictStr = ""
    access_key_id: Secret = ""
    access_key_secret: Secret = ""


class S3Config(OssConfig):
    region: StrictStr


class HttpProxyConfig(_RemoteConfig):
    addr: StrictStr
    path: StrictStr = ""


_BACKEND_FIELD = {"localfs": "localfs", "localdisk": "localdisk", "oss": "oss", "s3": "s3",
                  "registry": "registry", "http-proxy": "http_proxy"}
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
    def sub(self) -> Any:
        """The sub-config named by ``type`` (validation guarantees it is present)."""
        return getattr(self, _BACKEND_FIELD[self.type])


_BACKEND_MODELS: tuple[type[BaseModel], ...] = (LocalFsConfig, LocalDiskConfig, OssConfig, S3Config,
                                                RegistryConfig, HttpProxyConfig)


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
    if backend.type == "localfs" and not (sub.dir or sub.blob_file):
        yield loc + ("dir",), "required field is empty (set dir or blob_file)"
    for name in _BACKEND_REQUIRED.get(backend.type, ()):
        if not getattr(sub, name):
            yield loc + (name,), "required field is empty"
    if backend.type == "http-proxy" and sub.addr:
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


_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array",
               dict: "object", type(None): "null"}
_EXPECTED = {"int_type": "an integer", "bool_type": "a boolean", "string_type": "a string",
             "model_type": "an object", "model_attributes_type": "an object", "dict_type": "an object",
             "tuple_type": "an array", "list_type": "an array"}


def _from_validation_error(exc: ValidationError, v1: bool) -> ConfigError:
    errors = exc.errors(include_url=False)
    err = errors[0]
    path = _render(tuple(err["loc"]), v1)
    kind, ctx = err["type"], err.get("ctx") or {}
    got = _JSON_TYPES.get(type(err["input"]), type(err["input"]).__name__)
    if kind == "missing":
        reason = "required field is missing"
    elif kind in _EXPECTED:
        reason = f"expected {_EXPECTED[kind]}, got {got}"
    elif kind == "greater_than_equal":
        reason = f"must be >= {ctx['ge']}, got {err['input']}"
    elif kind == "less_than_equal":
        reason = f"must be <= {ctx['le']}, got {err['input']}"
    else:
        reason = err["msg"][:1].lower() + err["msg"][1:]
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return ConfigError(f"{path}: {reason}{more}", field=path)


def _validate(data: dict[str, Any], v1: bool) -> ConfigV2:
    try:
        return ConfigV2.model_validate(data, context={"v1": v1})
    except ValidationError as e:
        raise _from_validation_error(e, v1) from None


# ----------------------------------------------------------------------------------------- parsing
# a JSON string (kept), a // line comment or a /* block */ comment (both dropped, newlines kept)
_JSON_TOKENS = re.compile(r'"(?:\\.|[^"\\])*"|//[^\n]*|/\*.*?\*/', re.S)


def strip_json_comments(text: str) -> str:
    """Remove ``//`` and ``/* */`` comments outside JSON strings; line numbers stay the same."""
    return _JSON_TOKENS.sub(lambda m: m[0] if m[0][0] == '"' else "\n" * m[0].count("\n"), text)


def _parse_text(text: str) -> tuple[Any, str]:
    """Decode the document: JSON (comments allowed) first, TOML second. Returns (data, format)."""
    try:
        return json.loads(text), "json"
    except json.JSONDecodeError as first:
        json_err = first
    stripped = strip_json_comments(text)
    if stripped != text:
        try:
            return json.loads(stripped), "json"
        except json.JSONDecodeError as e:
            json_err = e
    if stripped.lstrip().startswith(("{", "[")):
        raise ConfigError(f"config: invalid JSON: {json_err.msg} (line {json_err.lineno}, "
                          f"column {json_err.colno})", field="config") from None
    try:
        return tomllib.loads(text), "toml"
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config: neither JSON nor valid TOML: {e}", field="config") from None


def load_config(text: str) -> ConfigV2:
    """Parse and validate a configuration: JSON v2, TOML v2 or legacy v1 JSON (§2.1).

    A JSON object with ``version`` (and any TOML document) is v2; a JSON object without it is v1 and
    is converted. Unknown keys are logged (``config_key_ignored``) and ignored. Raises ConfigError
    naming the field path for any syntax, type or consistency problem.
    """
    if len(text) > MAX_CONFIG_SIZE or len(text.encode("utf-8", "surrogatepass")) > MAX_CONFIG_SIZE:
        raise ConfigError(f"config: size exceeds the limit of {MAX_CONFIG_SIZE} bytes", field="config")
    data, fmt = _parse_text(text)
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected an object, got {_json_type(data)}", field="config")
    if fmt == "toml" or "version" in data:
        _log_unknown(_unknown_keys(ConfigV2, data, ()))
        return _validate(data, v1=False)
    if "device" not in data:
        raise ConfigError("device: required field is missing (a v1 config needs 'device', "
                          "a v2 config needs 'version = 2')", field="device")
    converted = _v1_to_v2(data)
    _log_unknown(_unknown_v1_keys(data))
    return _validate(converted, v1=True)


def load_config_file(path: str | os.PathLike[str]) -> ConfigV2:
    """Read and ``load_config`` a file (at most 1 MiB). Raises ConfigError."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_SIZE + 1)
    except OSError as e:
        raise ConfigError(f"config: cannot read {os.fspath(path)}: {e.strerror}", field="config",
                          path=os.fspath(path)) from None
    except ValueError:  # a NUL byte in the path
        raise ConfigError(f"config: cannot read {os.fspath(path)!r}: path contains a NUL byte",
                          field="config") from None
    if len(raw) > MAX_CONFIG_SIZE:
        raise ConfigError(f"config: size exceeds the limit of {MAX_CONFIG_SIZE} bytes", field="config",
                          path=os.fspath(path))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config: not UTF-8 text (byte {e.start})", field="config",
                          path=os.fspath(path)) from None
    return load_config(text)


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


# ------------------------------------------------------------------------------------ v1 -> v2
def _obj(data: Mapping[str, Any], key: str, path: str, *, required: bool = True) -> dict[str, Any]:
    """``data[key]`` as an object; ConfigError with ``path`` when missing (if required) or not one."""
    if key not in data:
        if required:
            raise ConfigError(f"{path}: required field is missing", field=path)
        return {}
    value = data[key]
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected an object, got {_json_type(value)}", field=path)
    return value


def _v1_backend(backend: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(type, config) of a v1 ``device.backend``; the v1 converter knows five backend types."""
    field = "device.backend.type"
    if "type" not in backend:
        raise ConfigError(f"{field}: required field is missing", field=field)
    btype = backend["type"]
    if not isinstance(btype, str):
        raise ConfigError(f"{field}: expected a string, got {_json_type(btype)}", field=field)
    if btype not in V1_BACKEND_TYPES:
        hint = " (only in v2 configs)" if btype == "http-proxy" else ""
        raise ConfigError(f"{field}: unsupported backend type {btype!r}{hint} "
                          f"(expected one of {', '.join(V1_BACKEND_TYPES)})", field=field)
    return btype, _obj(backend, "config", "device.backend.config")


def _v1_to_v2(data: Mapping[str, Any]) -> dict[str, Any]:
    """Rename a v1 document into the v2 shape (upstream ``TryFrom<RafsConfig> for ConfigV2``).

    Values are copied unchecked; pydantic checks them and ``_render`` names v1 paths in errors.
    """
    device = _obj(data, "device", "device")
    btype, bconfig = _v1_backend(_obj(device, "backend", "device.backend"))
    cache = _obj(device, "cache", "device.cache", required=False)
    if "mode" not in data:
        raise ConfigError("mode: required field is missing", field="mode")
    ctype = cache.get("type", "")
    out_cache: dict[str, Any] = {k: cache[k] for k in ("type", "compressed", "validate") if k in cache}
    if ctype in ("blobcache", "filecache", "fscache"):
        sub = "fscache" if ctype == "fscache" else "filecache"
        out_cache[sub] = _obj(cache, "config", "device.cache.config", required=False)
    fs_prefetch = _obj(data, "fs_prefetch", "fs_prefetch", required=False)
    prefetch = {"prefetch_all": True}
    prefetch.update({new: fs_prefetch[old] for old, new in
                     (("enable", "enable"), ("threads_count", "threads"), ("merging_size", "batch_size"),
                      ("bandwidth_rate", "bandwidth_limit"), ("prefetch_all", "prefetch_all"),
                      ("stream_prefetch", "stream_prefetch")) if old in fs_prefetch})
    rafs = {new: data[old] for old, new in
            (("mode", "mode"), ("amplify_io", "batch_size"), ("digest_validate", "validate"),
             ("enable_xattr", "enable_xattr"), ("iostats_files", "iostats_files"),
             ("access_pattern", "access_pattern"), ("latest_read_files", "latest_read_files"))
            if old in data}
    rafs["prefetch"] = prefetch
    # v1 has no blob-level prefetch: upstream copies an enabled fs prefetch, else a zeroed default.
    out_cache["prefetch"] = (prefetch if prefetch.get("enable") is True else
                             {"enable": False, "threads": 0, "batch_size": 0, "prefetch_all": True})
    out: dict[str, Any] = {"version": 2, "backend": {"type": btype, _BACKEND_FIELD[btype]: bconfig},
                           "cache": out_cache, "rafs": rafs}
    if "id" in device:
        out["id"] = device["id"]
    return out


# ------------------------------------------------------------------------------------ unknown keys
# Keys real callers send on purpose that nydusd ignores: logged at debug level only.
_QUIET_KEYS = frozenset({"warmup", "id_mapping", "external_backends", "metadata_path", "mirrors",
                         "readahead", "readahead_sec", "prefetch_config", "id"})
_V1_TOP = frozenset({"device", "mode", "digest_validate", "iostats_files", "enable_xattr", "access_pattern",
                     "latest_read_files", "amplify_io", "fs_prefetch"})
_V1_KEYS = {("device",): frozenset({"id", "backend", "cache"}),
            ("device", "backend"): frozenset({"type", "config"}),
            ("device", "cache"): frozenset({"type", "compressed", "validate", "config"}),
            ("fs_prefetch",): frozenset({"enable", "threads_count", "merging_size", "bandwidth_rate",
                                         "prefetch_all", "stream_prefetch"})}


_ALL_BACKEND_KEYS = frozenset(f.alias or n for m in _BACKEND_MODELS for n, f in m.model_fields.items())


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model class in ``annotation`` (``X`` or ``X | None``), if any."""
    candidates = getattr(annotation, "__args__", None) or (annotation,)
    for c in candidates:
        if isinstance(c, type) and issubclass(c, BaseModel):
            return c
    return None


def _unknown_keys(model: type[BaseModel], data: Mapping[str, Any], path: tuple[str, ...],
                  quiet: frozenset[str] = frozenset()) -> Iterator[tuple[tuple[str, ...], bool]]:
    """Yield (path, is_quiet) for every key of ``data`` that ``model`` (recursively) doesn't know."""
    fields = {(f.alias or n): f for n, f in model.model_fields.items()}
    for key, value in data.items():
        field = fields.get(key)
        if field is None:
            yield path + (key,), key in _QUIET_KEYS or key in quiet
            continue
        sub = _model_of(field.annotation)
        if sub is not None and isinstance(value, dict):
            inner = _ALL_BACKEND_KEYS if sub in _BACKEND_MODELS else frozenset()
            yield from _unknown_keys(sub, value, path + (key,), inner)


def _sub_dict(data: Mapping[str, Any], key: str) -> dict[str, Any]:
    """``data[key]`` when it is an object, else an empty dict (shape errors are reported elsewhere)."""
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def _unknown_v1_keys(data: Mapping[str, Any]) -> Iterator[tuple[tuple[str, ...], bool]]:
    for key in data:
        if key not in _V1_TOP:
            yield (key,), key in _QUIET_KEYS
    for where, known in _V1_KEYS.items():
        node: Any = data
        for part in where:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            yield from (((*where, k), k in _QUIET_KEYS) for k in node if k not in known)
    device = _sub_dict(data, "device")
    backend = _sub_dict(device, "backend")
    cache = _sub_dict(device, "cache")
    models: dict[str, type[BaseModel]] = {"localfs": LocalFsConfig, "localdisk": LocalDiskConfig,
                                          "oss": OssConfig, "s3": S3Config, "registry": RegistryConfig}
    bmodel = models.get(str(backend.get("type")))
    if bmodel is not None and isinstance(backend.get("config"), dict):
        yield from _unknown_keys(bmodel, backend["config"], ("device", "backend", "config"),
                                 _ALL_BACKEND_KEYS)
    cmodel: type[BaseModel] = FsCacheConfig if cache.get("type") == "fscache" else FileCacheConfig
    if isinstance(cache.get("config"), dict):
        yield from _unknown_keys(cmodel, cache["config"], ("device", "cache", "config"))


def _log_unknown(found: Iterator[tuple[tuple[str, ...], bool]]) -> None:
    for path, quiet in sorted(set(found)):
        (log.debug if quiet else log.warning)("config_key_ignored", key=".".join(path))


# ---------------------------------------------------------------------------------- IMAGE_PULL_AUTH
def apply_image_pull_auth(cfg: ConfigV2, environ: Mapping[str, str]) -> ConfigV2:
    """Return ``cfg`` with ``backend.registry.auth`` replaced by ``environ["IMAGE_PULL_AUTH"]``.

    Upstream nydusd does this for the startup ``--config`` only (not for API mounts). Unset/empty
    variable or no registry sub-config: ``cfg`` unchanged. The value must be base64 of "user:pass"
    (ConfigError naming IMAGE_PULL_AUTH otherwise).
    """
    auth = environ.get("IMAGE_PULL_AUTH", "")
    if not auth or cfg.backend is None or cfg.backend.registry is None:
        return cfg
    try:
        plain = base64.b64decode(auth, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        plain = ""
    if ":" not in plain:
        raise ConfigError("IMAGE_PULL_AUTH: expected base64 of 'user:password'", field="IMAGE_PULL_AUTH")
    registry = cfg.backend.registry.model_copy(update={"auth": auth})
    log.info("registry_auth_overridden", source="IMAGE_PULL_AUTH")
    return cfg.model_copy(update={"backend": cfg.backend.model_copy(update={"registry": registry})})
