"""`nydusctl` against the real API server (uvicorn on a unix socket) with a FakeDaemon, and against a
live nydusd: commands, human-readable tables, --raw JSON, errors and exit codes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.server import ApiServer, start_api_server
from nydusd.cli.ctl import main, table
from tests.api.fakes import FakeDaemon
from tests.harness.daemon import LiveDaemon, snapshotter_config
from tests.harness.images import build_image, make_files


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


@pytest.mark.fuse
def test_against_a_live_daemon(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    boot = build_image(make_files(tmp_path / "src", {"hello.txt": b"hi there\n"}),
                       tmp_path / "blobs").bootstrap
    (tmp_path / "cache").mkdir()
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(snapshotter_config(tmp_path / "blobs", tmp_path / "cache")))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sock = tmp_path / "api.sock"
    d = LiveDaemon(tmp_path, ["--apisock", str(sock), "--mountpoint", str(mnt)], mnt, sock)
    try:
        d.start()
        assert run(capsys, "-S", str(sock), "mount", "-b", str(boot), "-c", str(cfg), "-m", "/s1")[0] == 0
        assert (mnt / "s1" / "hello.txt").read_bytes() == b"hi there\n"
        code, out, _ = run(capsys, "-S", str(sock), "metrics", "--id", "/s1")
        assert code == 0 and "9 B" in out
        code, out, _ = run(capsys, "-S", str(sock), "info")
        assert "/s1" in out and "Rafs" in out
        # two mounts, no --id: every mount's metrics (nydusd itself answers 404 NoCounter here)
        assert run(capsys, "-S", str(sock), "mount", "-b", str(boot), "-c", str(cfg), "-m", "/s2")[0] == 0
        code, out, err = run(capsys, "-S", str(sock), "metrics")
        assert code == 0 and err == "" and "NoCounter" not in out
        blocks = out.split("\n\n")
        assert [b.splitlines()[0] for b in blocks] == ["== /s1 ==", "== /s2 =="], out
        assert "9 B" in blocks[0] and "0 B" in blocks[1]
        code, out, _ = run(capsys, "-S", str(sock), "--raw", "metrics", "backend")
        assert code == 0 and sorted(json.loads(out)) == ["/s1", "/s2"]
        assert run(capsys, "-S", str(sock), "umount", "-m", "/s2")[0] == 0
        assert run(capsys, "-S", str(sock), "umount", "-m", "/s1")[0] == 0
        assert not (mnt / "s1").exists()
    finally:
        d.stop()
