"""Content operations of the registry API v2: blob uploads, cross-repository mounts, manifests, tags.

Owns: ``ContentMixin`` (mixed into ``client.RegistryClient``, which supplies the authenticated
``_request``, ``_scope``, ``blob_exists``, ``base_url``, ``host`` and ``repo``). Uploads are
monolithic (POST + PUT) or chunked (POST + PATCH per chunk + PUT); ``push_blob`` skips blobs the
registry has and tries cross-repo mounts first.

Must not import any HTTP library (they live in ``nydusd/http.py``) nor any layer above ``oci``.

Threading: stateless beyond the client's own thread-safe state; concurrent uploads of different
blobs are fine.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any, BinaryIO
from urllib.parse import urljoin

from nydusd.errors import BackendError, NotFound
from nydusd.http import Response, status_error
from nydusd.oci.mediatypes import MANIFEST_MEDIA_TYPES

UPLOAD_CHUNK = 16 << 20



class ContentMixin:
    """Uploads, mounts and manifests on top of the client's authenticated requests."""

    host: str
    repo: str

    @property
    def base_url(self) -> str:
        raise NotImplementedError

    def _request(self, method: str, url: str, *, scopes: tuple[str, ...],
                 headers: Mapping[str, str] | None = None, data: Any = None, params: Any = None,
                 prefetch: bool = False) -> Response:
        raise NotImplementedError

    def _scope(self, push: bool = False, repo: str | None = None) -> str:
        raise NotImplementedError

    def blob_exists(self, digest: str, repo: str | None = None) -> bool:
        raise NotImplementedError

    # ------------------------------------------------------------------ uploads
    def _upload_url(self, location: str | None, digest: str) -> str:
        if not location:
            raise BackendError(f"registry {self.host} started an upload without Location", digest=digest)
        return urljoin(self.base_url + "/", location)

    def check_push(self) -> None:
        """Prove push access without writing: open an upload session and cancel it.
        Raises AuthError (401/403), BackendError."""
        scopes = (self._scope(push=True),)
        resp = self._request("POST", f"{self.base_url}/v2/{self.repo}/blobs/uploads/", scopes=scopes)
        if resp.status != 202:
            raise status_error(resp, f"start an upload to {self.host}/{self.repo}")
        location = resp.headers.get("Location")
        if location:
            self._request("DELETE", urljoin(self.base_url + "/", location), scopes=scopes)

    def mount_blob(self, digest: str, from_repo: str) -> bool:
        """Cross-repository mount ``from_repo`` -> this repo. True when mounted (201); False when the
        registry declined (the upload session it opened is cancelled)."""
        scopes = (self._scope(push=True), self._scope(repo=from_repo))
        resp = self._request("POST", f"{self.base_url}/v2/{self.repo}/blobs/uploads/",
                             params={"mount": digest, "from": from_repo}, scopes=scopes)
        if resp.status == 201:
            return True
        if resp.status == 202:
            url = self._upload_url(resp.headers.get("Location"), digest)
            self._request("DELETE", url, scopes=scopes)
            return False
        raise status_error(resp, f"mount blob {digest} from {from_repo}", digest=digest)

    def push_blob(self, data: bytes | BinaryIO | str, digest: str | None = None, *,
                  chunk_size: int | None = None, mount_from: Iterable[str] = ()) -> str:
        """Upload a blob (bytes, a binary file object or a file path) unless the registry has it.

        Monolithic (POST + PUT) by default; chunked (PATCH per ``chunk_size``, then PUT) when
        ``chunk_size`` is given. Tries a cross-repo mount from each of ``mount_from`` first.
        Returns the digest. Raises AuthError, BackendError.
        """
        if isinstance(data, str):
            with open(data, "rb") as f:
                return self.push_blob(f, digest, chunk_size=chunk_size, mount_from=mount_from)
        if digest is None:
            digest = _digest_of(data)
        if self.blob_exists(digest):
            return digest
        for repo in mount_from:
            if self.mount_blob(digest, repo):
                return digest
        scopes = (self._scope(push=True),)
        resp = self._request("POST", f"{self.base_url}/v2/{self.repo}/blobs/uploads/", scopes=scopes)
        if resp.status != 202:
            raise status_error(resp, f"start upload of {digest}", digest=digest)
        url = self._upload_url(resp.headers.get("Location"), digest)
        if chunk_size:
            url = self._patch_chunks(url, data, chunk_size, scopes, digest)
            body: Any = b""
        else:
            body = data
        resp = self._request("PUT", url, params={"digest": digest}, data=body, scopes=scopes,
                             headers={"Content-Type": "application/octet-stream"})
        if resp.status not in (201, 204):
            raise status_error(resp, f"finish upload of {digest}", digest=digest)
        return digest

    def _patch_chunks(self, url: str, data: bytes | BinaryIO, chunk_size: int,
                      scopes: tuple[str, ...], digest: str) -> str:
        stream: BinaryIO | _BytesReader = _BytesReader(data) if isinstance(data, bytes) else data
        pos = 0
        while True:
            chunk = stream.read(chunk_size)
            if not chunk:
                return url
            headers = {"Content-Type": "application/octet-stream",
                       "Content-Range": f"{pos}-{pos + len(chunk) - 1}"}
            resp = self._request("PATCH", url, data=chunk, headers=headers, scopes=scopes)
            if resp.status != 202:
                raise status_error(resp, f"upload chunk at {pos} of {digest}", digest=digest)
            url = self._upload_url(resp.headers.get("Location"), digest)
            pos += len(chunk)

    # ------------------------------------------------------------------ manifests
    def get_manifest(self, reference: str, accept: Iterable[str] = MANIFEST_MEDIA_TYPES,
                     repo: str | None = None) -> tuple[bytes, str, str]:
        """Fetch a manifest (or index) by tag or digest: returns (body, media type, digest).
        Raises NotFound when absent, AuthError, BackendError."""
        url = f"{self.base_url}/v2/{repo or self.repo}/manifests/{reference}"
        resp = self._request("GET", url, scopes=(self._scope(repo=repo),),
                             headers={"Accept": ", ".join(accept)})
        if resp.status == 404:
            raise NotFound(f"manifest {reference} not found in {self.host}/{repo or self.repo}")
        if resp.status != 200:
            raise status_error(resp, f"GET manifest {reference}")
        digest = "sha256:" + hashlib.sha256(resp.content).hexdigest()
        media = resp.headers.get("Content-Type", "").split(";")[0].strip()
        return resp.content, media, digest

    def put_manifest(self, reference: str, body: bytes, media_type: str) -> str:
        """Upload a manifest under a tag or digest; returns its digest. Raises AuthError, BackendError."""
        url = f"{self.base_url}/v2/{self.repo}/manifests/{reference}"
        resp = self._request("PUT", url, data=body, headers={"Content-Type": media_type},
                             scopes=(self._scope(push=True),))
        if resp.status not in (200, 201, 202):
            raise status_error(resp, f"PUT manifest {reference}")
        return resp.headers.get("Docker-Content-Digest") or "sha256:" + hashlib.sha256(body).hexdigest()

    def list_tags(self) -> list[str]:
        resp = self._request("GET", f"{self.base_url}/v2/{self.repo}/tags/list", scopes=(self._scope(),))
        if resp.status == 404:
            return []
        if resp.status != 200:
            raise status_error(resp, "list tags")
        return list(resp.json().get("tags") or [])


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self._view = memoryview(data)
        self._pos = 0

    def read(self, n: int) -> bytes:
        chunk = bytes(self._view[self._pos:self._pos + n])
        self._pos += len(chunk)
        return chunk


def _digest_of(data: bytes | BinaryIO) -> str:
    h = hashlib.sha256()
    if isinstance(data, (bytes, bytearray, memoryview)):
        h.update(data)
    else:
        data.seek(0)
        while chunk := data.read(UPLOAD_CHUNK):
            h.update(chunk)
        data.seek(0)
    return "sha256:" + h.hexdigest()
