"""Response helpers shared by the routers: 200 + JSON payload, 204 empty, documented error bodies.

Owns: ``json_ok``, ``no_content`` and the ``ERRORS`` table that documents the error statuses of a
route in the OpenAPI document. Upstream sends ``Content-Type: application/json`` on every response,
including the empty 204 ones (spec interfaces.md §3), and so do we.
Must not import: anything from nydusd. Thread-safety: pure functions.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Response

from api.schemas import ErrorMessage

JSON = "application/json"


def json_ok(payload: Any) -> Response:
    """200 with ``payload`` serialized as compact JSON (the daemon's dict, passed through)."""
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return Response(content=body.encode(), status_code=200, media_type=JSON)


def no_content() -> Response:
    """204 with an empty body."""
    return Response(status_code=204, headers={"content-type": JSON})


def _err(description: str) -> dict[str, Any]:
    return {"model": ErrorMessage, "description": description}


#: error statuses every daemon-calling route may answer (upstream translate_status_code)
ERRORS: dict[int | str, dict[str, Any]] = {
    400: _err("bad request: malformed body or query, wrong method, illegal state transition"),
    500: _err("the daemon failed the request"),
    501: _err("unsupported by this daemon"),
    503: _err("daemon not ready"),
}
#: the same plus 404 (unknown metrics id: ``Metrics(Stats(NoCounter))``)
METRIC_ERRORS: dict[int | str, dict[str, Any]] = {**ERRORS, 404: _err("no counter for that id")}
EMPTY: dict[int | str, dict[str, Any]] = {204: {"description": "done, empty body"}}
