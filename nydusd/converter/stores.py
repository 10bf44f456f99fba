"""Blob stores for ``--backend-type``: where nydus blobs go when they are not pushed to the registry.

Owns: ``BlobStore`` (put / exists / download / the backend config nydusd needs to read the blobs
back) and ``create_store`` (the ``--backend-type`` / ``--backend-config`` JSON, upstream nydusify's
key names). A store is a thin policy layer over the storage backend of the same type
(``nydusd.storage.backend.create_backend``): the localfs, s3 and oss backends already know how to
write (``put_blob``: temp file + rename; botocore SigV4 PUT, multipart above 64 MiB; oss2 PUT,
multipart above 200 MiB) and to check for an
object (``blob_exists``), so nydusify and nydusd share one implementation per protocol -- the objects
the converter writes are exactly the ones nydusd reads (``<object_prefix><blob id>``).

The store adds what is nydusify's own: skip an upload when the object already exists unless
``--backend-force-push``, validation of the backend config through ``nydusd.config`` (error fields
say ``backend.<type>.<key>``), and a streamed, hashed download for ``nydusify check``.

Must not import requests, botocore or oss2: the transports live in ``nydusd.storage.backend``.
Threading: stores are used by the converter's push pool; the backends are thread-safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from nydusd.config import BackendConfig, load_config
from nydusd.errors import ConfigError, IntegrityError
from nydusd.log import get_logger
from nydusd.storage.backend import BlobBackend, create_backend

log = get_logger(__name__)

#: ``--backend-type`` values nydusify accepts
STORE_TYPES = ("localfs", "s3", "oss")
#: bytes per ranged read while downloading a blob for ``check``
DOWNLOAD_PIECE = 4 << 20


class BlobStore:
    """A writable blob backend (``localfs``/``s3``/``oss``) as nydusify uses it."""

    def __init__(self, config: BackendConfig, raw_config: dict[str, Any], *, force: bool = False) -> None:
        self.config = config
        self.type: str = config.type
        self.force = force
        self._raw = dict(raw_config)
        self.backend: BlobBackend = create_backend(config)

    def exists(self, blob_id: str) -> bool:
        """Whether the backend holds ``blob_id``. Raises AuthError, BackendError."""
        return self.backend.blob_exists(blob_id)

    def put(self, blob_id: str, path: Path) -> bool:
        """Store the blob file unless it is already there (always with ``force``). Returns whether
        it was uploaded. Raises AuthError, BackendError (``transient`` set when a retry may help)."""
        if not self.force and self.exists(blob_id):
            log.debug("blob_store_skipped", backend=self.type, blob_id=blob_id)
            return False
        self.backend.put_blob(blob_id, str(path))
        return True

    def download(self, blob_id: str, path: Path) -> str:
        """Copy the whole blob into ``path`` in ranged reads; returns the sha256 hex of its bytes.

        Raises BlobNotFound, AuthError, BackendError; IntegrityError if the blob changes size
        while being read.
        """
        size = self.backend.blob_size(blob_id)
        digest = hashlib.sha256()
        try:
            with open(path, "wb") as out:
                offset = 0
                while offset < size:
                    piece = self.backend.read(blob_id, offset, min(DOWNLOAD_PIECE, size - offset))
                    if not piece:
                        raise IntegrityError("blob ended early", blob_id=blob_id, offset=offset,
                                             blob_size=size)
                    digest.update(piece)
                    out.write(piece)
                    offset += len(piece)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        return digest.hexdigest()

    def backend_config(self) -> dict[str, Any]:
        """The backend section (``--backend-config`` as given) a nydusd config needs to read these
        blobs."""
        return dict(self._raw)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> BlobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse_backend_config(backend_type: str, config_text: str) -> tuple[BackendConfig, dict[str, Any]]:
    """Validate ``--backend-type`` / ``--backend-config`` as the ``backend`` section of a nydusd
    config. Returns the model and the raw JSON object. Raises ConfigError (field
    ``backend-type``, ``backend-config`` or ``backend.<type>.<key>``)."""
    if backend_type not in STORE_TYPES:
        raise ConfigError(f"unknown backend type {backend_type!r}, expected oss, s3 or localfs",
                          field="backend-type")
    try:
        raw = json.loads(config_text or "{}")
    except ValueError as e:
        raise ConfigError(f"backend config is not JSON: {e}", field="backend-config") from None
    if not isinstance(raw, dict):
        raise ConfigError("backend config must be a JSON object", field="backend-config")
    if backend_type == "s3":
        # As upstream nydusify: no endpoint means AWS itself (the s3 backend derives the regional
        # endpoint from ``region``).
        raw.setdefault("endpoint", "")
    document = {"version": 2, "backend": {"type": backend_type, backend_type: raw}}
    try:
        cfg = load_config(json.dumps(document)).backend
    except ConfigError as e:
        raise ConfigError(f"invalid {backend_type} backend config: {e.message}",
                          field=e.context.get("field", "backend-config")) from None
    assert cfg is not None
    return cfg, raw


def create_store(backend_type: str, config_text: str, *, force: bool = False) -> BlobStore:
    """A blob store from ``--backend-type`` / ``--backend-config`` (JSON, upstream's keys: localfs
    ``dir``; s3 ``bucket_name``, ``region``, ``endpoint``, ``scheme``, ``object_prefix``,
    ``access_key_id``, ``access_key_secret``; oss the same without ``region``). Raises ConfigError
    for bad JSON, a missing key or an unknown type."""
    cfg, raw = parse_backend_config(backend_type, config_text)
    return BlobStore(cfg, raw, force=force)
