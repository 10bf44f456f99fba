"""Fixtures of the real-mount tests: ``fuse_session`` runs a test once per FUSE session (llfuse and
our own ``/dev/fuse`` session), through the environment default of ``--fuse-session``."""

from __future__ import annotations

import pytest

from nydusd.cli.daemon import SESSION_ENV


@pytest.fixture(params=["llfuse", "own"])
def fuse_session(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(SESSION_ENV, request.param)
    return str(request.param)
