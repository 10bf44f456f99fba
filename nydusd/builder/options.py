"""Build options: everything `nydus-image create` / `merge` can be told, validated once.

Owns: ``BuildOptions`` (frozen pydantic model), ``WhiteoutSpec``, ``SourceType``, ``parse_chunk_size``
and ``parse_prefetch_patterns``. Must not import rafs/storage internals or do any I/O beyond reading
nothing: callers (the CLI, the converter) construct the model and pass it down explicitly.
Thread-safe: the model is immutable.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from nydusd.compress import Compressor
from nydusd.digest import DigestAlgorithm
from nydusd.errors import InvalidArgument

MIN_CHUNK_SIZE = 0x1000
MAX_CHUNK_SIZE = 0x1000000
DEFAULT_CHUNK_SIZE = 0x100000
MAX_BLOB_ID_LEN = 255


class WhiteoutSpec(enum.Enum):
    """How whiteouts are recognised (spec §5): OCI ``.wh.`` names, overlayfs 0/0 char devices, none."""

    OCI = "oci"
    OVERLAYFS = "overlayfs"
    NONE = "none"


class SourceType(enum.Enum):
    DIRECTORY = "dir-rafs"
    TARBALL = "tar-rafs"

    @classmethod
    def parse(cls, name: str) -> SourceType:
        """Accept upstream spellings (``directory`` is the old name of ``dir-rafs``).

        Raises InvalidArgument for types we do not build (``targz-ref``, ``tar-tarfs`` ...).
        """
        aliases = {"directory": "dir-rafs", "dir-rafs": "dir-rafs", "tar-rafs": "tar-rafs",
                   "targz-rafs": "tar-rafs"}
        try:
            return cls(aliases[name])
        except KeyError:
            raise InvalidArgument(f"unsupported conversion type {name!r}; this builder supports "
                                  "dir-rafs (directory), tar-rafs and targz-rafs", field="type") from None


def parse_chunk_size(text: str | int) -> int:
    """Decimal or ``0x`` hex; a power of two in [4 KiB, 16 MiB]. Raises InvalidArgument otherwise."""
    if isinstance(text, int):
        value = text
    else:
        try:
            value = int(text, 16) if text.lower().startswith("0x") else int(text, 10)
        except ValueError:
            raise InvalidArgument(f"invalid chunk size {text!r}", field="chunk-size") from None
    if value < MIN_CHUNK_SIZE or value > MAX_CHUNK_SIZE or value & (value - 1):
        raise InvalidArgument(f"invalid chunk size {value:#x}: must be a power of two between "
                              f"{MIN_CHUNK_SIZE:#x} and {MAX_CHUNK_SIZE:#x}", field="chunk-size")
    return value


def parse_prefetch_patterns(lines: Iterable[str]) -> tuple[str, ...]:
    """Upstream's prefetch list rules: one absolute path per line, others skipped; trailing slashes
    dropped; a path already covered by another listed directory is dropped. Sorted, deduplicated."""
    paths: set[str] = set()
    for raw in lines:
        line = raw.strip()
        if not line.startswith("/"):
            continue
        line = os.path.normpath(line)
        if line.startswith("//"):
            line = "/" + line.lstrip("/")
        paths.add(line)
    kept: list[str] = []
    for p in sorted(paths):
        if any(p == k or k == "/" or p.startswith(k + "/") for k in kept):
            continue
        kept.append(p)
    return tuple(kept)


class BuildOptions(BaseModel):
    """What to build and where to put it. Output paths are optional for library callers that only
    want a blob stream (``blob_path`` may name a FIFO)."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    source_type: SourceType = SourceType.DIRECTORY
    fs_version: Literal[5, 6] = 6
    compressor: Compressor = Compressor.ZSTD
    digester: DigestAlgorithm = DigestAlgorithm.BLAKE3
    chunk_size: int = DEFAULT_CHUNK_SIZE
    whiteout_spec: WhiteoutSpec = WhiteoutSpec.OCI
    #: False with ``--repeatable``: uid/gid are written as 0 and EXPLICIT_UID_GID stays clear
    explicit_uidgid: bool = True
    #: v5 only: 4 KiB-aligned uncompressed chunk offsets (v6 always aligns)
    aligned_chunk: bool = False
    blob_inline_meta: bool = False
    blob_toc: bool = False
    blob_id: str | None = None
    #: name the data blob by the SHA-256 of the whole file even with ``blob_toc`` (whose spec
    #: §4.1 id leaves the blob.digest payload out): the id nydusify gives a layer blob, its
    #: registry digest. Upstream's converter gets the same ids through --blob-inline-meta + merge.
    blob_id_from_file: bool = False
    prefetch_patterns: tuple[str, ...] = ()
    parent_bootstrap: str | None = None
    chunk_dict: str | None = None
    bootstrap_path: str | None = None
    blob_path: str | None = None
    blob_dir: str | None = None
    #: hashing/compression threads; 0 = one per CPU
    workers: int = 0

    @field_validator("chunk_size")
    @classmethod
    def _chunk_size(cls, v: int) -> int:
        return parse_chunk_size(v)

    @field_validator("blob_id")
    @classmethod
    def _blob_id(cls, v: str | None) -> str | None:
        if v is not None and (not v or len(v) > MAX_BLOB_ID_LEN or "/" in v):
            raise InvalidArgument(f"invalid blob id {v!r}: 1..255 characters, no '/'", field="blob-id")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> BuildOptions:
        if self.blob_toc and self.fs_version != 6:
            raise InvalidArgument("feature blob-toc requires RAFS v6", field="features")
        if self.blob_inline_meta and self.bootstrap_path:
            raise InvalidArgument("--blob-inline-meta conflicts with --bootstrap", field="bootstrap")
        if self.blob_inline_meta and self.blob_id:
            raise InvalidArgument("--blob-inline-meta conflicts with --blob-id", field="blob-id")
        if self.compressor is Compressor.GZIP:
            raise InvalidArgument("gzip chunks are only produced by *-ref conversions", field="compressor")
        return self

    @property
    def aligned(self) -> bool:
        """Whether uncompressed chunk offsets advance in 4 KiB steps (v6 always)."""
        return self.fs_version == 6 or self.aligned_chunk

    @property
    def worker_count(self) -> int:
        return self.workers or max(1, os.cpu_count() or 1)
