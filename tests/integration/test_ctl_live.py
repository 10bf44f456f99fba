"""`nydusctl` against a live nydusd (a real FUSE mount): mount, metrics of one and of every mount,
info, --raw JSON and umount."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.api.test_ctl import run
from tests.harness.daemon import LiveDaemon, snapshotter_config
from tests.harness.images import build_image, make_files


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
