"""Turning build outputs into pushable artifacts: the bootstrap layer tar, blob.meta extraction and
push retries.

Owns: ``bootstrap_layer_tar`` (interfaces.md §6.3: deterministic gzip tar with ``image/``,
``image/image.boot`` and, for v6, ``image/<blob id>.blob.meta``), ``blob_meta_file`` (the ci array of a
v6 blob, uncompressed and padded to 4 KiB, then its 4096-byte header), ``extract_bootstrap`` and
``with_retry``. Must not import requests or the registry client. Thread-safe: pure functions.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from nydusd.compress import Compressor, decompress
from nydusd.errors import BackendError, IntegrityError, NydusError
from nydusd.log import get_logger
from nydusd.storage.chunk import BlobInfo

log = get_logger(__name__)
T = TypeVar("T")

BLOB_META_HEADER_SIZE = 0x1000
BOOT_MTIME = 0


def _align(n: int, a: int = 4096) -> int:
    return (n + a - 1) // a * a


def blob_meta_file(blob_path: Path, blob: BlobInfo) -> bytes:
    """The ``<blob id>.blob.meta`` content of a v6 blob; ``b""`` when the blob has no ci table.

    Raises IntegrityError when the recorded ci region does not fit the blob file."""
    if blob.ci_compressed_size == 0 and blob.ci_uncompressed_size == 0:
        return b""
    with open(blob_path, "rb") as f:
        f.seek(blob.ci_offset)
        ci = f.read(blob.ci_compressed_size)
        header = f.read(BLOB_META_HEADER_SIZE)
    if len(ci) != blob.ci_compressed_size or len(header) != BLOB_META_HEADER_SIZE:
        raise IntegrityError("blob meta region lies outside the blob", blob_id=blob.blob_id,
                             offset=blob.ci_offset, size=blob.ci_compressed_size)
    if blob.ci_compressor is not Compressor.NONE and blob.ci_compressed_size != blob.ci_uncompressed_size:
        ci = decompress(ci, blob.ci_compressor, blob.ci_uncompressed_size)
    return ci + b"\0" * (_align(len(ci)) - len(ci)) + header


def _tar_info(name: str, *, size: int = 0, mode: int = 0o444,
              kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.type, ti.mtime = size, mode, kind, BOOT_MTIME
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def bootstrap_layer_tar(bootstrap: bytes, blob_metas: Sequence[tuple[str, bytes]]) -> tuple[bytes, str]:
    """``(gzip tar bytes, diff_id)`` of the bootstrap layer. Byte-identical for identical input: tar
    headers carry no time or owner names and the gzip header has mtime 0."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_tar_info("image", mode=0o755, kind=tarfile.DIRTYPE))
        tar.addfile(_tar_info("image/image.boot", size=len(bootstrap)), io.BytesIO(bootstrap))
        for blob_id, meta in blob_metas:
            if meta:
                tar.addfile(_tar_info(f"image/{blob_id}.blob.meta", size=len(meta)), io.BytesIO(meta))
    plain = raw.getvalue()
    diff_id = "sha256:" + hashlib.sha256(plain).hexdigest()
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0, filename="") as gz:
        gz.write(plain)
    return out.getvalue(), diff_id


def extract_bootstrap(layer: bytes) -> bytes:
    """``image/image.boot`` (or legacy ``image.boot``) out of a bootstrap layer (gzip tar).

    Raises IntegrityError when the layer is not a gzip tar or has no bootstrap."""
    try:
        with tarfile.open(fileobj=io.BytesIO(layer), mode="r:*") as tar:
            for name in ("image/image.boot", "image.boot"):
                try:
                    member = tar.getmember(name)
                except KeyError:
                    continue
                f = tar.extractfile(member)
                if f is not None:
                    return f.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise IntegrityError(f"bootstrap layer is not a valid gzip tar: {e}") from None
    raise IntegrityError("bootstrap layer has no image/image.boot")


def with_retry(what: str, fn: Callable[[], T], *, count: int, delay: float) -> T:
    """Call ``fn``; on a transient BackendError retry up to ``count`` more times, ``delay`` s apart."""
    attempt = 0
    while True:
        try:
            return fn()
        except BackendError as e:
            if not e.transient or attempt >= count:
                raise
            attempt += 1
            log.warning("push_retried", what=what, attempt=attempt, error=str(e))
            time.sleep(delay)


def is_transient(exc: NydusError) -> bool:
    return isinstance(exc, BackendError) and exc.transient
