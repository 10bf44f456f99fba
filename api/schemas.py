"""Wire models of the HTTP API (spec interfaces.md §3, §8) — requests and documented responses.

Owns: ``MountRequest`` (upstream ``ApiMountCmd`` plus the seed's ``{fstype, mountpoint}`` form),
``DaemonConf``, ``ErrorMessage``, ``DaemonInfo`` and the metrics payloads. Config models are NOT
here: a mount's ``config`` is a string (JSON/TOML text) parsed by the daemon with nydusd.config.

Response models document the wire shape for ``openapi.yaml``; routes pass the daemon's dicts
through unchanged (extra fields allowed), and the tests validate real responses against these.
Must not import: fs/storage/rafs internals. Thread-safety: immutable models.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Ints8 = list[int]
Ints15 = list[int]


class ErrorMessage(BaseModel):
    """Every error body: ``code`` (our error class code, ``UNDEFINED`` for handler-level errors) and
    ``message`` (upstream's Debug rendering, e.g. ``Mount(MountFilesystem(Other("...")))``)."""

    code: str
    message: str


class MountRequest(BaseModel):
    """Body of ``POST|PUT /api/v1/mount``.

    Upstream form (with ``?mountpoint=``): ``{source, fs_type, config, prefetch_files}``; ``config`` is
    the config document as a string. Seed form (``PUT`` without query string): ``{source, fstype,
    mountpoint, config}`` where ``config`` may also be a path to a config file. Unknown keys are ignored
    as upstream's serde does.
    """

    model_config = ConfigDict(extra="ignore")

    source: str = Field(description="path of the RAFS bootstrap (metadata) file")
    fs_type: str = Field("", description='"rafs" (passthrough_fs is not supported); "" is rejected')
    config: str = Field(description="config document (JSON/TOML) as a string; seed form: or a file path")
    prefetch_files: list[str] | None = Field(
        None, description="absolute paths (without `..` components) prefetched after mount; "
                          "any other entry is refused with 400")
    fstype: str | None = Field(None, description="seed form: filesystem type (same as fs_type)")
    mountpoint: str | None = Field(None, description="seed form: path inside the pseudo filesystem")


class DaemonConf(BaseModel):
    """Body of ``PUT /api/v1/daemon``."""

    model_config = ConfigDict(extra="ignore")

    log_level: str = Field(description="off|error|warn|info|debug|trace (case-insensitive)")


class BuildInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    package_ver: str
    git_commit: str
    build_time: str
    profile: str
    rustc: str


class BackendInstance(BaseModel):
    model_config = ConfigDict(extra="allow")

    backend_type: str = Field(description='"Rafs" or "PassthroughFs"')
    mountpoint: str
    mounted_time: str
    config: dict[str, Any] | None = None


class DaemonInfo(BaseModel):
    """``GET /api/v1/daemon`` (v2: ``backend_collection`` is null)."""

    model_config = ConfigDict(extra="allow")

    version: BuildInfo
    id: str | None = None
    supervisor: str | None = None
    state: Literal["INIT", "READY", "RUNNING", "STOPPED", "UNKNOWN"]
    backend_collection: dict[str, BackendInstance] | None = None


class Events(BaseModel):
    model_config = ConfigDict(extra="allow")

    max_errors: int
    total_errors: int
    max_size: int
    total_size: int
    errors: list[str]


class FsIoStats(BaseModel):
    """``GET /api/v1/metrics`` (spec §8.1)."""

    model_config = ConfigDict(extra="allow")

    files_account_enabled: bool
    access_pattern_enabled: bool
    record_latest_read_files_enabled: bool
    measure_latency: bool
    id: str
    nr_opens: int
    data_read: int
    block_count_read: Ints8
    fop_hits: Ints15
    fop_errors: Ints15
    fop_cumulative_latency_total: Ints15
    read_latency_dist: Ints8


class FileIoStats(BaseModel):
    model_config = ConfigDict(extra="allow")

    total_fops: int
    data_read: int
    block_count_read: Ints8
    fop_hits: Ints15
    fop_errors: Ints15


FilesMetrics = dict[str, FileIoStats] | list[list[int]]


class AccessPattern(BaseModel):
    model_config = ConfigDict(extra="allow")

    ino: int
    nr_read: int
    first_access_time_secs: int
    first_access_time_nanos: int


class BackendMetrics(BaseModel):
    """``GET /api/v1/metrics/backend`` (spec §8.3)."""

    model_config = ConfigDict(extra="allow")

    backend_type: str
    read_count: int
    read_errors: int
    read_amount_total: int
    read_cumulative_latency_millis_total: int
    read_cumulative_latency_millis_dist: Ints8
    read_count_block_size_dist: Ints8
    read_latency_sizes_dist: list[list[int]]


class BlobcacheMetrics(BaseModel):
    """``GET /api/v1/metrics/blobcache`` (spec §8.4)."""

    model_config = ConfigDict(extra="allow")

    underlying_files: list[str]
    store_path: str
    partial_hits: int
    whole_hits: int
    total: int
    entries_count: int
    prefetch_data_amount: int
    prefetch_requests_count: int
    prefetch_workers: int
    prefetch_unmerged_chunks: int
    prefetch_cumulative_time_millis: int
    prefetch_begin_time_secs: int
    prefetch_begin_time_millis: int
    prefetch_end_time_secs: int
    prefetch_end_time_millis: int
    buffered_backend_size: int
    data_all_ready: bool


class InflightRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    inode: int
    opcode: int
    unique: int
    timestamp_secs: int


class FsBackendInfo(BaseModel):
    """``GET /api/v1/daemon/backend``: RAFS superblock summary (spec §3.1); fields vary by version."""

    model_config = ConfigDict(extra="allow")

    magic: int | None = None
    version: int | None = None
    sb_size: int | None = None
    root_inode: int | None = None
    chunk_size: int | None = None
    inodes_count: int | None = None
    flags: Any = None
