"""Property-based run of ``openapi.yaml`` against the app (in-process ASGI, FakeDaemon): every
generated request gets a response that conforms to the contract (status documented, body schema,
content type) and no request crashes the app (a 500 must be a daemon's NydusError, never an
unhandled exception). Upstream answers legitimate daemon refusals (unknown mountpoint, bad config)
with 500, so "no 5xx at all" is not the rule; "no INTERNAL crash" is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api.app import create_app
from tests.harness.fakes.daemon import FakeDaemon

ROOT = Path(__file__).resolve().parents[2]

schema = schemathesis.openapi.from_path(ROOT / "openapi.yaml")


def _app() -> Any:
    daemon = FakeDaemon()
    boot = ROOT / "openapi.yaml"  # any existing file stands in for a bootstrap for the fake
    cfg = '{"device": {"backend": {"type": "localfs", "config": {"dir": "/tmp"}}}, "mode": "direct"}'
    daemon.mount("/m", str(boot), cfg)
    daemon.read("/m", ino=2, size=10)
    return create_app(daemon)


schema.app = _app()


def no_unhandled_error(ctx: Any, response: Any, case: Any) -> bool | None:
    """A 5xx must carry our error body and come from a NydusError, not from a crash."""
    if response.status_code >= 500:
        body = response.json()
        assert set(body) == {"code", "message"}, body
        assert body["code"] != "INTERNAL", f"unhandled exception: {body['message']}"
    return None


@pytest.mark.allow_logs  # the fuzzer provokes many refused requests on purpose
@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_openapi(case: Any) -> None:
    case.call_and_validate(checks=[status_code_conformance, content_type_conformance,
                                   response_schema_conformance, no_unhandled_error])
