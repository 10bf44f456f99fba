"""Finished HTTP exchanges and what their status codes mean to callers.

Owns: ``Response`` (status, headers, whole body), ``status_error`` (HTTP status -> AuthError /
BlobNotFound / BackendError with ``transient`` set for 408, 429 and 5xx) and
``parse_content_range``. Pure data: must not import any HTTP library (``client.py`` produces
these objects) nor any layer above ``oci``. Thread-safe (immutable use).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nydusd.errors import AuthError, BackendError, BlobNotFound

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
