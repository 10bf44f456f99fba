"""Shared test fixtures: paths, the structlog capture that fails tests on unexpected warnings and
errors (design R15), and the skip rules for tests that need root or a real FUSE mount.

Server fixtures (docker-registry, tinyproxy, moto, the OSS protocol server) live in
``tests/harness/servers`` and are registered here as a pytest plugin.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import LogCapture

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
UPSTREAM = SHARED / "fixtures" / "upstream" / "tests" / "texture"

pytest_plugins = ["tests.harness.servers.plugin"]


def _fuse_missing() -> str | None:
    if os.geteuid() != 0:
        return "real FUSE mounts need root"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if not (shutil.which("fusermount") or shutil.which("fusermount3")):
        return "fusermount is not installed (apt install fuse3)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    fuse_reason = _fuse_missing()
    for item in items:
        if fuse_reason and "fuse" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=fuse_reason))
        if os.geteuid() != 0 and "root" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="kernel mounts need root"))


@pytest.fixture(scope="session")
def upstream() -> Path:
    """The directory of upstream nydus's real test images (read in place, never copied)."""
    if not UPSTREAM.is_dir():
        pytest.skip(f"upstream fixtures not found at {UPSTREAM}")
    return UPSTREAM


class LogChecker:
    """Collects structlog events; ``expect`` declares warnings/errors a test provokes on purpose."""

    #: warnings every daemon gives under ordinary test configs (tests that care count them)
    ROUTINE = ("chunk_digests_unvalidated",)

    def __init__(self, capture: LogCapture) -> None:
        self.capture = capture
        self.allowed: dict[str, int | None] = dict.fromkeys(self.ROUTINE)

    @contextlib.contextmanager
    def expect(self, event: str, count: int | None = None) -> Iterator[None]:
        before = self.count(event)
        self.allowed[event] = None
        yield
        seen = self.count(event) - before
        if count is None:
            assert seen >= 1, f"expected log event {event!r}, none seen"
        else:
            assert seen == count, f"expected {count} {event!r} events, saw {seen}"

    def count(self, event: str) -> int:
        return sum(1 for e in self.capture.entries if e.get("event") == event)

    def events(self, level: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.capture.entries if level is None or e.get("log_level") == level]

    def unexpected(self) -> list[dict[str, Any]]:
        bad = ("warning", "error", "critical", "exception")
        return [e for e in self.capture.entries
                if e.get("log_level") in bad and e.get("event") not in self.allowed]


@pytest.fixture(autouse=True)
def logs(request: pytest.FixtureRequest) -> Iterator[LogChecker]:
    """Capture structlog output; fail the test on a warning or error it did not declare."""
    capture = LogCapture()
    structlog.configure(processors=[capture], cache_logger_on_first_use=False)
    checker = LogChecker(capture)
    yield checker
    structlog.reset_defaults()
    if "allow_logs" in request.keywords:
        return
    bad = checker.unexpected()
    if bad:
        pytest.fail(f"unexpected warning/error log events: {bad[:5]}")
