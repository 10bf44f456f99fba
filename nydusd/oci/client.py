"""HTTP transport and the OCI distribution client: the only module that imports ``requests``.

Owns:
- ``HttpClient``: one pooled ``requests.Session`` with TLS settings and (connect, read) timeouts;
  ``request()`` sends one request, optionally through a ``ProxyRoute`` (Dragonfly peer) with
  fallback to the origin, reads the whole body with a single buffered read and turns every
  transport failure into a ``BackendError`` (``transient=True``) carrying the cause. Other modules
  (the s3 backend, the proxy health checker) use it as their HTTP layer.
  With ``stream=True`` a successful (2xx) GET comes back as a ``StreamingResponse`` whose body is
  left on the wire: ``BodyStream.readinto`` copies it straight into the caller's buffer (no
  intermediate ``bytes``), so a large range can be consumed piece by piece as it arrives.
- ``RegistryClient``: the registry API v2 -- blob HEAD and ranged GET (whole, or streamed with
  ``open_blob``), following redirects to blob
  storage without leaking the registry's ``Authorization`` to other hosts (and caching the
  redirect), anonymous / Basic / Bearer-token auth (tokens cached, refreshed before expiry and on a
  401); manifests, uploads (monolithic and chunked) and cross-repository mount come from
  ``content.ContentMixin``.

Must not import storage, rafs, fs or anything above ``oci`` (the proxy is an injected object that
satisfies ``ProxyRoute``).

Threading: both classes are used concurrently by many threads. ``requests.Session``'s connection
pool is thread-safe; the session never stores cookies we rely on. Auth state (challenge, token
cache, redirect cache) is guarded by ``RegistryClient._lock`` / ``TokenCache``'s own lock.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol
from urllib.parse import urlencode, urljoin, urlsplit, urlunsplit

import requests
import urllib3
import urllib3.connection
from requests.adapters import HTTPAdapter
from urllib3.exceptions import InsecureRequestWarning

from nydusd.errors import AuthError, BackendError, redact_credentials
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
from nydusd.oci.response import REDIRECT_STATUSES, Response, parse_content_range, status_error

log = get_logger(__name__)

_STREAM_ERRORS = (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError, ValueError)

MAX_REDIRECTS = 5
POOL_SIZE = 32


class ProxyRoute(Protocol):
    """What ``HttpClient`` needs from a Dragonfly proxy (implemented in storage/backend/proxy.py)."""

    fallback: bool

    def current(self) -> str | None:
        """The proxy URL to use now; None to go straight to the origin (proxy down + fallback).
        Raises BackendError when the proxy is down and fallback is disabled."""

    def rewrite(self, url: str) -> str:
        """The URL to ask the proxy for (``use_http`` turns https into http)."""

    def headers(self, prefetch: bool) -> dict[str, str]:
        """Extra ``X-Dragonfly-*`` headers for a proxied request."""

    def report_failure(self, cause: str) -> None:
        """A proxied request failed at the transport level: mark the proxy down."""


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def _transport_error(method: str, url: str, exc: BaseException) -> BackendError:
    """Describe a transport failure; all but a refused certificate may heal on retry."""
    if isinstance(exc, requests.exceptions.SSLError):
        kind = "tls"
    elif isinstance(exc, requests.exceptions.ProxyError):
        kind = "proxy"
    elif isinstance(exc, (requests.exceptions.Timeout, urllib3.exceptions.TimeoutError)):
        kind = "timeout"
    elif isinstance(exc, (urllib3.exceptions.ProtocolError, requests.exceptions.ChunkedEncodingError,
                          urllib3.exceptions.IncompleteRead)):
        kind = "short_body"
    else:
        kind = "connection"
    # A certificate the client refuses stays refused: retrying only delays the error.
    transient = not (kind == "tls" and "CERTIFICATE_VERIFY_FAILED" in str(exc))
    return BackendError(f"{method} {url} failed: {kind}: {exc}", transient=transient, kind=kind)


class _UnixConnection(urllib3.connection.HTTPConnection):
    """An HTTP connection over a unix stream socket (the host name only fills the Host header)."""

    def __init__(self, *args: Any, socket_path: str, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.socket_path = socket_path

    def _new_conn(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            timeout = self.timeout if isinstance(self.timeout, (int, float)) else None
            sock.settimeout(timeout)
            sock.connect(self.socket_path)
        except OSError as exc:
            sock.close()
            raise urllib3.exceptions.NewConnectionError(
                self, f"cannot connect to unix socket {self.socket_path}: {exc}") from exc
        return sock


class _UnixPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _UnixConnection


class _UnixAdapter(HTTPAdapter):
    """Sends every ``http://`` request of a session to one unix socket."""

    def __init__(self, socket_path: str, pool_size: int) -> None:
        super().__init__(max_retries=0)
        self._pool = _UnixPool("localhost", maxsize=pool_size, socket_path=socket_path)

    def get_connection_with_tls_context(self, request: Any, verify: Any, proxies: Any = None,
                                        cert: Any = None) -> Any:
        return self._pool

    def get_connection(self, url: Any, proxies: Any = None) -> Any:  # older requests
        return self._pool

    def close(self) -> None:
        self._pool.close()
        super().close()


def _peer_closed(exc: BaseException) -> bool:
    """Whether ``exc`` (however deeply wrapped) is the peer closing an idle connection."""
    seen: list[BaseException] = [exc]
    for e in seen:
        # (http.client.RemoteDisconnected is a ConnectionResetError)
        if isinstance(e, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
            return True
        if len(seen) > 16:
            break
        for nxt in (*getattr(e, "args", ()), getattr(e, "reason", None), e.__cause__, e.__context__):
            if isinstance(nxt, BaseException) and nxt not in seen:
                seen.append(nxt)
    return False


class BodyStream:
    """The body of a successful streamed response, read in place (see ``HttpClient.request``).

    ``readinto(view)`` fills ``view`` completely or raises a transient BackendError (the body was
    cut short or the connection failed); ``close()`` returns a fully read connection to the pool
    and drops a partly read one. Not thread-safe: one reader at a time.
    """

    def __init__(self, raw: Any, url: str) -> None:
        self._raw = raw
        self.url = url
        # http.client's response reads straight into the caller's buffer; urllib3's own readinto
        # would allocate and copy each piece.
        fp = getattr(raw, "_fp", None)
        self._readinto = fp.readinto if fp is not None and hasattr(fp, "readinto") else raw.readinto

    def readinto(self, view: memoryview) -> None:
        """Fill ``view`` with the next ``len(view)`` bytes of the body."""
        pos, want = 0, len(view)
        while pos < want:
            try:
                n = self._readinto(view[pos:])
            except _STREAM_ERRORS as exc:
                raise _transport_error("GET", self.url, exc) from exc
            if not n:
                raise BackendError(f"GET {self.url}: body ended after {pos} of {want} more bytes",
                                   transient=True, kind="short_body")
            pos += n

    def skip(self, size: int) -> None:
        """Discard the next ``size`` bytes (a server that ignored Range sends the blob's head)."""
        buf = memoryview(bytearray(min(size, 1 << 20)))
        while size > 0:
            n = min(size, len(buf))
            self.readinto(buf[:n])
            size -= n

    def close(self) -> None:
        try:
            self._raw.close()
        finally:
            release = getattr(self._raw, "release_conn", None)
            if release is not None:
                release()

    def __enter__(self) -> BodyStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class StreamingResponse(Response):
    """A 2xx answer whose body is still on the wire: read it through ``stream`` (then close it)."""

    stream: BodyStream | None = None


class HttpClient:
    """A pooled HTTP session with the TLS, timeout and proxy policy of one backend config."""

    def __init__(self, *, skip_verify: bool = False, ca_cert_files: Iterable[str] = (),
                 timeout: float = 5, connect_timeout: float = 5, pool_size: int = POOL_SIZE,
                 proxy: ProxyRoute | None = None, unix_socket: str | None = None) -> None:
        """``unix_socket``: send every ``http://`` request to this socket (URL host ignored)."""
        self.timeout = (float(connect_timeout or 5), float(timeout or 5))
        self.proxy = proxy
        self._session = requests.Session()
        # Library code reads no environment: proxies come from the config only.
        self._session.trust_env = False
        # Blobs must arrive byte-exact (and ranges must index the stored bytes): no transfer coding.
        self._session.headers["Accept-Encoding"] = "identity"
        adapter = HTTPAdapter(pool_connections=8, pool_maxsize=pool_size, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        if unix_socket:
            self._session.mount("http://", _UnixAdapter(unix_socket, pool_size))
        self._bundle: str | None = None
        self.skip_verify = skip_verify
        if skip_verify:
            urllib3.disable_warnings(InsecureRequestWarning)
            self._session.verify = False
        else:
            cas = [c for c in ca_cert_files if c]
            if len(cas) == 1:
                self._session.verify = cas[0]
            elif cas:
                self._session.verify = self._bundle = self._merge_bundle(cas)

    @staticmethod
    def _merge_bundle(files: list[str]) -> str:
        fd, path = tempfile.mkstemp(prefix="nydus-ca-", suffix=".pem")
        with os.fdopen(fd, "wb") as out:
            for f in files:
                with open(f, "rb") as src:
                    out.write(src.read() + b"\n")
        return path

    def close(self) -> None:
        self._session.close()
        if self._bundle:
            os.unlink(self._bundle)
            self._bundle = None

    def request(self, method: str, url: str, *, headers: Mapping[str, str] | None = None,
                data: bytes | BinaryIO | None = None, params: Any = None, use_proxy: bool = True,
                prefetch: bool = False, stream: bool = False) -> Response:
        """Send one request (no redirects followed) and read its whole body.

        ``stream``: a 2xx answer to a GET comes back as a ``StreamingResponse`` with its body
        unread (the caller must close its ``stream``); other answers are read as usual.

        Through the proxy when one is configured and healthy; on a proxy transport failure, or a
        proxy-side error answer, the request goes straight to the origin if fallback is on.
        Raises BackendError (transient, with ``kind``) on transport failures.
        """
        route = self.proxy if use_proxy else None
        purl = route.current() if route is not None else None
        if route is not None and purl:
            shown = redact_credentials(purl)  # the proxy URL may carry user:password@
            hdrs = dict(headers or {})
            hdrs.update(route.headers(prefetch))
            try:
                resp = self._send(method, route.rewrite(url), hdrs, data, params, purl, stream)
            except BackendError as exc:
                route.report_failure(str(exc))
                if not route.fallback:
                    raise BackendError(f"request through proxy {shown} failed and proxy fallback is "
                                       f"disabled: {exc.message}", transient=True, proxy=shown) from exc
                log.info("proxy_request_fell_back", proxy=shown, url=url, cause=exc.message)
            else:
                if resp.headers.get("X-Dragonfly-Error-Type", "").lower() != "proxy":
                    resp.proxied = True
                    return resp
                if resp.status == 403 or not route.fallback:
                    raise BackendError(f"proxy {shown} refused {method} {url}: HTTP {resp.status}",
                                       transient=resp.status != 403, proxy=shown, status=resp.status)
                if resp.status != 429:
                    route.report_failure(f"proxy error HTTP {resp.status}")
                log.info("proxy_request_fell_back", proxy=shown, url=url, status=resp.status)
        return self._send(method, url, dict(headers or {}), data, params, None, stream)

    def _send(self, method: str, url: str, headers: dict[str, str], data: Any, params: Any,
              proxy: str | None, stream: bool = False) -> Response:
        proxies = {"http": proxy, "https": proxy} if proxy else None
        for attempt in (0, 1):
            try:
                resp = self._session.request(method, url, headers=headers, data=data, params=params,
                                             proxies=proxies, timeout=self.timeout, stream=True,
                                             allow_redirects=False)
                break
            except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
                # A pooled keep-alive connection the peer closed meanwhile fails before any byte
                # of the answer: resend an idempotent request once on a fresh connection.
                if attempt or method not in ("GET", "HEAD") or not _peer_closed(exc):
                    raise _transport_error(method, url, exc) from exc
                log.debug("http_request_resent", method=method, url=url, cause=str(exc))
        if stream and method == "GET" and 200 <= resp.status_code < 300:
            return StreamingResponse(resp.status_code, resp.headers, b"", url,
                                     stream=BodyStream(resp.raw, url))
        try:
            # One buffered read of the exact Content-Length: no Python loop over chunks, and urllib3
            # raises IncompleteRead when the body is cut short.
            body = b"" if method == "HEAD" else resp.raw.read(decode_content=False)
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            resp.close()  # drops the connection: it is in an unknown state
            if resp.status_code >= 400:
                # Error bodies only feed messages; docker-registry's 416 even announces the blob's
                # length while sending a short text. Keep the status, forget the body.
                return Response(resp.status_code, resp.headers, b"", url)
            raise _transport_error(method, url, exc) from exc
        resp.close()
        return Response(resp.status_code, resp.headers, body, url)


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
