"""An Aliyun-OSS-protocol test server (no real OSS server exists for Linux).

Strict on what the backend relies on:
- every request must carry ``Authorization: OSS <AccessKeyId>:<Signature>`` with the OSS v1
  signature: base64(HMAC-SHA1(secret, VERB\\nContent-MD5\\nContent-Type\\nDate\\n
  CanonicalizedOSSHeaders CanonicalizedResource)); a wrong key or signature gets 403
  ``SignatureDoesNotMatch`` / ``InvalidAccessKeyId``, a Date more than 15 minutes off 403
  ``RequestTimeTooSkewed``;
- path-style addressing ``/<bucket>/<key>`` (what oss2 uses for an IP endpoint);
- PUT bucket, PUT/GET/HEAD/DELETE object; ``Content-MD5`` checked on PUT;
- ranged GET: ``bytes=a-b``, ``bytes=a-``, ``bytes=-n``; 206 with ``Content-Range``; a range
  starting past the end is 416 under ``x-oss-range-behavior: standard`` and ignored (200, whole
  object) otherwise, as OSS does; a malformed Range header is ignored (200);
- multipart uploads: InitiateMultipartUpload ``POST ?uploads``, UploadPart
  ``PUT ?partNumber=&uploadId=`` (1..10000, ``Content-MD5`` checked), CompleteMultipartUpload
  ``POST ?uploadId=`` with the XML part list (at least one part, ascending part numbers, each ETag
  equal to the uploaded part's, every part but the last at least 100 KiB: else InvalidPart /
  InvalidPartOrder / EntityTooSmall), AbortMultipartUpload ``DELETE ?uploadId=``; an unknown
  upload (or one of another key) is 404 NoSuchUpload. ``uploads`` holds the pending uploads;
  ``fail_parts`` makes UploadPart of those part numbers answer 500 InternalError;
- errors are OSS XML bodies with ``x-oss-request-id``.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import itertools
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlsplit

from tests.harness.servers.base import QuietHandler, ThreadedServer

SUBRESOURCES = {"acl", "uploads", "location", "cors", "logging", "website", "referer", "lifecycle",
                "delete", "append", "tagging", "objectMeta", "uploadId", "partNumber", "security-token",
                "position", "symlink", "restore", "versionId", "versioning", "stat"}

#: OSS's smallest part, except the last one
MIN_PART = 100 << 10
MAX_PART_NUMBER = 10000


@dataclass
class Upload:
    """A pending multipart upload: its object and the parts received (number -> bytes)."""

    bucket: str
    key: str
    parts: dict[int, bytes] = field(default_factory=dict)


def _etag(data: bytes) -> str:
    return hashlib.md5(data).hexdigest().upper()


def _error_xml(code: str, message: str, request_id: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}'
            f'</Message><RequestId>{request_id}</RequestId><HostId>127.0.0.1</HostId></Error>').encode()


class _OssHandler(QuietHandler):
    @property
    def oss(self) -> OssServer:
        return self.server.owner  # type: ignore[attr-defined, no-any-return]

    # --------------------------------------------------------------- dispatch
    def do_PUT(self) -> None:  # noqa: N802
        self._handle("PUT")

    def do_GET(self) -> None:  # noqa: N802
        self._handle("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle("HEAD")

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle("DELETE")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def _handle(self, method: str) -> None:
        self.request_id = uuid.uuid4().hex.upper()
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if method in ("PUT", "POST") \
            else b""
        parts = urlsplit(self.path)
        params = dict(parse_qsl(parts.query, keep_blank_values=True))
        bucket, _, key = unquote(parts.path).lstrip("/").partition("/")
        self.oss.record(method, bucket, key, dict(self.headers.items()))
        denied = self._check_auth(method, bucket, key, params)
        if denied:
            self._error(403, *denied, head=method == "HEAD")
            return
        if not key:
            self._bucket_op(method, bucket)
            return
        if "uploads" in params or "uploadId" in params or method == "POST":
            self._multipart_op(method, bucket, key, params, body)
            return
        self._object_op(method, bucket, key, body)

    def _error(self, status: int, code: str, message: str, head: bool = False) -> None:
        self.send_body(status, _error_xml(code, message, self.request_id),
                       {"Content-Type": "application/xml", "x-oss-request-id": self.request_id}, head=head)

    # --------------------------------------------------------------- signature
    def _check_auth(self, method: str, bucket: str, key: str, params: dict[str, str]) \
            -> tuple[str, str] | None:
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("OSS ") or ":" not in auth:
            return ("AccessDenied", "anonymous access is forbidden")
        access_key, _, signature = auth[4:].partition(":")
        if access_key != self.oss.access_key_id:
            return ("InvalidAccessKeyId", "The OSS Access Key Id you provided does not exist")
        date = self.headers.get("x-oss-date") or self.headers.get("Date") or ""
        try:
            ts = email.utils.parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            return ("AccessDenied", "missing or invalid Date header")
        if abs(ts - time.time()) > 900:
            return ("RequestTimeTooSkewed", "The difference between the request time and now is too large")
        oss_headers = sorted((k.lower(), v) for k, v in self.headers.items()
                             if k.lower().startswith("x-oss-"))
        canon_headers = "".join(f"{k}:{v}\n" for k, v in oss_headers)
        sub = sorted((k, v) for k, v in params.items() if k in SUBRESOURCES)
        sub_str = ("?" + "&".join(f"{k}={v}" if v else k for k, v in sub)) if sub else ""
        resource = f"/{bucket}/{key}{sub_str}" if bucket else f"/{sub_str}"
        to_sign = "\n".join([method, self.headers.get("Content-MD5", ""),
                             self.headers.get("Content-Type", ""), date, canon_headers + resource])
        expected = base64.b64encode(hmac.new(self.oss.secret.encode(), to_sign.encode(),
                                             hashlib.sha1).digest()).decode()
        if not hmac.compare_digest(expected, signature):
            self.oss.bad_signatures += 1
            return ("SignatureDoesNotMatch", "The request signature we calculated does not match")
        return None

    # --------------------------------------------------------------- operations
    def _bucket_op(self, method: str, bucket: str) -> None:
        if method == "PUT":
            self.oss.buckets.setdefault(bucket, {})
            self.send_body(200, b"", {"x-oss-request-id": self.request_id})
            return
        self._error(405, "MethodNotAllowed", "bucket operation not supported", head=method == "HEAD")

    def _object_op(self, method: str, bucket: str, key: str, body: bytes) -> None:
        objects = self.oss.buckets.get(bucket)
        head = method == "HEAD"
        if objects is None:
            self._error(404, "NoSuchBucket", "The specified bucket does not exist", head=head)
            return
        if method == "PUT":
            md5 = self.headers.get("Content-MD5")
            if md5 and base64.b64encode(hashlib.md5(body).digest()).decode() != md5:
                self._error(400, "InvalidDigest", "Content-MD5 mismatch")
                return
            objects[key] = body
            self.send_body(200, b"", {"ETag": f'"{hashlib.md5(body).hexdigest().upper()}"',
                                      "x-oss-request-id": self.request_id})
            return
        data = objects.get(key)
        if data is None:
            self._error(404, "NoSuchKey", "The specified key does not exist.", head=head)
            return
        if method == "DELETE":
            del objects[key]
            self.send_body(204, b"", {"x-oss-request-id": self.request_id})
            return
        self._serve(data, head)

    # --------------------------------------------------------------- multipart
    def _ok(self, status: int, body: bytes = b"", etag: str | None = None) -> None:
        headers = {"x-oss-request-id": self.request_id}
        if body:
            headers["Content-Type"] = "application/xml"
        if etag:
            headers["ETag"] = f'"{etag}"'
        self.send_body(status, body, headers)

    def _multipart_op(self, method: str, bucket: str, key: str, params: dict[str, str],
                      body: bytes) -> None:
        if bucket not in self.oss.buckets:
            self._error(404, "NoSuchBucket", "The specified bucket does not exist")
            return
        if method == "POST" and "uploads" in params:
            upload_id = uuid.uuid4().hex.upper()
            with self.oss._lock:
                self.oss.uploads[upload_id] = Upload(bucket, key)
            self._ok(200, (f'<?xml version="1.0" encoding="UTF-8"?>\n<InitiateMultipartUploadResult>'
                           f"<Bucket>{bucket}</Bucket><Key>{key}</Key><UploadId>{upload_id}</UploadId>"
                           f"</InitiateMultipartUploadResult>").encode())
            return
        upload = self.oss.uploads.get(params.get("uploadId", ""))
        if upload is None or (upload.bucket, upload.key) != (bucket, key):
            self._error(404, "NoSuchUpload", "The specified upload does not exist.")
            return
        if method == "PUT":
            self._upload_part(upload, params.get("partNumber", ""), body)
        elif method == "POST":
            self._complete(params["uploadId"], upload, body)
        elif method == "DELETE":
            with self.oss._lock:
                self.oss.uploads.pop(params["uploadId"], None)
            self._ok(204)
        else:
            self._error(405, "MethodNotAllowed", "not a multipart operation", head=method == "HEAD")

    def _upload_part(self, upload: Upload, number_text: str, body: bytes) -> None:
        if not number_text.isdigit() or not 1 <= int(number_text) <= MAX_PART_NUMBER:
            self._error(400, "InvalidArgument", "Part number must be an integer between 1 and 10000")
            return
        number = int(number_text)
        if number in self.oss.fail_parts:
            self._error(500, "InternalError", "injected part failure")
            return
        md5 = self.headers.get("Content-MD5")
        if md5 and base64.b64encode(hashlib.md5(body).digest()).decode() != md5:
            self._error(400, "InvalidDigest", "Content-MD5 mismatch")
            return
        with self.oss._lock:
            upload.parts[number] = body
        self._ok(200, etag=_etag(body))

    def _complete(self, upload_id: str, upload: Upload, body: bytes) -> None:
        try:
            listed = [(int(p.findtext("PartNumber") or ""), (p.findtext("ETag") or "").strip('"'))
                      for p in ET.fromstring(body).findall("Part")]
        except (ET.ParseError, ValueError):
            self._error(400, "MalformedXML", "The XML you provided was not well-formed")
            return
        problem = _check_parts(listed, upload.parts)
        if problem:
            self._error(400, *problem)
            return
        data = b"".join(upload.parts[n] for n, _ in listed)
        with self.oss._lock:
            self.oss.uploads.pop(upload_id, None)
            self.oss.buckets[upload.bucket][upload.key] = data
        etag = f"{_etag(b''.join(bytes.fromhex(e) for _, e in listed))}-{len(listed)}"
        self._ok(200, (f'<?xml version="1.0" encoding="UTF-8"?>\n<CompleteMultipartUploadResult>'
                       f"<Bucket>{upload.bucket}</Bucket><Key>{upload.key}</Key><ETag>\"{etag}\"</ETag>"
                       f"</CompleteMultipartUploadResult>").encode(), etag=etag)

    def _serve(self, data: bytes, head: bool) -> None:
        headers = {"ETag": f'"{hashlib.md5(data).hexdigest().upper()}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream", "x-oss-request-id": self.request_id,
                   "Last-Modified": email.utils.formatdate(usegmt=True)}
        rng = _parse_range(self.headers.get("Range"), len(data))
        standard = self.headers.get("x-oss-range-behavior", "").lower() == "standard"
        if rng == "unsatisfiable":
            if standard:
                self._error(416, "InvalidRange", "The requested range cannot be satisfied", head=head)
                return
            rng = None
        if rng is None:
            self.send_body(200, data, headers, head=head)
            return
        start, end = rng  # type: ignore[misc]
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        self.send_body(206, data[start:end + 1], headers, head=head)


def _check_parts(listed: list[tuple[int, str]], parts: dict[int, bytes]) -> tuple[str, str] | None:
    """Why a CompleteMultipartUpload part list is refused (code, message), None if it is fine."""
    if not listed:
        return ("MalformedXML", "The part list is empty")
    numbers = [n for n, _ in listed]
    if any(a >= b for a, b in itertools.pairwise(numbers)):
        return ("InvalidPartOrder", "The list of parts was not in ascending order")
    for n, etag in listed:
        if n not in parts or _etag(parts[n]) != etag:
            return ("InvalidPart", f"Part {n} was not uploaded or its ETag does not match")
    if any(len(parts[n]) < MIN_PART for n in numbers[:-1]):
        return ("EntityTooSmall", "A part other than the last is smaller than 100 KiB")
    return None


def _parse_range(value: str | None, total: int) -> tuple[int, int] | str | None:
    """(start, end) inclusive, "unsatisfiable", or None (no / malformed Range: whole object)."""
    if not value or not value.startswith("bytes=") or "," in value:
        return None
    a, sep, b = value[6:].strip().partition("-")
    if not sep or not (a.isdigit() or b.isdigit()) or (a and not a.isdigit()) or (b and not b.isdigit()):
        return None
    if not a:  # suffix range
        n = int(b)
        return None if n == 0 else (max(0, total - n), total - 1)
    start = int(a)
    end = int(b) if b else total - 1
    if end < start:
        return None
    if start >= total:
        return "unsatisfiable"
    return start, min(end, total - 1)


class OssServer(ThreadedServer):
    """OSS protocol server; ``requests`` records (method, bucket, key, headers) of each call."""

    def __init__(self, access_key_id: str = "LTAInydustest", secret: str = "nydus-oss-secret") -> None:
        self.access_key_id = access_key_id
        self.secret = secret
        self.buckets: dict[str, dict[str, bytes]] = {}
        self.requests: list[tuple[str, str, str, dict[str, str]]] = []
        self.uploads: dict[str, Upload] = {}
        self.fail_parts: set[int] = set()
        self.bad_signatures = 0
        self._lock = threading.Lock()
        super().__init__(_OssHandler)

    def record(self, method: str, bucket: str, key: str, headers: dict[str, str]) -> None:
        with self._lock:
            self.requests.append((method, bucket, key, headers))

    def put_object(self, bucket: str, key: str, data: bytes) -> None:
        self.buckets.setdefault(bucket, {})[key] = data

    def backend_config(self, bucket: str, prefix: str = "", **overrides: object) -> dict[str, object]:
        cfg: dict[str, object] = {"scheme": "http", "endpoint": self.netloc, "bucket_name": bucket,
                                  "object_prefix": prefix, "access_key_id": self.access_key_id,
                                  "access_key_secret": self.secret, "retry_limit": 2}
        cfg.update(overrides)
        return cfg
