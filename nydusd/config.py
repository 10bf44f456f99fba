"""Daemon / filesystem configuration: one frozen pydantic model in upstream's v2 shape.

Owns: the normalised model (``ConfigV2`` and its sub-models), parsing of the three accepted forms
(JSON v2, TOML v2, legacy v1 JSON, tried in upstream's order), the v1 -> v2 conversion, validation
(errors are ``ConfigError`` whose message starts with the offending field path), the
``IMAGE_PULL_AUTH`` override and the redacted serialised form used by daemon info.

Must not import anything from the project but ``errors`` and ``log`` (it is a leaf module).
No environment reads: callers pass ``os.environ`` to ``apply_image_pull_auth`` explicitly.
Threading: models are immutable; every function is pure apart from logging, so any thread may call.

Decisions (see also tests/test_config.py):
- JSON may carry ``//`` line and ``/* */`` block comments outside strings (upstream's sample configs
  have them); they are stripped before parsing, ``"http://..."`` inside strings is untouched.
- Unknown keys are accepted and ignored like upstream's serde. Each one is logged once per load as
  ``config_key_ignored`` (key path); keys that real callers (nydus-snapshotter, nydusify) send on
  purpose are logged at debug level, any other key at warning level. See ``_QUIET``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from nydusd.errors import ConfigError
from nydusd.log import get_logger

log = get_logger(__name__)

MAX_CONFIG_SIZE = 1 << 20
MAX_BATCH_SIZE = 0x10000000
MAX_PREFETCH_THREADS = 1024
DEFAULT_BATCH_SIZE = 1 << 20

U32 = Annotated[StrictInt, Field(ge=0, le=0xFFFFFFFF)]
U64 = Annotated[StrictInt, Field(ge=0, le=0xFFFFFFFFFFFFFFFF)]
U8 = Annotated[StrictInt, Field(ge=0, le=255)]
Strs = tuple[StrictStr, ...]

BACKEND_TYPES = ("localfs", "localdisk", "oss", "s3", "registry", "http-proxy")
V1_BACKEND_TYPES = ("localfs", "localdisk", "oss", "s3", "registry")
CACHE_TYPES = ("", "dummycache", "blobcache", "filecache", "fscache")


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
    """P2P / Dragonfly proxy in front of a remote backend (§2.4)."""

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
    # Accepted for the snapshotter's sake; upstream's localfs backend no longer reads ahead.
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
    host: StrictStr = ""
    repo: StrictStr = ""
    auth: StrictStr | None = None
    registry_token: StrictStr | None = None
    blob_url_scheme: StrictStr = ""
    blob_redirected_host: StrictStr = ""


class OssConfig(_RemoteConfig):
    endpoint: StrictStr = ""
    bucket_name: StrictStr = ""
    scheme: StrictStr = "https"
    object_prefix: StrictStr = ""
    access_key_id: StrictStr = ""
    access_key_secret: StrictStr = ""


class S3Config(OssConfig):
    region: StrictStr = ""


class HttpProxyConfig(_RemoteConfig):
    addr: StrictStr = ""
    path: StrictStr = ""


_BACKEND_FIELD = {"localfs": "localfs", "localdisk": "localdisk", "oss": "oss", "s3": "s3",
                  "registry": "registry", "http-proxy": "http_proxy"}


class BackendConfig(_Model):
    """``type`` plus the sibling sub-config it names (others may be present and are kept)."""

    type: StrictStr
    localfs: LocalFsConfig | None = None
    localdisk: LocalDiskConfig | None = None
    oss: OssConfig | None = None
    s3: S3Config | None = None
    registry: RegistryConfig | None = None
    http_proxy: HttpProxyConfig | None = Field(default=None, alias="http-proxy")

    @property
    def sub(self) -> Any:
        """The sub-config named by ``type`` (validated to be present)."""
        return getattr(self, _BACKEND_FIELD[self.type])


# ------------------------------------------------------------------------------------------- cache
class PrefetchConfig(_Model):
    enable: StrictBool = False
    threads: U32 = 8
    batch_size: U64 = DEFAULT_BATCH_SIZE
    bandwidth_limit: U32 = 0
    prefetch_all: StrictBool = False
    stream_prefetch: StrictBool = False


class FileCacheConfig(_Model):
    work_dir: StrictStr = "."
    disable_indexed_map: StrictBool = False
    enable_encryption: StrictBool = False
    enable_convergent_encryption: StrictBool = False
    encryption_key: StrictStr = ""


class FsCacheConfig(_Model):
    work_dir: StrictStr = "."


with _shadowing_validate():
    class CacheConfig(_Model):
        type: StrictStr = ""
        compressed: StrictBool = False
        validate: StrictBool = False  # type: ignore[assignment]  # shadows BaseModel.validate (deprecated)
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
            if self.kind == "filecache" and self.filecache is not None:
                return self.filecache.work_dir
            if self.kind == "fscache" and self.fscache is not None:
                return self.fscache.work_dir
            return ""


# -------------------------------------------------------------------------------------------- rafs
with _shadowing_validate():
    class RafsConfig(_Model):
        mode: StrictStr = "direct"
        batch_size: U64 = DEFAULT_BATCH_SIZE
        validate: StrictBool = False  # type: ignore[assignment]  # shadows BaseModel.validate (deprecated)
        enable_xattr: StrictBool = False
        iostats_files: StrictBool = False
        access_pattern: StrictBool = False
        latest_read_files: StrictBool = False
        prefetch: PrefetchConfig = PrefetchConfig()


class OverlayConfig(_Model):
    upper_dir: StrictStr
    work_dir: StrictStr


class ConfigV2(_Model):
    version: StrictInt = 2
    id: StrictStr = ""
    backend: BackendConfig | None = None
    cache: CacheConfig = CacheConfig()
    rafs: RafsConfig | None = None
    overlay: OverlayConfig | None = None


def load_config(text: str) -> ConfigV2:
    """Parse config text (JSON v2, TOML v2 or legacy v1 JSON). Raises ConfigError."""
    raise ConfigError("not implemented yet", field="")


def load_config_file(path: str) -> ConfigV2:
    raise ConfigError("not implemented yet", field="", path=path)


def apply_image_pull_auth(cfg: ConfigV2, environ: Any) -> ConfigV2:
    return cfg
