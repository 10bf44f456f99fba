"""`nydusctl` against the real API server (uvicorn on a unix socket) with a FakeDaemon: commands,
human-readable tables, --raw JSON, errors and exit codes (against a live nydusd:
tests/integration/test_ctl_live.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.server import ApiServer, start_api_server
from nydusd.cli.ctl import main, table
from tests.harness.fakes.daemon import FakeDaemon


@pytest.fixture
def served(tmp_path: Path, daemon: FakeDaemon) -> Iterator[tuple[str, FakeDaemon]]:
    sock = tmp_path / "api.sock"
    handle: ApiServer = start_api_server(daemon, str(sock))
    try:
        yield str(sock), daemon
    finally:
        handle.stop()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_table_alignment() -> None:
    assert table([("a", 1), ("long", 22)], ("K", "V")).splitlines() == ["K     V", "----  --", "a     1",
                                                                       "long  22"]


def test_info_mount_metrics_umount(served: tuple[str, FakeDaemon], capsys: pytest.CaptureFixture[str],
                                   bootstrap: Path, config_text: str, tmp_path: Path) -> None:
    sock, daemon = served
    cfg = tmp_path / "cfg.json"
    cfg.write_text(config_text)
    code, out, _ = run(capsys, "--sock", sock, "info")
    assert code == 0 and "RUNNING" in out and "No filesystem mounted." in out
    code, out, _ = run(capsys, "-S", sock, "mount", "-b", str(bootstrap), "-c", str(cfg), "-m", "/img")
    assert code == 0 and out == f"Mounted {bootstrap} at /img\n"
    assert daemon.calls[-1] == ("mount", "/img", str(bootstrap), config_text, "rafs", None)
    code, out, _ = run(capsys, "-S", sock, "info")
    assert "MOUNTPOINT" in out and "/img" in out and "localfs" in out
    daemon.read("/img", ino=4, size=2048)
    code, out, _ = run(capsys, "-S", sock, "metrics")
    assert code == 0
    rows = dict(line.split(None, 1) if " " in line else (line, "") for line in out.splitlines())
    assert "2.0 KiB" in out and "read=1" in out and rows["ID"].strip() == "/img"
    code, out, _ = run(capsys, "-S", sock, "--raw", "metrics", "backend", "--id", "/img")
    assert json.loads(out)["read_count"] == 1
    code, out, _ = run(capsys, "-S", sock, "metrics", "cache", "--id", "/img", "-I", "0.01", "--count", "3")
    assert out.count("Whole hits") == 3
    code, out, _ = run(capsys, "-S", sock, "metrics", "inflight")
    assert out == "No request in flight.\n"
    code, out, _ = run(capsys, "-S", sock, "umount", "-m", "/img")
    assert code == 0 and daemon.mounts() == {}
    code, out, _ = run(capsys, "-S", sock, "set", "log-level", "debug")
    assert code == 0 and daemon.log_level == "debug"


def test_errors_are_reported(served: tuple[str, FakeDaemon], capsys: pytest.CaptureFixture[str],
                             tmp_path: Path) -> None:
    sock, _ = served
    code, out, err = run(capsys, "-S", sock, "umount", "-m", "/ghost")
    assert code == 1 and out == ""
    assert "umount failed: Mount(MountFilesystem(Other(\"object or filesystem doesn't exist" in err
    assert "(HTTP 500)" in err
    code, _, err = run(capsys, "-S", sock, "metrics", "--id", "/nope")
    assert code == 1 and "GlobalMetrics(Metrics(Stats(NoCounter)))" in err
    assert "nydusctl: no metrics under id '/nope'; pass --id <mountpoint> of a mounted filesystem" in err
    code, _, err = run(capsys, "-S", sock, "mount", "-b", "/x", "-c", str(tmp_path / "none.json"), "-m", "/a")
    assert code == 1 and "cannot read config file" in err
    code, _, err = run(capsys, "-S", str(tmp_path / "no.sock"), "info")
    assert code == 1 and "cannot talk to nydusd" in err
