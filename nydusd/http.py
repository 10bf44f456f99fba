"""HTTP transport: the one home of ``requests`` and ``urllib3`` in the project.

Owns:
- ``HttpClient``: one pooled ``requests.Session`` with TLS settings and (connect, read) timeouts;
  ``request()`` sends one request, optionally through a ``ProxyRoute`` (Dragonfly peer) with
  fallback to the origin, reads the whole body with a single buffered read and turns every
  transport failure into a ``BackendError`` (``transient=True``) carrying the cause. The registry
  client (``oci/client.py``), the s3 and http-proxy backends and the proxy health checker use it.
  With ``stream=True`` a successful (2xx) GET comes back as a ``StreamingResponse`` whose body is
  left on the wire: ``BodyStream.readinto`` copies it straight into the caller's buffer (no
  intermediate ``bytes``), so a large range can be consumed piece by piece as it arrives.
  ``unix_socket`` sends every ``http://`` request to one unix stream socket (``_UnixAdapter``).
- ``Response`` (status, headers, whole body), ``status_error`` (HTTP status -> AuthError /
  BlobNotFound / BackendError with ``transient`` set for 408, 429 and 5xx, ``retry_after`` from
  ``Retry-After``) and ``parse_content_range``.

Must not import anything from the project but the leaf modules (``errors``, ``log``): the proxy is
an injected object that satisfies ``ProxyRoute``, registry semantics live in ``oci/``.

Threading: ``HttpClient`` is used concurrently by many threads; ``requests.Session``'s connection
pool is thread-safe and the session never stores cookies we rely on. A ``BodyStream`` has one
reader at a time.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

import requests
import urllib3
import urllib3.connection
from requests.adapters import HTTPAdapter
from urllib3.exceptions import InsecureRequestWarning

from nydusd.errors import AuthError, BackendError, BlobNotFound, redact_credentials
from nydusd.log import get_logger

log = get_logger(__name__)


# ---------------------------------------------------------------------------------------- answers
REDIRECT_STATUSES = (301, 302, 303, 307, 308)


@dataclass
class Response:
    """A finished HTTP exchange: status, headers and the whole body (already read)."""

    status: int
    headers: Mapping[str, str]
    content: bytes
    url: str
    proxied: bool = False

    def json(self) -> Any:
        try:
            return json.loads(self.content)
        except ValueError as exc:
            raise BackendError(f"invalid JSON from {self.url}: {exc}") from None

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")


def status_error(resp: Response, what: str, **ctx: Any) -> BackendError:
    """Map a non-success HTTP status to the error class callers act on."""
    snippet = resp.text[:200].strip()
    msg = f"{what}: HTTP {resp.status}" + (f": {snippet}" if snippet else "")
    if resp.status in (401, 403):
        return AuthError(msg, status=resp.status, **ctx)
    if resp.status == 404:
        return BlobNotFound(msg, status=resp.status, **ctx)
    transient = resp.status == 429 or resp.status >= 500 or resp.status == 408
    retry_after = _retry_after(resp.headers.get("Retry-After")) if transient else None
    if retry_after is not None:
        ctx["retry_after"] = retry_after
    return BackendError(msg, transient=transient, status=resp.status, **ctx)


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After: <seconds>`` header (the HTTP-date form is ignored)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """``bytes a-b/total`` -> (a, b, total or None)."""
    if not value or not value.startswith("bytes "):
        return None
    span, _, total = value[6:].partition("/")
    a, _, b = span.partition("-")
    try:
        return int(a), int(b), (None if total in ("", "*") else int(total))
    except ValueError:
        return None


# -------------------------------------------------------------------------------------- transport
_STREAM_ERRORS = (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError, ValueError)

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
