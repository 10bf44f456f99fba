"""The ``s3`` backend: blobs are objects ``<object_prefix><blob_id>`` in an S3 bucket.

Owns: ``S3Backend``. Requests are signed with botocore's SigV4 signer (``S3SigV4Auth`` over an
``AWSRequest``; anonymous when no keys are configured) and sent through the project's HTTP layer
(``nydusd.http.HttpClient``: pooled connections, timeouts, Dragonfly proxy routing).
Path-style URLs ``<scheme>://<endpoint>/<bucket>/<key>``; an empty ``endpoint`` means AWS's
``s3.<region>.amazonaws.com``.

Uploads (``put_blob``, what nydusify pushes layer blobs with): a blob up to ``MULTIPART_THRESHOLD``
goes up in one signed PUT; a larger one as a multipart upload (CreateMultipartUpload, one
UploadPart per ``PART_SIZE`` window streamed from the file with its ``Content-MD5``, then
CompleteMultipartUpload), each step under the backend's retry policy; any failure aborts the
upload so that no orphaned parts stay billed. S3 caps one PUT at 5 GiB and 10000 parts per upload.

Must not import ``requests`` (HTTP lives in nydusd/http.py), cache, rafs or fs.

Threading: thread-safe; signing is per request on fresh objects, the HTTP client pools.
"""

from __future__ import annotations

import base64
import hashlib
import io
import xml.etree.ElementTree as ET
from typing import IO, Any, ClassVar
from urllib.parse import quote
from xml.sax.saxutils import escape

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from nydusd.config import S3Config
from nydusd.errors import BackendError, BlobNotFound, ConfigError, NydusError
from nydusd.http import HttpClient, Response, status_error
from nydusd.log import get_logger
from nydusd.storage.backend.base import BlobBackend, RetryPolicy
from nydusd.storage.backend.proxy import DragonflyProxy, proxy_from_config

log = get_logger(__name__)

#: blobs larger than this are uploaded in parts (one S3 PUT is capped at 5 GiB)
MULTIPART_THRESHOLD = 64 << 20
#: bytes per uploaded part; grown for huge blobs to stay within MAX_PARTS
PART_SIZE = 64 << 20
#: S3's smallest part (all but the last) and most parts per upload
MIN_PART_SIZE = 5 << 20
MAX_PARTS = 10000
#: read granularity when hashing a part
HASH_CHUNK = 1 << 20


def part_size_for(total: int) -> int:
    """The part size for a blob of ``total`` bytes: ``PART_SIZE`` (at least ``MIN_PART_SIZE``),
    larger when the blob would need more than ``MAX_PARTS`` parts."""
    return max(PART_SIZE, MIN_PART_SIZE, -(-total // MAX_PARTS))


class FilePart:
    """The window ``[offset, offset+length)`` of an open binary file, read like a file (in the
    caller's chunk sizes, never all at once): ``read``, ``seek``, ``tell``, ``len()``. Used as a
    request body; positions are relative to the window. Not thread-safe (shares the file)."""

    def __init__(self, file: IO[bytes], offset: int, length: int) -> None:
        self.file = file
        self.offset = offset
        self.length = length
        self._pos = 0

    def __len__(self) -> int:
        return self.length

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self.length}[whence]
        self._pos = max(0, min(self.length, base + pos))
        return self._pos

    def read(self, n: int | None = -1) -> bytes:
        left = self.length - self._pos
        if n is None or n < 0 or n > left:
            n = left
        if n <= 0:
            return b""
        self.file.seek(self.offset + self._pos)
        data = self.file.read(n)
        if len(data) != n:
            raise BackendError("blob file shrank while being uploaded", transient=False,
                               offset=self.offset + self._pos, size=n, got=len(data))
        self._pos += n
        return data

    def md5_b64(self) -> str:
        """base64 MD5 of the window (the ``Content-MD5`` header), read in chunks; rewinds."""
        digest = hashlib.md5()
        self.seek(0)
        for chunk in iter(lambda: self.read(HASH_CHUNK), b""):
            digest.update(chunk)
        self.seek(0)
        return base64.b64encode(digest.digest()).decode()


def _xml_text(body: bytes, tag: str) -> str | None:
    """Text of the first element named ``tag`` (any namespace) in an XML body, None if absent."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return None
    for el in root.iter():
        if el.tag == tag or el.tag.endswith("}" + tag):
            return el.text or ""
    return None


def _content_range_total(value: str | None) -> int | None:
    if value and "/" in value:
        total = value.rsplit("/", 1)[1]
        if total.isdigit():
            return int(total)
    return None


class S3Backend(BlobBackend):
    """Read blobs from S3 (or an S3-compatible server) with signed ranged GETs."""

    type: ClassVar[str] = "s3"

    def __init__(self, cfg: S3Config, retry: RetryPolicy | None = None) -> None:
        if not cfg.bucket_name:
            raise ConfigError("s3 backend needs `bucket_name`", field="backend.s3.bucket_name")
        if not cfg.region:
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
            headers = self._signed_body("PUT", url, {"Content-Type": "application/octet-stream"}, body)
            resp = self.http.request("PUT", url, headers=headers, data=body, use_proxy=False)
        if resp.status not in (200, 201, 204):
            raise self._error(resp, "PUT", blob_id)
        with self._sizes_lock:
            self._sizes.pop(blob_id, None)

    def multipart_threshold(self) -> int | None:
        return MULTIPART_THRESHOLD

    def _signed_body(self, method: str, url: str, headers: dict[str, str], body: Any) -> dict[str, str]:
        """Headers signed over a seekable body (its SHA-256 is read in chunks; body rewound)."""
        if self.credentials is None:
            return headers
        req = AWSRequest(method=method, url=url, headers=headers, data=body)
        S3SigV4Auth(self.credentials, "s3", self.region).add_auth(req)
        body.seek(0)
        return dict(req.headers.items())

    def _call(self, method: str, blob_id: str, query: str, ok: tuple[int, ...], op: str,
              headers: dict[str, str] | None = None, body: Any = None) -> Response:
        """One signed request on the object's URL with ``query``; raises unless status in ``ok``."""
        url = f"{self.object_url(blob_id)}?{query}"
        hdrs = dict(headers or {})
        signed = self._signed_body(method, url, hdrs, body) if body is not None \
            else self._signed(method, url, hdrs)
        resp = self.http.request(method, url, headers=signed, data=body, use_proxy=False)
        if resp.status not in ok:
            raise self._error(resp, op, blob_id)
        return resp

    def put_multipart(self, blob_id: str, path: str, total: int) -> None:
        """Multipart upload, aborted on any failure so no parts are left behind."""
        part = part_size_for(total)
        upload_id = self._with_retry(lambda: self._try_create_upload(blob_id), blob_id=blob_id,
                                     op="create_multipart_upload", prefetch=False)
        try:
            etags: list[str] = []
            with open(path, "rb") as file:
                for offset in range(0, total, part):
                    window = FilePart(file, offset, min(part, total - offset))
                    etags.append(self._upload_part(blob_id, upload_id, len(etags) + 1, window))
            self._with_retry(lambda: self._try_complete(blob_id, upload_id, etags, total),
                             blob_id=blob_id, op="complete_multipart_upload", prefetch=False)
        except (NydusError, OSError) as exc:
            self._abort(blob_id, upload_id, cause=str(exc))
            if isinstance(exc, OSError):
                raise BackendError(f"s3 multipart upload of {path} failed: {exc}", transient=False,
                                   blob_id=blob_id) from exc
            raise
        except BaseException as exc:  # interrupted: still leave no parts behind
            self._abort(blob_id, upload_id, cause=repr(exc))
            raise
        log.debug("s3_multipart_upload_completed", blob_id=blob_id, size=total, parts=len(etags))

    def _upload_part(self, blob_id: str, upload_id: str, number: int, window: FilePart) -> str:
        query = f"partNumber={number}&uploadId={quote(upload_id, safe='')}"
        md5 = window.md5_b64()

        def attempt() -> str:
            window.seek(0)
            resp = self._call("PUT", blob_id, query, (200,), f"upload part {number}",
                              {"Content-MD5": md5}, window)
            etag = resp.headers.get("ETag")
            if not etag:
                raise BackendError(f"s3 upload part {number}: answer without ETag", transient=True)
            return etag

        return self._with_retry(attempt, blob_id=blob_id, op="upload_part", prefetch=False,
                                offset=window.offset, size=window.length)

    def _try_create_upload(self, blob_id: str) -> str:
        resp = self._call("POST", blob_id, "uploads", (200,), "create multipart upload",
                          {"Content-Type": "application/octet-stream"})
        upload_id = _xml_text(resp.content, "UploadId")
        if not upload_id:
            raise BackendError("s3 create multipart upload: answer without UploadId", transient=True)
        return upload_id

    def _try_complete(self, blob_id: str, upload_id: str, etags: list[str], total: int) -> None:
        parts = "".join(f"<Part><PartNumber>{n}</PartNumber><ETag>{escape(etag)}</ETag></Part>"
                        for n, etag in enumerate(etags, 1))
        body = f"<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>".encode()
        query = f"uploadId={quote(upload_id, safe='')}"
        try:
            resp = self._call("POST", blob_id, query, (200,), "complete multipart upload",
                              {"Content-Type": "application/xml"}, io.BytesIO(body))
        except BlobNotFound:
            # NoSuchUpload: an earlier attempt completed it and its answer was lost?
            if self.try_blob_size(blob_id) == total:
                return
            raise
        code = _xml_text(resp.content, "Code")
        if code is not None:  # S3 may report a failed completion inside a 200 answer
            raise BackendError(f"s3 complete multipart upload: {code}", transient=code == "InternalError",
                               blob_id=blob_id)

    def _abort(self, blob_id: str, upload_id: str, cause: str) -> None:
        query = f"uploadId={quote(upload_id, safe='')}"

        def attempt() -> Response:
            return self._call("DELETE", blob_id, query, (200, 204), "abort multipart upload")

        try:
            self._with_retry(attempt, blob_id=blob_id, op="abort_multipart_upload", prefetch=False)
        except NydusError as exc:
            log.warning("s3_multipart_abort_failed", blob_id=blob_id, upload_id=upload_id,
                        cause=str(exc), upload_error=cause)
            return
        log.info("s3_multipart_upload_aborted", blob_id=blob_id, upload_id=upload_id, cause=cause)

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
