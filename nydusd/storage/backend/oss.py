"""The ``oss`` backend: blobs are objects ``<object_prefix><blob_id>`` in an Aliyun OSS bucket.

Owns: ``OssBackend``, the only importer of ``oss2``. Requests are signed by oss2 (OSS v1 HMAC-SHA1
with ``access_key_id``/``access_key_secret``; anonymous without keys). Ranged GETs ask for
``x-oss-range-behavior: standard`` so that OSS answers a range past the end with 416 instead of
silently sending the whole object. With a Dragonfly ``proxy``, a second ``oss2.Bucket`` shares the
connection pool but routes through the proxy; ``DragonflyProxy.call`` picks one per request.

Uploads (``put_blob``, what nydusify pushes layer blobs with) go straight to OSS: one signed PUT up
to ``MULTIPART_THRESHOLD`` bytes, above it an oss2 multipart upload (init, one ``upload_part`` per
``PART_SIZE`` window streamed from the file through ``oss2.utils.SizedFileAdapter`` with its
``Content-MD5``, complete), each step under the backend's retry policy; any failure aborts the
upload so that no parts stay behind. Upstream nydusify uses 200 MiB parts.

Must not import ``requests`` directly (oss2 uses it internally), cache, rafs or fs.

Threading: ``oss2.Bucket`` objects are thread-safe for concurrent requests; nothing else is shared.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from typing import IO, Any, ClassVar, TypeVar

import oss2
from oss2 import exceptions as oss_exc
from oss2.models import PartInfo
from oss2.utils import SizedFileAdapter

from nydusd.config import OssConfig
from nydusd.errors import AuthError, BackendError, BlobNotFound, ConfigError, NydusError
from nydusd.log import get_logger
from nydusd.storage.backend.base import BlobBackend, RetryPolicy
from nydusd.storage.backend.proxy import DragonflyProxy, proxy_from_config

T = TypeVar("T")
log = get_logger(__name__)
POOL_SIZE = 32
#: blobs larger than this are uploaded in parts (one OSS PUT is capped at 5 GiB)
MULTIPART_THRESHOLD = 200 << 20
#: bytes per uploaded part (upstream nydusify's 200 MiB); grown to stay within MAX_PARTS
PART_SIZE = 200 << 20
#: OSS's smallest part (all but the last) and most parts per upload
MIN_PART_SIZE = 100 << 10
MAX_PARTS = 10000
#: read granularity when hashing a part
HASH_CHUNK = 1 << 20


def part_size_for(total: int) -> int:
    """The part size for a blob of ``total`` bytes (``PART_SIZE``, more beyond ``MAX_PARTS``)."""
    return max(PART_SIZE, MIN_PART_SIZE, -(-total // MAX_PARTS))


def _part_md5(file: IO[bytes], offset: int, length: int) -> str:
    """base64 MD5 of ``length`` bytes at ``offset`` (the part's ``Content-MD5``), read in chunks."""
    digest = hashlib.md5()
    file.seek(offset)
    left = length
    while left:
        chunk = file.read(min(HASH_CHUNK, left))
        if not chunk:
            raise BackendError("blob file shrank while being uploaded", transient=False, offset=offset)
        digest.update(chunk)
        left -= len(chunk)
    return base64.b64encode(digest.digest()).decode()


def _is_proxy_failure(exc: BaseException) -> bool:
    # oss2 reports transport failures (refused, reset, timeout, cut body) as RequestError / OSError.
    return isinstance(exc, (oss_exc.RequestError, OSError))


def _release(result: Any) -> None:
    """Read the rest of an oss2 answer and give its connection back to the pool."""
    result.resp.read()
    result.resp.response.close()


class OssBackend(BlobBackend):
    """Read blobs from OSS with signed ranged GETs."""

    type: ClassVar[str] = "oss"

    def __init__(self, cfg: OssConfig, retry: RetryPolicy | None = None) -> None:
        if not cfg.endpoint:
            raise ConfigError("oss backend needs `endpoint`", field="backend.oss.endpoint")
        if not cfg.bucket_name:
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

    def multipart_threshold(self) -> int | None:
        return MULTIPART_THRESHOLD

    def _oss(self, op: str, key: str, call: Callable[[], T]) -> T:
        """One oss2 call, its failures mapped to backend errors."""
        try:
            return call()
        except (oss_exc.OssError, OSError) as exc:
            raise self._error(exc, op, key) from exc

    def put_multipart(self, blob_id: str, path: str, total: int) -> None:
        """Multipart upload, aborted on any failure so no parts are left behind."""
        key = self._key(blob_id)
        part = part_size_for(total)
        upload_id: str = self._with_retry(
            lambda: self._oss("init multipart upload", key,
                              lambda: self.bucket.init_multipart_upload(key).upload_id),
            blob_id=blob_id, op="create_multipart_upload", prefetch=False)
        try:
            parts: list[PartInfo] = []
            with open(path, "rb") as file:
                for offset in range(0, total, part):
                    length = min(part, total - offset)
                    etag = self._upload_part(blob_id, key, upload_id, len(parts) + 1, file, offset, length)
                    parts.append(PartInfo(len(parts) + 1, etag, size=length))
            self._with_retry(lambda: self._try_complete(key, upload_id, parts, total),
                             blob_id=blob_id, op="complete_multipart_upload", prefetch=False)
        except (NydusError, OSError) as exc:
            self._abort(blob_id, key, upload_id, cause=str(exc))
            if isinstance(exc, OSError):
                raise BackendError(f"oss multipart upload of {path} failed: {exc}", transient=False,
                                   blob_id=blob_id) from exc
            raise
        except BaseException as exc:  # interrupted: still leave no parts behind
            self._abort(blob_id, key, upload_id, cause=repr(exc))
            raise
        log.debug("oss_multipart_upload_completed", blob_id=blob_id, size=total, parts=len(parts))

    def _upload_part(self, blob_id: str, key: str, upload_id: str, number: int, file: IO[bytes],
                     offset: int, length: int) -> str:
        md5 = _part_md5(file, offset, length)

        def attempt() -> str:
            file.seek(offset)
            result = self._oss(f"upload part {number}", key, lambda: self.bucket.upload_part(
                key, upload_id, number, SizedFileAdapter(file, length), headers={"Content-MD5": md5}))
            _release(result)
            if not result.etag:
                raise BackendError(f"oss upload part {number}: answer without ETag", transient=True)
            return str(result.etag)

        return self._with_retry(attempt, blob_id=blob_id, op="upload_part", prefetch=False,
                                offset=offset, size=length)

    def _try_complete(self, key: str, upload_id: str, parts: list[PartInfo], total: int) -> None:
        try:
            _release(self.bucket.complete_multipart_upload(key, upload_id, parts))
        except oss_exc.NoSuchUpload as exc:
            # an earlier attempt completed it and its answer was lost?
            if int(self._oss("HEAD", key, lambda: self.bucket.head_object(key)).content_length) == total:
                return
            raise self._error(exc, "complete multipart upload", key) from exc
        except (oss_exc.OssError, OSError) as exc:
            raise self._error(exc, "complete multipart upload", key) from exc

    def _abort(self, blob_id: str, key: str, upload_id: str, cause: str) -> None:
        def attempt() -> None:
            self._oss("abort multipart upload", key,
                      lambda: self.bucket.abort_multipart_upload(key, upload_id))

        try:
            self._with_retry(attempt, blob_id=blob_id, op="abort_multipart_upload", prefetch=False)
        except NydusError as exc:
            log.warning("oss_multipart_abort_failed", blob_id=blob_id, upload_id=upload_id,
                        cause=str(exc), upload_error=cause)
            return
        log.info("oss_multipart_upload_aborted", blob_id=blob_id, upload_id=upload_id, cause=cause)

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
