"""The ``registry`` backend: blobs of one repository of an OCI distribution registry.

Owns: ``RegistryBackend``, an adapter from ``nydusd.oci.client.RegistryClient`` (ranged GET, HEAD,
auth, redirects) to ``BlobBackend``; blob ``<id>`` is ``sha256:<id>`` in ``<host>/<repo>``.
Optional Dragonfly proxy (``proxy.url``) per ``proxy.py``. ``IMAGE_PULL_AUTH`` is applied by the
config layer before the backend is built; ``set_credentials`` replaces ``auth`` at run time.

Must not import ``requests`` (the client owns HTTP), cache, rafs or fs.

Threading: thread-safe; the client pools connections and guards its auth state.
"""

from __future__ import annotations

from typing import ClassVar

from nydusd.config import RegistryConfig
from nydusd.errors import BackendError, ConfigError
from nydusd.oci.client import RegistryClient
from nydusd.storage.backend.base import BlobBackend, RangeStream, RetryPolicy
from nydusd.storage.backend.proxy import DragonflyProxy, proxy_from_config


def blob_digest(blob_id: str) -> str:
    """Blob ids carry no algorithm prefix; registries address blobs as ``sha256:<hex>``."""
    return blob_id if ":" in blob_id else f"sha256:{blob_id}"


class RegistryBackend(BlobBackend):
    """Read blobs from a registry with ranged GETs."""

    type: ClassVar[str] = "registry"

    def __init__(self, cfg: RegistryConfig, retry: RetryPolicy | None = None) -> None:
        if not cfg.host:
            raise ConfigError("registry backend needs `host`", field="backend.registry.host")
        if not cfg.repo:
            raise ConfigError("registry backend needs `repo`", field="backend.registry.repo")
        super().__init__(retry or RetryPolicy.from_config(cfg))
        self.proxy: DragonflyProxy | None = proxy_from_config(cfg)
        self.client = RegistryClient(
            cfg.host, cfg.repo, scheme=cfg.scheme, auth=cfg.auth, registry_token=cfg.registry_token,
            skip_verify=cfg.skip_verify, ca_cert_files=cfg.ca_cert_files, timeout=cfg.timeout,
            connect_timeout=cfg.connect_timeout, blob_url_scheme=cfg.blob_url_scheme,
            blob_redirected_host=cfg.blob_redirected_host, proxy=self.proxy)

    def try_blob_size(self, blob_id: str) -> int:
        return self.client.head_blob(blob_digest(blob_id))

    def try_read(self, blob_id: str, offset: int, size: int, *, prefetch: bool = False) -> bytes:
        return self.client.get_blob(blob_digest(blob_id), offset, size, prefetch=prefetch)

    streams_ranges: ClassVar[bool] = True

    def try_open_range(self, blob_id: str, offset: int, size: int, *,
                       prefetch: bool = False) -> RangeStream | None:
        return self.client.open_blob(blob_digest(blob_id), offset, size, prefetch=prefetch)

    def is_transient(self, exc: BaseException) -> bool:
        return isinstance(exc, BackendError) and exc.transient

    def set_credentials(self, auth: str | None) -> None:
        """Replace the registry credentials (base64 ``user:pass``) at run time."""
        self.client.set_credentials(auth)

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
        self.client.close()
        super().close()
