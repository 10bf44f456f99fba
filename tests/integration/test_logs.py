"""nydusd's log is one stream: uvicorn's and llfuse's stdlib records go through the same structlog
pipeline as the daemon's events (JSON lines in a file by default), the llfuse ``SessionStop`` line
of every shutdown is gone, and ``NYDUS_LOG_FORMAT=text`` gives upstream's plain
``[timestamp] LEVEL message key=value`` lines."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.harness.apiclient import ApiClient
from tests.harness.daemon import Nydusd
from tests.harness.images import build_daemon_image, sample_tree

pytestmark = pytest.mark.fuse

TEXT_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6} [+-]\d\d:\d\d\] "
                       r"(INFO|WARN \[\w+:\d+\]|ERROR \[\w+:\d+\]|DEBUG \[\w+:\d+\]) \S")


def run_daemon(tmp: Path, env: dict[str, str] | None = None) -> str:
    image = build_daemon_image(sample_tree(tmp / "src", big=False), tmp / "img")
    mnt = tmp / "mnt"
    mnt.mkdir()
    config = image.write_config(tmp / "config.json", tmp / "cache")
    sock = str(tmp / "api.sock")
    args = ["--config", config, "--mountpoint", str(mnt), "--bootstrap", image.bootstrap,
            "--apisock", sock, "--log-level", "info"]
    with Nydusd(args, mnt, log_path=tmp / "nydusd.log", apisock=sock, env=env) as d:
        assert (mnt / "small.txt").read_bytes() == b"hello nydus\n"
        # a route only the full API server answers: uvicorn runs (and logs) before the stop
        assert ApiClient(sock).request("GET", "/api/v1/daemon/events")[0] == 200
        assert d.terminate() == 0
    return (tmp / "nydusd.log").read_text()


def test_every_line_is_json_and_shutdown_is_quiet(tmp_path: Path) -> None:
    out = run_daemon(tmp_path)
    events = [json.loads(line) for line in out.splitlines()]  # a stdlib-format line would fail here
    uvicorn = [e for e in events if e.get("logger", "").startswith("uvicorn")]
    assert any(e["event"].startswith("Started server process") for e in uvicorn)
    assert all({"level", "timestamp"} <= e.keys() for e in events)
    assert "daemon_stopped" in {e["event"] for e in events}
    assert "SessionStop" not in out and "terminating main loop" not in out


def test_upstream_text_form(tmp_path: Path) -> None:
    out = run_daemon(tmp_path, env={"NYDUS_LOG_FORMAT": "text"})
    lines = out.splitlines()
    assert lines and all(TEXT_LINE.match(line) for line in lines), out
    assert any(re.search(r"\] INFO fuse_mounted mountpoint=\S+/mnt threads=\d+$", line) for line in lines)
    assert any(" INFO Started server process [" in line for line in lines)
    assert "SessionStop" not in out
