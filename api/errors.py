"""Error translation for the HTTP API: exceptions -> upstream-shaped ``{"code", "message"}`` bodies.

Owns: the one ``NydusError`` handler, the request-validation handler, the handlers for unknown
routes / wrong methods / unexpected crashes, and the rendering of upstream nydusd's error messages.
Upstream renders the Rust ``Debug`` chain of ``HttpError`` as the message (spec interfaces.md §3.2),
e.g. ``Mount(MountFilesystem(Other("object or filesystem already exists")))`` or
``GlobalMetrics(Metrics(Stats(NoCounter)))``, and callers string-match parts of it, so we produce
the same chain: ``<Op>(<ApiError>(<kind>))``. The ``<Op>`` and the ``ApiError`` wrapper of a route
come from ``OPERATIONS``, keyed by the route's ``name``.

Status codes follow upstream's ``translate_status_code`` (not ``NydusError.http_status``): kind
``NotReady`` -> 503, ``Unsupported`` -> 501, ``UnexpectedEvent`` (illegal state transition) -> 400,
``Metrics(Stats(NoCounter))`` -> 404, any other daemon failure -> 500; handler-level problems
(bad body, missing query, wrong method) -> 400 and unknown paths -> 404.

Must not import: fs/storage/rafs internals. Thread-safety: pure functions, no state.
"""

from __future__ import annotations

import json
import re
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nydusd.errors import (
    AlreadyExists,
    ConfigError,
    InvalidArgument,
    NotFound,
    NotReady,
    NydusError,
    Unsupported,
)

log = structlog.get_logger(__name__)

MOUNTPOINT_QUERY_MESSAGE = "'mountpoint' should be specified in query string"

#: route name -> (upstream HttpError variant, upstream ApiError wrapper). ``MetricsStats`` routes
#: render an unknown id as ``Metrics(Stats(NoCounter))`` (404); ``MetricsDaemon`` ones wrap the
#: daemon's error as ``Metrics(Daemon(<kind>))`` (500 for an unknown mountpoint, as upstream).
OPERATIONS: dict[str, tuple[str, str]] = {
    "daemon_info": ("DaemonInfo", "MetricsDaemon"),
    "daemon_info_v2": ("DaemonInfo", "MetricsDaemon"),
    "configure_daemon": ("Configure", "DaemonAbnormal"),
    "configure_daemon_v2": ("Configure", "DaemonAbnormal"),
    "daemon_events": ("Events", "Events"),
    "daemon_backend": ("FsBackendInfo", "MetricsDaemon"),
    "daemon_start": ("Configure", "DaemonAbnormal"),
    "daemon_exit": ("Configure", "DaemonAbnormal"),
    "fuse_sendfd": ("Upgrade", "DaemonAbnormal"),
    "fuse_takeover": ("Upgrade", "DaemonAbnormal"),
    "mount": ("Mount", "MountFilesystem"),
    "remount": ("Mount", "MountFilesystem"),
    "umount": ("Mount", "MountFilesystem"),
    "metrics_fs": ("GlobalMetrics", "MetricsStats"),
    "metrics_files": ("FsFilesMetrics", "MetricsStats"),
    "metrics_pattern": ("Pattern", "MetricsStats"),
    "metrics_backend": ("BackendMetrics", "MetricsStats"),
    "metrics_blobcache": ("BlobcacheMetrics", "MetricsStats"),
    "metrics_inflight": ("InflightMetrics", "MetricsDaemon"),
    "get_config": ("Configure", "DaemonAbnormal"),
    "update_config": ("Configure", "DaemonAbnormal"),
    "create_blob_object": ("CreateBlobObject", "DaemonAbnormal"),
    "delete_blob_object": ("DeleteBlobObject", "DaemonAbnormal"),
    "get_blob_objects": ("GetBlobObjects", "DaemonAbnormal"),
    "prometheus_metrics": ("GlobalMetrics", "MetricsStats"),
}


class RequestError(Exception):
    """A malformed request detected by the API itself (upstream's handler-level ``HttpError``).

    ``debug`` is the upstream Debug rendering, e.g. ``BadRequest`` or ``QueryString("...")``.
    """

    def __init__(self, debug: str, status: int = 400) -> None:
        super().__init__(debug)
        self.debug = debug
        self.status = status


def rust_str(text: str) -> str:
    """Render ``text`` the way Rust's ``{:?}`` renders a ``String`` (quoted, escaped)."""
    return json.dumps(text, ensure_ascii=False)


_EVENT_RE = re.compile(r'UnexpectedEvent\("(\w+)"\)')


def _event(exc: NydusError) -> str | None:
    """The state-machine event a daemon refused (``event=`` context or ``UnexpectedEvent("X")`` text)."""
    event = exc.context.get("event")
    if event is not None:
        return str(event)
    if exc.code == "UNEXPECTED_EVENT":
        match = _EVENT_RE.search(exc.message)
        return match.group(1) if match else exc.message
    return None


def _other_text(exc: NydusError) -> str:
    """The display text upstream's ``Error`` enum would give for this failure, plus our detail."""
    detail = str(exc).strip()
    if isinstance(exc, AlreadyExists):
        head = "object or filesystem already exists"
    elif isinstance(exc, NotFound):
        head = "object or filesystem doesn't exist"
    elif isinstance(exc, ConfigError):
        return f"invalid configuration, {detail}"
    elif isinstance(exc, InvalidArgument):
        return f"invalid argument `{detail}`"
    else:
        return detail or type(exc).__name__
    if not detail or detail.startswith(head):
        return detail or head
    return f"{head}: {detail}"


def render_daemon_error(exc: NydusError, op: str, wrapper: str) -> tuple[int, str]:
    """Map a daemon failure to ``(status, upstream debug message)`` for operation ``op``."""
    if wrapper == "MetricsStats" and isinstance(exc, NotFound):
        return 404, f"{op}(Metrics(Stats(NoCounter)))"
    if isinstance(exc, NotReady):
        kind, status = "NotReady", 503
    elif isinstance(exc, Unsupported):
        kind, status = "Unsupported", 501
    elif _event(exc) is not None:
        kind, status = f"UnexpectedEvent({rust_str(_event(exc) or '')})", 400
    else:
        kind, status = f"Other({rust_str(_other_text(exc))})", 500
    if wrapper.startswith("Metrics"):
        return status, f"{op}(Metrics(Daemon({kind})))"
    if wrapper == "Events":
        return status, f"{op}(Events({rust_str(_other_text(exc))}))"
    return status, f"{op}({wrapper}({kind}))"


def error_body(code: str, message: str, status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=status, headers=headers)


def _operation(request: Request) -> tuple[str, str]:
    route = request.scope.get("route")
    name = getattr(route, "name", "")
    return OPERATIONS.get(name, ("Configure", "DaemonAbnormal"))


async def _nydus_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, NydusError)
    op, wrapper = _operation(request)
    status, message = render_daemon_error(exc, op, wrapper)
    log.info("api_request_failed", op=op, status=status, error=type(exc).__name__, detail=str(exc))
    return error_body(exc.code, message, status)


async def _request_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestError)
    return error_body("UNDEFINED", exc.debug, exc.status)


def _validation_message(errors: list[Any]) -> str:
    """Upstream-like rendering of pydantic validation errors (``QueryString``/``ParseBody``)."""
    for err in errors:
        loc = tuple(err.get("loc", ()))
        if loc[:1] == ("query",) and err.get("type") == "missing" and loc[1:] == ("mountpoint",):
            return f"QueryString({rust_str(MOUNTPOINT_QUERY_MESSAGE)})"
    parts = []
    for err in errors:
        field = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        if err.get("type") == "missing" and field:
            parts.append(f"missing field `{field}`")
        elif err.get("type") == "json_invalid":
            ctx = err.get("ctx") or {}
            parts.append(f"invalid JSON: {ctx.get('error', err.get('msg'))}")
        else:
            parts.append(f"{field or 'body'}: {err.get('msg')}")
    where = "QueryString" if all(tuple(e.get("loc", ()))[:1] == ("query",) for e in errors) else "ParseBody"
    return f"{where}(Error({rust_str('; '.join(parts))}))"


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message = _validation_message(list(exc.errors()))
    log.info("api_request_rejected", reason=message)
    return error_body("UNDEFINED", message, 400)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        return error_body("UNDEFINED", "NoRoute", 404)
    if exc.status_code == 405:
        # upstream answers a known path with the wrong method as a plain bad request
        return error_body("UNDEFINED", "BadRequest", 400)
    return error_body("UNDEFINED", f"BadRequest({rust_str(str(exc.detail))})", exc.status_code)


async def _crash(request: Request, exc: Exception) -> JSONResponse:
    op, _ = _operation(request)
    log.exception("api_request_crashed", op=op, error=type(exc).__name__)
    message = f"{op}(DaemonAbnormal(Other({rust_str(f'{type(exc).__name__}: {exc}')})))"
    return error_body("INTERNAL", message, 500)


def install_error_handlers(app: FastAPI) -> None:
    """Register every exception handler of the API on ``app``."""
    app.add_exception_handler(NydusError, _nydus_error)
    app.add_exception_handler(RequestError, _request_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _crash)
