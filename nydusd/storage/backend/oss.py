"""The ``oss`` backend: blobs are objects ``<object_prefix><blob_id>`` in an Aliyun OSS bucket.

Owns: ``OssBackend``, the only importer of ``oss2``. Requests are signed by oss2 (OSS v1 HMAC-SHA1
with ``access_key_id``/``access_key_secret``; anonymous without keys). Ranged GETs ask for
``x-oss-range-behavior: standard`` so that OSS answers a range past the end with 416 instead of
silently sending the whole object. With a Dragonfly ``proxy``, a second ``oss2.Bucket`` shares the
connection pool but routes through the proxy; ``DragonflyProxy.call`` picks one per request.

Must not import ``requests`` directly (oss2 uses it internally), cache, rafs or fs.

Threading: ``oss2.Bucket`` objects are thread-safe for concurrent requests; nothing else is shared.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import oss2
from oss2 import exceptions as oss_exc

from nydusd.errors import AuthError, BackendError, BlobNotFound, ConfigError
from nydusd.storage.backend.base import BlobBackend, RetryPolicy
from nydusd.storage.backend.proxy import DragonflyProxy, proxy_from_config

T = TypeVar("T")
POOL_SIZE = 32


def _is_proxy_failure(exc: BaseException) -> bool:
    # oss2 reports transport failures (refused, reset, timeout, cut body) as RequestError / OSError.
    return isinstance(exc, (oss_exc.RequestError, OSError))


class OssBackend(BlobBackend):
    """Read blobs from OSS with signed ranged GETs."""

    type: ClassVar[str] = "oss"

    def __init__(self, cfg: Any, retry: RetryPolicy | None = None) -> None:
        if not getattr(cfg, "endpoint", ""):
            raise ConfigError("oss backend needs `endpoint`", field="backend.oss.endpoint")
        if not getattr(cfg, "bucket_name", ""):
            raise ConfigError("oss backend needs `bucket_name`", field="backend.oss.bucket_name")
        super().__init__(retry or RetryPolicy.from_config(cfg))
        self.bucket_name: str = cfg.bucket_name
        self.prefix: str = cfg.object_prefix or ""
        scheme = "http" if cfg.scheme == "http" else "https"
        endpoint = cfg.endpoint if "://" in cfg.endpoint else f"{scheme}://{cfg.endpoint}"
        auth = oss2.Auth(cfg.access_key_id, cfg.access_key_secret) if cfg.access_key_id \
            else oss2.AnonymousAuth()
        self._session = oss2.Session(pool_size=POOL_SIZE)
        inner = self._session.session
        inner.trust_env = False  # proxies come from the config only
        inner.headers["Accept-Encoding"] = "identity"
        if cfg.skip_verify:
            inner.verify = False
        elif cfg.ca_cert_files:
            inner.verify = cfg.ca_cert_files[0]
        timeout = (float(cfg.connect_timeout or 5), float(cfg.timeout or 5))
        self.bucket = oss2.Bucket(auth, endpoint, cfg.bucket_name, session=self._session,
                                  connect_timeout=timeout, enable_crc=False)
        self.proxy: DragonflyProxy | None = proxy_from_config(cfg)
        self._proxied_bucket = None
        if self.proxy is not None:
            purl = self.proxy.url
            proxied_endpoint = self.proxy.rewrite(endpoint)
            self._proxied_bucket = oss2.Bucket(auth, proxied_endpoint, cfg.bucket_name,
                                               session=self._session, connect_timeout=timeout,
                                               enable_crc=False, proxies={"http": purl, "https": purl})

    def _key(self, blob_id: str) -> str:
        return self.prefix + blob_id

    def _call(self, op: Callable[[Any], T]) -> T:
        if self.proxy is None or self._proxied_bucket is None:
            return op(self.bucket)
        proxied = self._proxied_bucket
        return self.proxy.call(lambda: op(proxied), lambda: op(self.bucket),
                               is_proxy_failure=_is_proxy_failure)

    def try_blob_size(self, blob_id: str) -> int:
        key = self._key(blob_id)
        try:
            meta = self._call(lambda b: b.head_object(key))
        except (oss_exc.OssError, OSError) as exc:
            raise self._error(exc, "HEAD", key) from exc
        return int(meta.content_length)

    def try_read(self, blob_id: str, offset: int, size: int, *, prefetch: bool = False) -> bytes:
        key = self._key(blob_id)
        headers = {"x-oss-range-behavior": "standard"}

        def get(bucket: Any) -> bytes:
            hdrs = headers
            if bucket is self._proxied_bucket and self.proxy is not None:
                # X-Dragonfly-* are not x-oss-* headers: they stay outside the signature
                hdrs = {**headers, **self.proxy.headers(prefetch)}
            result = bucket.get_object(key, byte_range=(offset, offset + size - 1), headers=hdrs)
            try:
                data: bytes = result.read()
            finally:
                result.close()
            if result.status == 200:  # range ignored: whole object
                return data[offset:offset + size]
            return data

        try:
            return self._call(get)
        except oss_exc.OssError as exc:
            if exc.status == 416:
                return b""
            raise self._error(exc, "GET", key) from exc
        except OSError as exc:
            raise self._error(exc, "GET", key) from exc

    def try_put(self, blob_id: str, path: str) -> None:
        """Upload the file as object ``<object_prefix><blob_id>`` (signed PUT, straight to OSS)."""
        key = self._key(blob_id)
        try:
            self.bucket.put_object_from_file(key, path)
        except (oss_exc.OssError, OSError) as exc:
            raise self._error(exc, "PUT", key) from exc

    def _error(self, exc: BaseException, op: str, key: str) -> BackendError:
        where = f"oss {op} {self.bucket_name}/{key}"
        if isinstance(exc, oss_exc.OssError):
            status = int(exc.status)
            detail = f"{exc.code or ''} {exc.message or ''}".strip()
            msg = f"{where}: HTTP {status}" + (f": {detail}" if detail else "")
            if status == 404:
                return BlobNotFound(msg, status=status)
            if status in (401, 403):
                return AuthError(msg, status=status)
            if status < 0:  # RequestError: the transport failed
                return BackendError(f"{where}: {exc.body or exc}", transient=True)
            return BackendError(msg, transient=status >= 500 or status in (408, 429), status=status)
        return BackendError(f"{where}: {type(exc).__name__}: {exc}", transient=True)

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
        self._session.session.close()
        super().close()
