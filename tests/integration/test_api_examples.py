"""Runs every ``$ command`` of the README's "HTTP API" section, in order, against a real nydusd and
checks the output shown under it (``...`` matches any text). Keeps the README's curl examples true."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.daemon import LiveDaemon
from tests.harness.images import build_image, make_files

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def api_section() -> str:
    """The README text from its "## HTTP API" heading to the next level-2 heading."""
    text = README.read_text()
    start = text.index("\n## HTTP API\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


def examples(text: str) -> list[tuple[str, str]]:
    """``(command, expected output)`` pairs of the ```console blocks, continuation lines joined."""
    out: list[tuple[str, str]] = []
    for block in re.findall(r"```console\n(.*?)```", text, re.S):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            assert lines[i].startswith("$ "), f"not a command: {lines[i]!r}"
            cmd = lines[i][2:]
            while cmd.endswith("\\"):
                i += 1
                cmd = cmd[:-1] + " " + lines[i].strip()
            i += 1
            expected = []
            while i < len(lines) and not lines[i].startswith("$ "):
                expected.append(lines[i])
                i += 1
            out.append((cmd, "\n".join(expected)))
    return out


def matches(expected: str, actual: str) -> bool:
    pattern = re.escape(expected.strip()).replace(re.escape("..."), ".*")
    return re.fullmatch(pattern, actual.strip(), re.S) is not None


def test_the_page_has_examples() -> None:
    cmds = [c for c, _ in examples(api_section())]
    assert len(cmds) >= 15
    assert all("$SOCK" in c for c in cmds if c.startswith("curl"))
    assert matches('{"a":...,"b":2}', '{"a":[1, 2],"b":2}') and not matches('{"a":1}', '{"a":2}')


@pytest.mark.fuse
def test_examples_run(tmp_path: Path) -> None:
    blobs = tmp_path / "blobs"
    boot = build_image(make_files(tmp_path / "src", {"hello.txt": b"hello from nydus\n"}), blobs).bootstrap
    cache = tmp_path / "cache"
    cache.mkdir()
    config = tmp_path / "config.json"
    device = {"backend": {"type": "localfs", "config": {"dir": str(blobs)}},
              "cache": {"type": "blobcache", "config": {"work_dir": str(cache)}}}
    config.write_text(json.dumps({"device": device, "mode": "direct"}))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sock = tmp_path / "api.sock"
    daemon = LiveDaemon(tmp_path, ["--apisock", str(sock), "--mountpoint", str(mnt), "--log-level", "info"],
                        mnt, sock)
    env = {**os.environ, "SOCK": str(sock), "BOOT": str(boot), "CONFIG": str(config), "MNT": str(mnt),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # nydusctl
    try:
        daemon.start()
        for cmd, expected in examples(api_section()):
            proc = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=30)
            assert proc.returncode == 0, f"{cmd}\n{proc.stderr}"
            assert matches(expected, proc.stdout), f"{cmd}\nexpected:\n{expected}\ngot:\n{proc.stdout}"
        assert daemon.wait_exit(10) == 0  # the last example is PUT /daemon/exit
    finally:
        daemon.stop()
