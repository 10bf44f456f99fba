"""Daemon start-up (issue 13, fast start): the start path imports no API stack, converter, builder
or pretty printer, and the daemon logs when each start-up phase ended, in seconds since exec."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.apiclient import ApiClient
from tests.harness.daemon import ROOT, Nydusd
from tests.harness.images import build_daemon_image, sample_tree

#: what ``nydusd`` must not import before it is RUNNING (the API comes up after the mount)
NOT_AT_START = ("api", "fastapi", "starlette", "uvicorn", "rich", "requests", "urllib3",
                "nydusd.converter", "nydusd.builder", "nydusd.oci", "prometheus_client", "pydantic.v1",
                "nydusd.virtiofs", "nydusd.fs.devfuse", "nydusd.daemon.handover")
#: what a daemon serving an image over llfuse with its API up has still not imported: the other
#: sessions, the hand-over, Prometheus (until the first scrape), pydantic's v1 package, the tools
NOT_WHILE_SERVING = tuple(m for m in NOT_AT_START if m not in ("api", "fastapi", "starlette", "uvicorn"))


def test_start_path_imports_only_what_the_mount_needs() -> None:
    # what ``nydusd``/``python -m nydusd`` import, plus what ``run`` and a localfs mount import
    code = ("import sys, nydusd.cli.daemon, nydusd.daemon.service, nydusd.storage.backend.localfs\n"
            "print('\\n'.join(m for m, v in sys.modules.items() if v is not None))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(ROOT)).stdout.split()
    loaded = [m for m in out if any(m == p or m.startswith(p + ".") for p in NOT_AT_START)]
    assert loaded == []


@pytest.mark.fuse
def test_daemon_logs_its_startup_phases_and_imports_only_what_it_serves(tmp_path: Path) -> None:
    image = build_daemon_image(sample_tree(tmp_path / "src", big=False), tmp_path / "img")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sock = str(tmp_path / "api.sock")
    cfg = image.write_config(tmp_path / "cfg.json", tmp_path / "cache")
    log = tmp_path / "log"
    d = Nydusd(["--config", cfg, "--bootstrap", image.bootstrap, "--mountpoint", str(mnt),
                "--apisock", sock, "--log-level", "debug"], mnt, log_path=log, apisock=sock,
               env={"NYDUS_LOG_FORMAT": "json"})
    try:
        d.start()
        assert ApiClient(sock).info()["state"] == "RUNNING"
        d.wait(lambda: '"startup_modules"' in log.read_text(), 15, "the startup_modules event")
    finally:
        d.terminate()
        d.cleanup()
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    phases = [e for e in events if e["event"] == "startup_phase"]
    assert [p["phase"] for p in phases] == ["imported", "image_mounted", "running", "api_socket",
                                            "api_imported", "api_started"]
    # the API stack waited until the daemon was quiet or a request wanted it (not at RUNNING)
    (deferred,) = [e for e in events if e["event"] == "api_import_deferred"]
    assert deferred["until"] in ("quiet", "wanted", "latest")
    times = [p["since_exec_s"] for p in phases]
    assert times[0] > 0 and times == sorted(times)
    # the real process's sys.modules once its API is up (the debug event ``startup_modules``):
    # laziness that regresses (a module-level import of a session, the hand-over, prometheus_client,
    # a lost import guard ...) fails here
    imported = set(next(e for e in events if e["event"] == "startup_modules")["modules"])
    assert {"fastapi", "uvicorn", "api.server", "nydusd.fs.session", "llfuse"} <= imported  # it looked
    loaded = sorted(m for m in imported if any(m == p or m.startswith(p + ".") for p in NOT_WHILE_SERVING))
    assert loaded == []
