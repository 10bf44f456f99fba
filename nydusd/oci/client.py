"""The OCI distribution client: ``RegistryClient``, the registry API v2 over ``nydusd.http``.

Owns: ``RegistryClient`` -- blob HEAD and ranged GET (whole, or streamed with ``open_blob``),
following redirects to blob storage without leaking the registry's ``Authorization`` to other
hosts (and caching the redirect), anonymous / Basic / Bearer-token auth (tokens cached, refreshed
before expiry and on a 401); manifests, uploads (monolithic and chunked) and cross-repository
mount come from ``content.ContentMixin``. The transport (pooled session, TLS, timeouts, Dragonfly
proxy routing, streamed bodies) is ``nydusd.http.HttpClient``.

Must not import any HTTP library (they live in ``nydusd/http.py``) nor storage, rafs, fs or anything
above ``oci`` (the proxy is an injected object that satisfies ``nydusd.http.ProxyRoute``).

Threading: used concurrently by many threads. Auth state (challenge, token cache, redirect cache)
is guarded by ``RegistryClient._lock`` / ``TokenCache``'s own lock; the transport is thread-safe.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit, urlunsplit

from nydusd.errors import AuthError, BackendError
from nydusd.http import (
    REDIRECT_STATUSES,
    BodyStream,
    HttpClient,
    ProxyRoute,
    Response,
    StreamingResponse,
    parse_content_range,
    status_error,
)
from nydusd.log import get_logger
from nydusd.oci.auth import (
    CLIENT_ID,
    BasicCredentials,
    Challenge,
    TokenCache,
    parse_challenge,
    token_from_response,
)
from nydusd.oci.content import ContentMixin

log = get_logger(__name__)

MAX_REDIRECTS = 5


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


class RegistryClient(ContentMixin):
    """Client of one repository of an OCI distribution registry."""

    def __init__(self, host: str, repo: str, *, scheme: str = "https", auth: str | None = None,
                 registry_token: str | None = None, skip_verify: bool = False,
                 ca_cert_files: Iterable[str] = (), timeout: float = 5, connect_timeout: float = 5,
                 blob_url_scheme: str = "", blob_redirected_host: str = "",
                 proxy: ProxyRoute | None = None, http: HttpClient | None = None) -> None:
        self.host = host
        self.repo = repo
        self.scheme = "http" if scheme == "http" else "https"
        self.creds = BasicCredentials.from_auth(auth)
        self.registry_token = registry_token or None
        self.blob_url_scheme = blob_url_scheme
        self.blob_redirected_host = blob_redirected_host
        self.http = http or HttpClient(skip_verify=skip_verify, ca_cert_files=ca_cert_files,
                                       timeout=timeout, connect_timeout=connect_timeout, proxy=proxy)
        self._lock = threading.Lock()
        self._challenge: Challenge | None = None
        self._tokens = TokenCache()
        self._token_fetch = threading.Lock()
        self._redirects: dict[str, str] = {}
        self.token_requests = 0

    # ------------------------------------------------------------------ plumbing
    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}"

    def blob_url(self, digest: str, repo: str | None = None) -> str:
        return f"{self.base_url}/v2/{repo or self.repo}/blobs/{digest}"

    def set_credentials(self, auth: str | None) -> None:
        """Replace the Basic credentials at run time (``PUT /api/v1/config`` ``registry_auth``)."""
        creds = BasicCredentials.from_auth(auth)
        with self._lock:
            self.creds = creds
        self._tokens.clear()

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _scope(self, push: bool = False, repo: str | None = None) -> str:
        return f"repository:{repo or self.repo}:{'pull,push' if push else 'pull'}"

    def _auth_header(self, scopes: tuple[str, ...]) -> tuple[str | None, Any]:
        """The Authorization value to send now and the token it came from (for invalidation)."""
        if self.registry_token:
            return f"Bearer {self.registry_token}", "registry_token"
        with self._lock:
            ch, creds = self._challenge, self.creds
        if ch is None:
            return None, None
        if ch.scheme == "basic":
            return (creds.header if creds else None), None
        if ch.scheme == "bearer":
            key = (ch.realm, ch.params.get("service", ""), " ".join(scopes))
            tok = self._tokens.get(key)
            if tok is None:
                # One fetch at a time: when a token lapses under many reader threads, the first
                # fetches and the others find its token in the cache (no token-server stampede).
                with self._token_fetch:
                    tok = self._tokens.get(key)
                    if tok is None:
                        tok = self._fetch_token(ch, scopes)
                        self._tokens.put(key, tok)
            return f"Bearer {tok.value}", (key, tok)
        raise AuthError(f"registry {self.host} asks for unsupported auth scheme {ch.scheme!r}")

    def _fetch_token(self, ch: Challenge, scopes: tuple[str, ...]) -> Any:
        """Ask the realm for a token: POST form first (upstream's order), then GET with query."""
        if not ch.realm:
            raise AuthError(f"registry {self.host} sent a bearer challenge without realm")
        with self._lock:
            creds = self.creds
            self.token_requests += 1
        headers = {"Authorization": creds.header} if creds else {}
        service = ch.params.get("service", "")
        form = [("service", service), *[("scope", s) for s in scopes], ("client_id", CLIENT_ID)]
        # Auth-server requests never go through the Dragonfly proxy.
        resp = self.http.request("POST", ch.realm, headers={**headers, "Content-Type":
                                 "application/x-www-form-urlencoded"},
                                 data=urlencode(form).encode(), use_proxy=False)
        if resp.status != 200:
            resp = self.http.request("GET", ch.realm, headers=headers, params=form, use_proxy=False)
        if resp.status in (401, 403):
            raise AuthError(f"token server {ch.realm} refused the credentials: HTTP {resp.status}",
                            status=resp.status)
        if resp.status != 200:
            raise status_error(resp, f"token request to {ch.realm}")
        log.debug("registry_token_fetched", realm=ch.realm, scopes=scopes)
        return token_from_response(resp.json())

    def _request(self, method: str, url: str, *, scopes: tuple[str, ...], headers: Mapping[str, str]
                 | None = None, data: Any = None, params: Any = None, prefetch: bool = False,
                 stream: bool = False) -> Response:
        """One registry API request with auth: learn the challenge on a 401, (re)fetch a token and
        retry once; a second 401 is an AuthError."""
        for attempt in range(2):
            auth, used = self._auth_header(scopes)
            hdrs = dict(headers or {})
            if auth:
                hdrs["Authorization"] = auth
            if hasattr(data, "seek"):
                data.seek(0)
            try:
                resp = self.http.request(method, url, headers=hdrs, data=data, params=params,
                                         prefetch=prefetch, stream=stream)
            except BackendError as exc:
                url = self._maybe_downgrade(url, exc)
                resp = self.http.request(method, url, headers=hdrs, data=data, params=params,
                                         prefetch=prefetch, stream=stream)
            if resp.status != 401 or attempt:
                return resp
            self._on_unauthorized(resp, used)
        raise AssertionError("unreachable")

    def _maybe_downgrade(self, url: str, exc: BackendError) -> str:
        """With ``skip_verify`` a TLS failure against the registry switches it to plain HTTP (upstream
        behaviour for registries that only speak HTTP); otherwise the error stands."""
        if not (self.http.skip_verify and getattr(exc, "kind", "") == "tls" and self.scheme == "https"
                and url.startswith(self.base_url)):
            raise exc
        log.info("registry_scheme_downgraded", host=self.host, cause=exc.message)
        with self._lock:
            self.scheme = "http"
        return "http://" + url[len("https://"):]

    def _on_unauthorized(self, resp: Response, used: Any) -> None:
        ch = parse_challenge(resp.headers.get("WWW-Authenticate"))
        if used == "registry_token":
            # A stale static token: fall back to the challenge flow with the configured credentials.
            self.registry_token = None
        elif isinstance(used, tuple):
            self._tokens.discard(used[0], used[1])
            log.debug("registry_token_refused", realm=used[0][0])
        if ch is None:
            raise AuthError(f"registry {self.host} answered 401 without a WWW-Authenticate challenge")
        with self._lock:
            self._challenge = ch
            creds = self.creds
        if ch.scheme == "basic" and creds is None:
            raise AuthError(f"registry {self.host} requires credentials (Basic auth) and none are set")

    # ------------------------------------------------------------------ redirects
    def _rewrite_redirect(self, url: str) -> str:
        if not (self.blob_url_scheme or self.blob_redirected_host):
            return url
        p = urlsplit(url)
        return urlunsplit((self.blob_url_scheme or p.scheme, self.blob_redirected_host or p.netloc,
                           p.path, p.query, p.fragment))

    def _blob_request(self, method: str, digest: str, headers: dict[str, str], *,
                      prefetch: bool = False, stream: bool = False) -> Response:
        """GET/HEAD a blob, following redirects; the registry's Authorization stays at the registry."""
        with self._lock:
            cached = self._redirects.get(digest) if method == "GET" else None
        if cached:
            try:
                resp = self.http.request(method, cached, headers=headers, prefetch=prefetch, stream=stream)
            except BackendError:
                # The blob store behind the redirect is unreachable: the next attempt asks the
                # registry again (it may hand out another location).
                with self._lock:
                    self._redirects.pop(digest, None)
                raise
            if resp.status < 300 or resp.status == 416:
                return resp
            # The cached location expired (signed URLs do): forget it and ask the registry again.
            with self._lock:
                self._redirects.pop(digest, None)
            log.debug("registry_redirect_expired", digest=digest, status=resp.status)
        resp = self._request(method, self.blob_url(digest), scopes=(self._scope(),), headers=headers,
                             prefetch=prefetch, stream=stream)
        origin = _origin(self.base_url)
        url = self.blob_url(digest)
        for _ in range(MAX_REDIRECTS):
            location = resp.headers.get("Location")
            if resp.status not in REDIRECT_STATUSES or not location:
                return resp
            url = self._rewrite_redirect(urljoin(url, location))
            if method == "GET":
                with self._lock:
                    self._redirects[digest] = url
            hdrs = dict(headers)
            if _origin(url) == origin:
                auth, _ = self._auth_header((self._scope(),))
                if auth:
                    hdrs["Authorization"] = auth
            resp = self.http.request(method, url, headers=hdrs, prefetch=prefetch, stream=stream)
        raise BackendError(f"too many redirects for blob {digest}", digest=digest)

    # ------------------------------------------------------------------ blobs
    def ping(self) -> None:
        """``GET /v2/`` with auth. Raises AuthError, BackendError."""
        resp = self._request("GET", f"{self.base_url}/v2/", scopes=(self._scope(),))
        if resp.status != 200:
            raise status_error(resp, f"registry {self.host} /v2/")

    def head_blob(self, digest: str) -> int:
        """Size of a blob. Raises BlobNotFound, AuthError, BackendError."""
        resp = self._blob_request("HEAD", digest, {})
        if resp.status == 200 and resp.headers.get("Content-Length") is not None:
            return int(resp.headers["Content-Length"])
        if resp.status in (200, 405):
            # Some blob stores answer HEAD without a length: ask for one byte instead.
            rng = self._blob_request("GET", digest, {"Range": "bytes=0-0"})
            cr = parse_content_range(rng.headers.get("Content-Range"))
            if rng.status == 206 and cr and cr[2] is not None:
                return cr[2]
            if rng.status == 200:
                return len(rng.content)
            resp = rng
        raise status_error(resp, f"HEAD blob {digest}", digest=digest)

    def blob_exists(self, digest: str, repo: str | None = None) -> bool:
        scopes = (self._scope(repo=repo),)
        resp = self._request("HEAD", self.blob_url(digest, repo), scopes=scopes)
        if resp.status == 404:
            return False
        if resp.status in (200, *REDIRECT_STATUSES):
            return True
        raise status_error(resp, f"HEAD blob {digest}", digest=digest)

    def get_blob(self, digest: str, offset: int = 0, size: int | None = None, *,
                 prefetch: bool = False) -> bytes:
        """Bytes ``[offset, offset+size)`` of a blob (to its end when ``size`` is None); fewer at the
        end of the blob, ``b""`` at or past it. Raises BlobNotFound, AuthError, BackendError."""
        if size == 0:
            return b""
        headers: dict[str, str] = {}
        if offset or size is not None:
            end = "" if size is None else str(offset + size - 1)
            headers["Range"] = f"bytes={offset}-{end}"
        resp = self._blob_request("GET", digest, headers, prefetch=prefetch)
        if resp.status == 206:
            cr = parse_content_range(resp.headers.get("Content-Range"))
            if cr is not None and cr[0] != offset:
                raise BackendError(f"registry answered range starting at {cr[0]}, asked {offset}",
                                   transient=True, digest=digest)
            # (a server may round a range up; the bytes before the end are the ones asked for)
            return resp.content if size is None else resp.content[:size]
        if resp.status == 200:
            # The server ignored Range and sent the whole blob.
            return resp.content[offset:None if size is None else offset + size]
        if resp.status == 416:
            return b""
        raise status_error(resp, f"GET blob {digest}", digest=digest, offset=offset, size=size)

    def open_blob(self, digest: str, offset: int, size: int, *, prefetch: bool = False) -> BodyStream | None:
        """Bytes ``[offset, offset+size)`` of a blob as an unread body: the caller reads it with
        ``readinto`` and closes it. None when the range starts at or past the end of the blob; a
        range running past the end yields a stream whose reads fail when the body ends. Raises
        BlobNotFound, AuthError, BackendError."""
        headers = {"Range": f"bytes={offset}-{offset + size - 1}"}
        resp = self._blob_request("GET", digest, headers, prefetch=prefetch, stream=True)
        if resp.status == 416:
            return None
        if not isinstance(resp, StreamingResponse) or resp.stream is None:
            raise status_error(resp, f"GET blob {digest}", digest=digest, offset=offset, size=size)
        body = resp.stream
        try:
            if resp.status == 206:
                cr = parse_content_range(resp.headers.get("Content-Range"))
                if cr is not None and cr[0] != offset:
                    raise BackendError(f"registry answered range starting at {cr[0]}, asked {offset}",
                                       transient=True, digest=digest)
            elif offset:
                body.skip(offset)  # the server ignored Range and sends the whole blob
        except BaseException:
            body.close()
            raise
        return body
