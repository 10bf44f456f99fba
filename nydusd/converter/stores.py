"""Blob stores for ``--backend-type``: where nydus blobs go when they are not pushed to the registry.

Owns: ``BlobStore`` (put / exists / get / the backend config nydusd needs to read the blobs back),
``LocalFsStore`` (a directory: temp file + rename), ``S3Store`` (path-style PUT/HEAD/GET signed with
AWS SigV4) and ``OssStore`` (PUT/HEAD/GET signed with the OSS v1 HMAC-SHA1 scheme) -- both signers are
written here because botocore and oss2 have their one home in the read-only storage backends --,
and ``create_store`` (the
``--backend-type`` / ``--backend-config`` JSON, upstream's key names). Objects are named
``<object_prefix><blob id>``, as nydusd's s3/oss backends read them.

Must not import requests, botocore or oss2 (HTTP goes through ``nydusd.oci.client.HttpClient``).
Threading: stores are used by the converter's push pool; each request is independent and the
HTTP client pools connections thread-safely.
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import hashlib
import hmac
import json
import os
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from nydusd.errors import BackendError, BlobNotFound, ConfigError
from nydusd.oci.client import HttpClient
from nydusd.oci.response import Response, status_error


class BlobStore:
    """Where nydus blobs go when not to the registry."""

    type = ""

    def put(self, blob_id: str, path: Path) -> None:
        """Store the blob file unless already there. Raises BackendError / AuthError."""
        raise NotImplementedError

    def exists(self, blob_id: str) -> bool:
        raise NotImplementedError

    def get(self, blob_id: str) -> bytes:
        """The whole blob. Raises BlobNotFound."""
        raise NotImplementedError

    def backend_config(self) -> dict[str, Any]:
        """The backend section a nydusd config needs to read these blobs."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class LocalFsStore(BlobStore):
    type = "localfs"

    def __init__(self, config: dict[str, Any], *, force: bool = False) -> None:
        directory = config.get("dir")
        if not directory:
            raise ConfigError("localfs backend config needs 'dir'", field="backend-config.dir")
        self.dir = Path(str(directory))
        self.force = force

    def exists(self, blob_id: str) -> bool:
        return (self.dir / blob_id).is_file()

    def get(self, blob_id: str) -> bytes:
        try:
            return (self.dir / blob_id).read_bytes()
        except OSError as e:
            raise BlobNotFound(f"cannot read blob: {e.strerror}", blob_id=blob_id,
                               dir=str(self.dir)) from None

    def put(self, blob_id: str, path: Path) -> None:
        if self.exists(blob_id) and not self.force:
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self.dir / f".{blob_id}.tmp{os.getpid()}"
            shutil.copyfile(path, tmp)
            os.replace(tmp, self.dir / blob_id)
        except OSError as e:
            raise BackendError(f"cannot store blob: {e.strerror}", blob_id=blob_id,
                               dir=str(self.dir)) from None

    def backend_config(self) -> dict[str, Any]:
        return {"dir": str(self.dir)}


class _HttpObjectStore(BlobStore):
    """Shared part of S3 and OSS: path-style object URLs, HEAD/GET/PUT through HttpClient."""

    def __init__(self, config: dict[str, Any], *, force: bool = False) -> None:
        self.config = dict(config)
        for key in ("endpoint", "bucket_name"):
            if not config.get(key):
                raise ConfigError(f"{self.type} backend config needs '{key}'", field=f"backend-config.{key}")
        self.bucket = str(config["bucket_name"])
        self.prefix = str(config.get("object_prefix") or "")
        endpoint = str(config["endpoint"])
        scheme = "http" if config.get("scheme") == "http" else "https"
        self.base_url = endpoint if "://" in endpoint else f"{scheme}://{endpoint}"
        self.access_key_id = str(config.get("access_key_id") or "")
        self.secret = str(config.get("access_key_secret") or "")
        self.force = force
        self.http = HttpClient(skip_verify=bool(config.get("skip_verify")), timeout=60, connect_timeout=10)

    def key(self, blob_id: str) -> str:
        return self.prefix + blob_id

    def url(self, blob_id: str) -> str:
        return f"{self.base_url}/{quote(self.bucket)}/{quote(self.key(blob_id), safe='/~')}"

    def _headers(self, method: str, blob_id: str, headers: dict[str, str], body: bytes) -> dict[str, str]:
        raise NotImplementedError

    def _send(self, method: str, blob_id: str, body: bytes = b"",
              headers: dict[str, str] | None = None) -> Response:
        hdrs = self._headers(method, blob_id, dict(headers or {}), body)
        data = body if method == "PUT" else None
        return self.http.request(method, self.url(blob_id), headers=hdrs, data=data)

    def exists(self, blob_id: str) -> bool:
        resp = self._send("HEAD", blob_id)
        if resp.status == 200:
            return True
        if resp.status == 404:
            return False
        raise status_error(resp, f"{self.type} HEAD {self.bucket}/{self.key(blob_id)}")

    def get(self, blob_id: str) -> bytes:
        resp = self._send("GET", blob_id)
        if resp.status == 200:
            return resp.content
        if resp.status == 404:
            raise BlobNotFound(f"{self.type} object {self.bucket}/{self.key(blob_id)} not found")
        raise status_error(resp, f"{self.type} GET {self.bucket}/{self.key(blob_id)}")

    def put(self, blob_id: str, path: Path) -> None:
        if not self.force and self.exists(blob_id):
            return
        body = path.read_bytes()
        resp = self._send("PUT", blob_id, body, {"Content-Type": "application/octet-stream"})
        if resp.status not in (200, 201, 204):
            raise status_error(resp, f"{self.type} PUT {self.bucket}/{self.key(blob_id)}", blob_id=blob_id)

    def backend_config(self) -> dict[str, Any]:
        return dict(self.config)

    def close(self) -> None:
        self.http.close()


class S3Store(_HttpObjectStore):
    type = "s3"

    def __init__(self, config: dict[str, Any], *, force: bool = False) -> None:
        if not config.get("region") and not config.get("endpoint"):
            raise ConfigError("s3 backend config needs 'endpoint' or 'region'", field="backend-config.region")
        cfg = dict(config)
        # AWS proper is found by region; S3-compatible servers (minio, ceph) accept any region name.
        cfg.setdefault("region", "us-east-1")
        if not cfg.get("endpoint"):
            cfg["endpoint"] = f"s3.{cfg['region']}.amazonaws.com"
        super().__init__(cfg, force=force)
        self.region = str(cfg["region"])

    def _headers(self, method: str, blob_id: str, headers: dict[str, str], body: bytes) -> dict[str, str]:
        if not self.access_key_id:
            return headers
        return sigv4_headers(method, self.url(blob_id), headers, body, access_key_id=self.access_key_id,
                             secret=self.secret, region=self.region)


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def sigv4_headers(method: str, url: str, headers: dict[str, str], body: bytes, *, access_key_id: str,
                  secret: str, region: str, service: str = "s3",
                  now: datetime.datetime | None = None) -> dict[str, str]:
    """``headers`` plus AWS Signature V4 (``Authorization``, ``x-amz-date``, ``x-amz-content-sha256``,
    ``Host``) for a request without query string. (botocore has its one home in the read-only s3
    backend, so the converter signs its uploads itself.)"""
    now = now or datetime.datetime.now(datetime.UTC)
    amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    parts = urlsplit(url)
    out = dict(headers)
    out.update({"Host": parts.netloc, "x-amz-date": amz_date,
                "x-amz-content-sha256": hashlib.sha256(body).hexdigest()})
    signed = sorted((k.lower(), " ".join(v.split())) for k, v in out.items()
                    if k.lower() in ("host", "x-amz-date", "x-amz-content-sha256", "content-type"))
    canonical = "\n".join([method, parts.path or "/", "", "".join(f"{k}:{v}\n" for k, v in signed),
                           ";".join(k for k, _ in signed), out["x-amz-content-sha256"]])
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(_hmac(_hmac(_hmac(("AWS4" + secret).encode(), day), region), service), "aws4_request")
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    out["Authorization"] = (f"AWS4-HMAC-SHA256 Credential={access_key_id}/{scope}, "
                            f"SignedHeaders={';'.join(k for k, _ in signed)}, Signature={signature}")
    return out


class OssStore(_HttpObjectStore):
    type = "oss"

    def _headers(self, method: str, blob_id: str, headers: dict[str, str], body: bytes) -> dict[str, str]:
        if not self.access_key_id:
            return headers
        date = email.utils.formatdate(usegmt=True)
        headers["Date"] = date
        if method == "PUT":
            headers["Content-MD5"] = base64.b64encode(hashlib.md5(body).digest()).decode()
        oss = sorted((k.lower(), v) for k, v in headers.items() if k.lower().startswith("x-oss-"))
        resource = f"/{self.bucket}/{self.key(blob_id)}"
        to_sign = "\n".join([method, headers.get("Content-MD5", ""), headers.get("Content-Type", ""), date,
                             "".join(f"{k}:{v}\n" for k, v in oss) + resource])
        sig = base64.b64encode(hmac.new(self.secret.encode(), to_sign.encode(), hashlib.sha1).digest())
        headers["Authorization"] = f"OSS {self.access_key_id}:{sig.decode()}"
        return headers


def create_store(backend_type: str, config_text: str, *, force: bool = False) -> BlobStore:
    """A blob store from ``--backend-type`` / ``--backend-config`` (JSON). Raises ConfigError for bad
    JSON, a missing key or an unknown type."""
    try:
        config = json.loads(config_text or "{}")
    except ValueError as e:
        raise ConfigError(f"backend config is not JSON: {e}", field="backend-config") from None
    if not isinstance(config, dict):
        raise ConfigError("backend config must be a JSON object", field="backend-config")
    stores: dict[str, type[BlobStore]] = {"localfs": LocalFsStore, "s3": S3Store, "oss": OssStore}
    cls = stores.get(backend_type)
    if cls is None:
        raise ConfigError(f"unknown backend type {backend_type!r}, expected oss, s3 or localfs",
                          field="backend-type")
    return cls(config, force=force)  # type: ignore[call-arg]
