"""The ``s3`` backend: blobs are objects ``<object_prefix><blob_id>`` in an S3 bucket.

Owns: ``S3Backend``. Requests are signed with botocore's SigV4 signer (``S3SigV4Auth`` over an
``AWSRequest``; anonymous when no keys are configured) and sent through the project's HTTP layer
(``nydusd.oci.client.HttpClient``: pooled connections, timeouts, Dragonfly proxy routing).
Path-style URLs ``<scheme>://<endpoint>/<bucket>/<key>``; an empty ``endpoint`` means AWS's
``s3.<region>.amazonaws.com``.

Must not import ``requests`` (HTTP lives in oci/client.py), cache, rafs or fs.

Threading: thread-safe; signing is per request on fresh objects, the HTTP client pools.
"""

from __future__ import annotations

from typing import Any, ClassVar
from urllib.parse import quote

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from nydusd.errors import BackendError, BlobNotFound, ConfigError
from nydusd.oci.client import HttpClient
from nydusd.oci.response import Response, status_error
from nydusd.storage.backend.base import BlobBackend, RetryPolicy
from nydusd.storage.backend.proxy import DragonflyProxy, proxy_from_config


def _content_range_total(value: str | None) -> int | None:
    if value and "/" in value:
        total = value.rsplit("/", 1)[1]
        if total.isdigit():
            return int(total)
    return None


class S3Backend(BlobBackend):
    """Read blobs from S3 (or an S3-compatible server) with signed ranged GETs."""

    type: ClassVar[str] = "s3"

    def __init__(self, cfg: Any, retry: RetryPolicy | None = None) -> None:
        if not getattr(cfg, "bucket_name", ""):
            raise ConfigError("s3 backend needs `bucket_name`", field="backend.s3.bucket_name")
        if not getattr(cfg, "region", ""):
            raise ConfigError("s3 backend needs `region`", field="backend.s3.region")
        super().__init__(retry or RetryPolicy.from_config(cfg))
        self.region: str = cfg.region
        self.bucket: str = cfg.bucket_name
        self.prefix: str = cfg.object_prefix or ""
        scheme = "http" if cfg.scheme == "http" else "https"
        endpoint = cfg.endpoint or f"s3.{cfg.region}.amazonaws.com"
        self.base_url = f"{scheme}://{endpoint}"
        self.credentials = (Credentials(cfg.access_key_id, cfg.access_key_secret)
                            if cfg.access_key_id else None)
        self.proxy: DragonflyProxy | None = proxy_from_config(cfg)
        self.http = HttpClient(skip_verify=cfg.skip_verify, ca_cert_files=cfg.ca_cert_files,
                               timeout=cfg.timeout, connect_timeout=cfg.connect_timeout, proxy=self.proxy)

    def object_url(self, blob_id: str) -> str:
        key = self.prefix + blob_id
        return f"{self.base_url}/{quote(self.bucket)}/{quote(key, safe='/~')}"

    def _signed(self, method: str, url: str, headers: dict[str, str]) -> dict[str, str]:
        if self.credentials is None:
            return headers
        req = AWSRequest(method=method, url=url, headers=headers)
        S3SigV4Auth(self.credentials, "s3", self.region).add_auth(req)
        return dict(req.headers.items())

    def _send(self, method: str, blob_id: str, headers: dict[str, str], prefetch: bool = False) -> Response:
        url = self.object_url(blob_id)
        return self.http.request(method, url, headers=self._signed(method, url, headers),
                                 prefetch=prefetch)

    def try_blob_size(self, blob_id: str) -> int:
        resp = self._send("HEAD", blob_id, {})
        if resp.status == 200 and resp.headers.get("Content-Length") is not None:
            return int(resp.headers["Content-Length"])
        raise self._error(resp, "HEAD", blob_id)

    def try_read(self, blob_id: str, offset: int, size: int, *, prefetch: bool = False) -> bytes:
        resp = self._send("GET", blob_id, {"Range": f"bytes={offset}-{offset + size - 1}"}, prefetch)
        if resp.status == 206:
            return resp.content
        if resp.status == 200:
            return resp.content[offset:offset + size]
        if resp.status == 416:
            return b""
        raise self._error(resp, "GET", blob_id)

    def try_put(self, blob_id: str, path: str) -> None:
        """PUT the file as object ``<object_prefix><blob_id>`` (one signed request)."""
        url = self.object_url(blob_id)
        with open(path, "rb") as body:
            headers = {"Content-Type": "application/octet-stream"}
            if self.credentials is not None:
                req = AWSRequest(method="PUT", url=url, headers=headers, data=body)
                S3SigV4Auth(self.credentials, "s3", self.region).add_auth(req)
                headers = dict(req.headers.items())
                body.seek(0)
            resp = self.http.request("PUT", url, headers=headers, data=body, use_proxy=False)
        if resp.status not in (200, 201, 204):
            raise self._error(resp, "PUT", blob_id)
        with self._sizes_lock:
            self._sizes.pop(blob_id, None)

    def _error(self, resp: Response, op: str, blob_id: str) -> BackendError:
        key = self.prefix + blob_id
        if resp.status == 404:
            return BlobNotFound(f"s3 object {self.bucket}/{key} not found", status=404)
        return status_error(resp, f"s3 {op} {self.bucket}/{key}")

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
        self.http.close()
        super().close()
