"""A fault-injecting HTTP shim in front of a real registry, and a redirect target for blob GETs.

``FaultShim`` forwards every request to the upstream registry (keeping the client's Host header, so
the registry's Location headers point back at the shim) and, for blob GETs, applies the next fault
of its plan (or a seeded random one):

- ``"500"``, ``"502"``, ``"503"``, ``"429"``: that status with a small body (429/503 carry
  ``Retry-After`` when ``retry_after`` is set);
- ``"reset"``: the connection is closed with RST before any response;
- ``"truncate"``: the real headers (full Content-Length), half the body, then close;
- ``"slow"``: headers, then a stall longer than ``slow_seconds`` before the body;
- ``"hang"``: the request is read and never answered (no status line, the connection stays open)
  until ``release()`` or ``hang_seconds`` -- a dead peer that still accepts connections;
- ``"pass"``: unchanged.

With ``redirect_to`` set, an authorised blob GET/HEAD is answered with ``307`` to the
``BlobStore`` (on the host name ``localhost``, a different origin); the store serves ranged
GETs and records the headers it received, so tests can assert that the registry's
``Authorization`` never reaches it.
"""

from __future__ import annotations

import contextlib
import http.client
import random
import re
import socket
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable

from tests.harness.servers.base import QuietHandler, ThreadedServer

FAULTS = ("500", "502", "503", "429", "reset", "truncate", "slow", "hang", "pass")
_BLOB_PATH = re.compile(r"^/v2/.+/blobs/(sha256:[0-9a-f]{64})$")
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection"}


class _ShimHandler(QuietHandler):
    @property
    def shim(self) -> FaultShim:
        return self.server.owner  # type: ignore[attr-defined, no-any-return]

    def do_GET(self) -> None:  # noqa: N802
        self._forward("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._forward("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._forward("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._forward("PUT")

    def do_PATCH(self) -> None:  # noqa: N802
        self._forward("PATCH")

    def do_DELETE(self) -> None:  # noqa: N802
        self._forward("DELETE")

    def _upstream(self, method: str, path: str, body: bytes | None,
                  headers: Iterable[tuple[str, str]]) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.shim.upstream_port, timeout=30)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for k, v in headers:
                if k.lower() not in _HOP:
                    conn.putheader(k, v)
            conn.putheader("Content-Length", str(len(body or b"")))
            conn.endheaders(body or None)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP], data
        finally:
            conn.close()

    def _forward(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        status, headers, data = self._upstream(method, self.path, body, self.headers.items())
        m = _BLOB_PATH.match(self.path.split("?")[0])
        if m:
            self.shim.count_blob_request(method)
        if m and method in ("GET", "HEAD") and status in (200, 206):
            if self.shim.redirect_to is not None:
                self._redirect(m.group(1))
                return
            if method == "GET":
                fault = self.shim.next_fault()
                if fault != "pass" and self._inject(fault, status, headers, data):
                    return
        self._reply(status, headers, data, head=method == "HEAD")

    def _reply(self, status: int, headers: list[tuple[str, str]], data: bytes, head: bool = False) -> None:
        self.send_response(status)
        for k, v in headers:
            if k.lower() not in ("server", "date"):
                self.send_header(k, v)
        if not head or not any(k.lower() == "content-length" for k, _ in headers):
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _redirect(self, digest: str) -> None:
        store = self.shim.redirect_to
        assert store is not None
        if digest not in store.blobs:
            # fetch the whole blob with the client's credentials, as a registry's storage would hold it
            fwd = [(k, v) for k, v in self.headers.items() if k.lower() != "range"]
            status, _, full = self._upstream("GET", self.path, None, fwd)
            assert status == 200, status
            store.blobs[digest] = full
        self.send_body(307, b"", {"Location": f"{store.public_url}/blobs/{digest}?sig=test-signature"})

    def _inject(self, fault: str, status: int, headers: list[tuple[str, str]], data: bytes) -> bool:
        if fault.isdigit():
            headers = {"Content-Type": "text/plain"}
            if fault in ("429", "503") and self.shim.retry_after is not None:
                headers["Retry-After"] = str(self.shim.retry_after)
            self.send_body(int(fault), f"injected {fault}".encode(), headers)
            return True
        if fault == "hang":
            with self.shim._lock:
                self.shim.hanging += 1
            self.shim.released.wait(self.shim.hang_seconds)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return True
        if fault == "reset":
            # SO_LINGER 0 turns close() into a TCP RST
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return True
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if fault == "truncate":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
        elif fault == "slow":
            time.sleep(self.shim.slow_seconds)
            with contextlib.suppress(OSError):
                self.wfile.write(data)
                self.wfile.flush()
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)
        return True

    def finish(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            super().finish()


class FaultShim(ThreadedServer):
    """The shim; ``inject(...)`` queues faults for the next blob GETs, ``applied`` counts them."""

    def __init__(self, upstream_port: int, *, redirect_to: BlobStore | None = None,
                 slow_seconds: float = 3.0) -> None:
        self.upstream_port = upstream_port
        self.redirect_to = redirect_to
        self.slow_seconds = slow_seconds
        #: "hang" faults end after this long at the latest (or at ``release()``)
        self.hang_seconds = 60.0
        self.released = threading.Event()
        #: blob GETs a "hang" fault has swallowed so far
        self.hanging = 0
        #: seconds sent as Retry-After with injected 429/503 answers (None: no header)
        self.retry_after: float | None = None
        self._plan: deque[str] = deque()
        self._rng: random.Random | None = None
        self._rate = 0.0
        self._kinds: tuple[str, ...] = ()
        self._lock = threading.Lock()
        self.applied: Counter[str] = Counter()
        self.blob_requests: Counter[str] = Counter()
        super().__init__(_ShimHandler)

    def count_blob_request(self, method: str) -> None:
        with self._lock:
            self.blob_requests[method] += 1

    def hang_all(self) -> None:
        """From now on every blob GET hangs (until ``release()``)."""
        self.randomize(1.0, seed=0, kinds=("hang",))

    def release(self) -> None:
        """End every hanging request (and let later ones through at once)."""
        self.released.set()

    def stop(self) -> None:
        self.release()
        super().stop()

    def inject(self, *faults: str) -> None:
        assert all(f in FAULTS for f in faults), faults
        with self._lock:
            self._plan.extend(faults)

    def randomize(self, rate: float, seed: int, kinds: Iterable[str] = FAULTS[:-1]) -> None:
        """After the queued plan, fail each blob GET with probability ``rate`` (seeded)."""
        with self._lock:
            self._rng = random.Random(seed)
            self._rate = rate
            self._kinds = tuple(kinds)

    def next_fault(self) -> str:
        with self._lock:
            if self._plan:
                fault = self._plan.popleft()
            elif self._rng is not None and self._rng.random() < self._rate:
                fault = self._rng.choice(self._kinds)
            else:
                fault = "pass"
            self.applied[fault] += 1
            return fault

    @property
    def host(self) -> str:
        return self.netloc


class _StoreHandler(QuietHandler):
    def do_GET(self) -> None:  # noqa: N802
        self._serve(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(head=True)

    def _serve(self, head: bool) -> None:
        store: BlobStore = self.server.owner  # type: ignore[attr-defined]
        store.record(self.command, self.path, dict(self.headers.items()))
        digest = self.path.split("?")[0].rsplit("/", 1)[-1]
        data = store.blobs.get(digest)
        if data is None or "sig=" not in self.path:
            self.send_body(404 if data is None else 403, b"no", head=head)
            return
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            start = int(a)
            end = min(int(b) if b else len(data) - 1, len(data) - 1)
            if start >= len(data):
                self.send_body(416, b"", {"Content-Range": f"bytes */{len(data)}"}, head=head)
                return
            self.send_body(206, data[start:end + 1],
                           {"Content-Range": f"bytes {start}-{end}/{len(data)}"}, head=head)
            return
        self.send_body(200, data, head=head)


class BlobStore(ThreadedServer):
    """Redirect target serving blobs by digest; ``seen`` records (method, path, headers)."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self._lock = threading.Lock()
        super().__init__(_StoreHandler)

    @property
    def public_url(self) -> str:
        # "localhost" is another origin than the registry's "127.0.0.1:<port>"
        return f"http://localhost:{self.port}"

    def record(self, method: str, path: str, headers: dict[str, str]) -> None:
        with self._lock:
            self.seen.append((method, path, headers))
