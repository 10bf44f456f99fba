"""The upstream rendering of daemon errors (spec interfaces.md §3.2): message chain and status."""

from __future__ import annotations

import pytest

from api.errors import render_daemon_error, rust_str
from nydusd.errors import (
    AlreadyExists,
    BackendError,
    ConfigError,
    CorruptMetadata,
    InvalidArgument,
    NotFound,
    NotReady,
    NydusError,
    Unsupported,
)


class UnexpectedEvent(InvalidArgument):  # the daemon's shape: code + text, no event= context
    code = "UNEXPECTED_EVENT"


@pytest.mark.parametrize("exc, op, wrapper, status, message", [
    (AlreadyExists("object or filesystem already exists"), "Mount", "MountFilesystem", 500,
     'Mount(MountFilesystem(Other("object or filesystem already exists")))'),
    (NotFound("", mountpoint="/a"), "Mount", "MountFilesystem", 500,
     'Mount(MountFilesystem(Other("object or filesystem doesn\'t exist: (mountpoint=/a)")))'),
    (NotReady("busy"), "Mount", "MountFilesystem", 503, "Mount(MountFilesystem(NotReady))"),
    (Unsupported("x"), "Upgrade", "DaemonAbnormal", 501, "Upgrade(DaemonAbnormal(Unsupported))"),
    (UnexpectedEvent('UnexpectedEvent("Start")'), "Configure", "DaemonAbnormal", 400,
     'Configure(DaemonAbnormal(UnexpectedEvent("Start")))'),
    (InvalidArgument("bad", event="Exit"), "Configure", "DaemonAbnormal", 400,
     'Configure(DaemonAbnormal(UnexpectedEvent("Exit")))'),
    (NotFound("gone"), "GlobalMetrics", "MetricsStats", 404, "GlobalMetrics(Metrics(Stats(NoCounter)))"),
    (NotReady(), "InflightMetrics", "MetricsDaemon", 503, "InflightMetrics(Metrics(Daemon(NotReady)))"),
    (NotFound("gone"), "FsBackendInfo", "MetricsDaemon", 500,
     'FsBackendInfo(Metrics(Daemon(Other("object or filesystem doesn\'t exist: gone"))))'),
    (ConfigError("cache.type: bad", field="cache.type"), "Mount", "MountFilesystem", 500,
     'Mount(MountFilesystem(Other("invalid configuration, cache.type: bad (field=cache.type)")))'),
    (CorruptMetadata("bad magic", offset=0), "Mount", "MountFilesystem", 500,
     'Mount(MountFilesystem(Other("bad magic (offset=0)")))'),
    (BackendError("boom"), "Events", "Events", 500, 'Events(Events("boom"))'),
    (NydusError(), "Mount", "MountFilesystem", 500, 'Mount(MountFilesystem(Other("NydusError")))'),
])
def test_render(exc: NydusError, op: str, wrapper: str, status: int, message: str) -> None:
    assert render_daemon_error(exc, op, wrapper) == (status, message)


def test_rust_str_escapes_like_debug() -> None:
    assert rust_str('a "b"\\c\nd') == '"a \\"b\\"\\\\c\\nd"'
