"""`nydus-image create` on a terminal: a progress bar (bytes with rate, files done) and a human summary
(entries, bytes in/out, dedup and compression ratio, elapsed); off a terminal only the JSON log line,
and ``-J`` keeps the machine-readable result either way. The terminal is a real pty."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.harness.pty_run import run_on_pty

NYDUS_IMAGE = str(Path(sys.executable).parent / "nydus-image")


def tree(root: Path) -> Path:
    (root / "d").mkdir(parents=True)
    block = os.urandom(1 << 20)
    (root / "d" / "a.bin").write_bytes(block)
    (root / "d" / "same.bin").write_bytes(block)          # a duplicate chunk
    (root / "zeros").write_bytes(b"\0" * (2 << 20))       # two equal chunks that compress well
    (root / "link").symlink_to("zeros")
    return root


def test_terminal_shows_a_bar_and_a_summary(tmp_path: Path) -> None:
    src = tree(tmp_path / "src")
    (tmp_path / "blobs").mkdir()
    code, out = run_on_pty([NYDUS_IMAGE, "create", "--bootstrap", str(tmp_path / "img.boot"),
                            "--blob-dir", str(tmp_path / "blobs"), "-J", str(tmp_path / "out.json"),
                            str(src)])
    assert code == 0, out
    bar = re.findall(r"create: 100%\|[^\r\n]*\| 4\.00M/4\.00M \[[^\]]*B/s, files 3/3\]", out)
    assert bar, out
    summary = out[out.index("Bootstrap:"):].replace("\r\n", "\n")
    assert re.fullmatch(
        r"Bootstrap:   \S+/img\.boot\n"
        r"Blob:        \S+/blobs/([0-9a-f]{64}) \(\1\)\n"
        r"Entries:     6\n"
        r"Bytes in:    4\.0 MiB of file data\n"
        r"Bytes out:   [\d.]+ [KM]iB blob \+ [\d.]+ KiB bootstrap\n"
        r"Dedup:       2 of 4 chunks \(50\.0%\) already stored\n"
        r"Compression: [\d.]+x \(zstd, new chunks' data / blob\)\n"
        r"Elapsed:     [\d.]+s \([\d.]+ [KMG]?i?B/s\)\n", summary), summary
    assert json.loads((tmp_path / "out.json").read_text())["blobs"]


def test_no_terminal_no_bar(tmp_path: Path) -> None:
    src = tree(tmp_path / "src")
    (tmp_path / "blobs").mkdir()
    r = subprocess.run([NYDUS_IMAGE, "create", "--bootstrap", str(tmp_path / "img.boot"), "--blob-dir",
                        str(tmp_path / "blobs"), "-J", str(tmp_path / "out.json"), str(src)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == ""
    assert [json.loads(line)["event"] for line in r.stderr.splitlines()] == ["image_built"]
    assert json.loads((tmp_path / "out.json").read_text())["blobs"]
