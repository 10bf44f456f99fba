"""The FastAPI application of nydusd's admin API (spec interfaces.md §3): ``create_app(daemon)``.

Owns: application assembly (routers, error handlers, the request middleware) and
``openapi_document()`` (what ``openapi.yaml`` at the repository root must equal). The middleware
gives every request an id bound into structlog contextvars, treats every request body as JSON
whatever its Content-Type (upstream ignores the header; Go's client and ``curl -d`` send none or a
form type), stamps ``Server: Nydus API`` and logs one canonical ``api_request_handled`` line.
Must not import: fs/storage/rafs internals (design R1). Thread-safety: the app is shared by the
server's event loop and its worker threads; it holds no mutable state besides ``app.state``.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, cast

import structlog
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import DaemonApi
from api.errors import error_body, install_error_handlers
from api.routes import daemon as daemon_routes
from api.routes import metrics as metrics_routes
from api.routes import mount as mount_routes

log = structlog.get_logger(__name__)

#: largest request body accepted (a mount's config document is at most 1 MiB, JSON-escaped in the
#: body); a larger one is refused with 413 before it is read (Content-Length) or as soon as it
#: passes the limit (chunked), so a huge body never grows the daemon
MAX_BODY = 4 << 20
#: longest request target (path + query) and header block answered normally; longer -> 414 / 431
#: (a 4096-byte mountpoint, percent-encoded, fits). The server refuses heads over 64 KiB earlier.
MAX_URL = 16 << 10
MAX_HEADERS = 32 << 10
SERVER_HEADER = (b"server", b"Nydus API")
JSON_TYPE = (b"content-type", b"application/json")
DESCRIPTION = ("Admin API of nydusd (Python implementation), served over a unix socket "
               "(clients use host `unix`). Compatible with upstream nydus API v1/v2; errors are "
               '`{"code", "message"}` with upstream\'s message texts. Limits: request bodies over 4 MiB '
               "are refused with 413, request targets over 16 KiB with 414, header blocks over 32 KiB "
               "with 431; mountpoints are absolute paths of at most 4096 bytes whose components have "
               "at most 255 bytes (else 400).")


def _too_large() -> Any:
    return error_body("UNDEFINED", f"PayloadTooLarge(\"request body larger than {MAX_BODY} bytes\")",
                      413, {"connection": "close"})


def _head_refusal(scope: Scope) -> Any:
    """A 414/431 answer when the request target or headers are over their limits, else None."""
    if len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") > MAX_URL:
        return error_body("UNDEFINED", f"UriTooLong(\"request target longer than {MAX_URL} bytes\")",
                          414)
    if sum(len(k) + len(v) for k, v in scope["headers"]) > MAX_HEADERS:
        return error_body("UNDEFINED",
                          f"RequestHeaderFieldsTooLarge(\"headers longer than {MAX_HEADERS} bytes\")",
                          431)
    return None


def _declared_length(headers: list[tuple[bytes, bytes]]) -> int:
    """The Content-Length (h11 checked it), -1 for a chunked body, 0 for none."""
    chunked = False
    for key, value in headers:
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
        chunked = chunked or (key == b"transfer-encoding" and b"chunked" in value.lower())
    return -1 if chunked else 0


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()
    return replay


class RequestMiddleware:
    """Pure ASGI middleware: request id + canonical log line, JSON bodies, ``Server`` header, and
    the ``MAX_BODY`` limit (413)."""

    _ids = itertools.count(1)

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = f"{next(self._ids):x}"
        refusal = _head_refusal(scope)
        if refusal is not None:
            log.info("api_request_refused", request_id=request_id, method=scope["method"],
                     status=refusal.status_code)
            await refusal(scope, receive, send)
            return
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
        # in place: the crash handler (outermost middleware) reads the route from this same scope
        scope["headers"] = [*headers, JSON_TYPE]
        status = 500
        started = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                kept = [(k, v) for k, v in message.get("headers", []) if k != b"server"]
                message = {**message, "headers": [*kept, SERVER_HEADER]}
            await send(message)

        async def buffered_body() -> list[Message] | None:
            """A body without Content-Length (chunked), read here up to ``MAX_BODY``: its
            messages to replay to the app, or None when it is too large (the rest is never read)."""
            received, messages = 0, []
            while True:
                message = await receive()
                messages.append(message)
                if message["type"] != "http.request":
                    return messages
                received += len(message.get("body", b""))
                if received > MAX_BODY:
                    return None
                if not message.get("more_body", False):
                    return messages

        with structlog.contextvars.bound_contextvars(request_id=request_id, method=scope["method"],
                                                     path=scope["path"]):
            try:
                declared = _declared_length(headers)
                if declared > MAX_BODY:
                    await _too_large()(scope, receive, send_wrapper)
                    return
                app_receive = receive
                if declared < 0:
                    messages = await buffered_body()
                    if messages is None:
                        await _too_large()(scope, receive, send_wrapper)
                        return
                    app_receive = _replay(messages, receive)
                await self.app(scope, app_receive, send_wrapper)
            finally:
                # explicit fields too: the line must be complete even where contextvars aren't merged
                log.info("api_request_handled", request_id=request_id, method=scope["method"],
                         path=scope["path"], query=scope.get("query_string", b"").decode("latin-1"),
                         status=status, ms=round((time.perf_counter() - started) * 1000, 2))


def create_app(daemon: DaemonApi) -> FastAPI:
    """Build the API application around ``daemon`` (kept on ``app.state.daemon``)."""
    # redirect_slashes off: upstream matches paths exactly ("/api/v1/daemon/" is NoRoute, not a 307)
    app = FastAPI(title="Nydus API", version="1.0.0", description=DESCRIPTION, redirect_slashes=False,
                  docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    app.state.daemon = daemon
    for router in (daemon_routes.router, daemon_routes.config_router, mount_routes.router,
                   metrics_routes.router, daemon_routes.v2_router, metrics_routes.prometheus_router):
        app.include_router(router)
    install_error_handlers(app)
    app.add_middleware(RequestMiddleware)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document minus its 422 validation responses: we answer those as 400 ``ErrorMessage``."""
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, description=app.description,
                          routes=app.routes)
        for item in doc["paths"].values():
            for op in item.values():
                op["responses"].pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            doc.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = doc
    return app.openapi_schema


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document of the app (independent of any daemon); ``openapi.yaml`` must equal it."""
    return create_app(cast(DaemonApi, _NoDaemon())).openapi()


class _NoDaemon:
    """Placeholder daemon for building the schema; no route is ever called on it."""

    state = "UNKNOWN"

    def mounts(self) -> dict[str, Any]:
        return {}


def main() -> None:
    """Print the OpenAPI document as YAML (``python -m api.app > openapi.yaml``)."""
    import sys

    import yaml

    sys.stdout.write(yaml.safe_dump(openapi_document(), sort_keys=False, allow_unicode=True))


if __name__ == "__main__":
    main()
