"""Reading a configuration: text -> ``ConfigV2`` (JSON v2, TOML v2 or legacy v1 JSON).

Owns: parsing of the three accepted forms (in upstream's order), the v1 -> v2 renaming, the
conversion of pydantic's type errors into ``ConfigError`` (field path first, v1 spelling for v1
documents), the ``config_key_ignored`` log of unknown keys and the ``IMAGE_PULL_AUTH`` override.
The models and their semantic checks live in ``models.py``.

Must not import anything from the project but ``errors``, ``log`` and ``config.models``.
No environment reads: callers pass ``os.environ`` to ``apply_image_pull_auth`` explicitly.
Threading: every function is pure apart from logging, so any thread may call.

Decisions (tested in tests/test_config.py):
- JSON may carry ``//`` line and ``/* */`` block comments outside strings (upstream's documented
  sample configs have them); they are stripped before parsing, ``"http://..."`` in strings is kept.
- Unknown keys are accepted and ignored like upstream's serde. Each is logged once per load as
  ``config_key_ignored`` with its key path: at debug level for the keys real callers send on purpose
  (``_QUIET_KEYS`` anywhere; inside a backend config also every key of any other backend, because
  nydus-snapshotter emits one union struct for all backends), at warning level for anything else.
- Not modelled, accepted quietly: ``external_backends``, ``metadata_path``, legacy ``mirrors``.
- A present ``prefetch`` table without ``enable`` is accepted (enable=false); upstream rejects it.
- ``IMAGE_PULL_AUTH`` must be base64 of "user:password" (upstream copies any value); an empty value
  counts as unset. A config file's own ``auth`` is not checked (placeholders in samples, as upstream).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from nydusd.config.models import (
    _BACKEND_FIELD,
    BACKEND_MODELS,
    MAX_CONFIG_SIZE,
    V1_BACKEND_TYPES,
    ConfigV2,
    FileCacheConfig,
    FsCacheConfig,
    _render,
    model_of,
)
from nydusd.errors import ConfigError
from nydusd.log import get_logger

log = get_logger(__name__)


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


_ALL_BACKEND_KEYS = frozenset(f.alias or n for m in BACKEND_MODELS.values()
                              for n, f in m.model_fields.items())


def _unknown_keys(model: type[BaseModel], data: Mapping[str, Any], path: tuple[str, ...],
                  quiet: frozenset[str] = frozenset()) -> Iterator[tuple[tuple[str, ...], bool]]:
    """Yield (path, is_quiet) for every key of ``data`` that ``model`` (recursively) doesn't know."""
    fields = {(f.alias or n): f for n, f in model.model_fields.items()}
    for key, value in data.items():
        field = fields.get(key)
        if field is None:
            yield path + (key,), key in _QUIET_KEYS or key in quiet
            continue
        sub = model_of(field.annotation)
        if sub is not None and isinstance(value, dict):
            inner = _ALL_BACKEND_KEYS if sub in BACKEND_MODELS.values() else frozenset()
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
    btype = str(backend.get("type"))
    bmodel = BACKEND_MODELS.get(btype) if btype in V1_BACKEND_TYPES else None
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
