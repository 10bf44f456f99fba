"""`nydusify convert` output: on a terminal (a real pty) one display -- tqdm bars per layer phase and
the log lines printed above them, never spliced into a bar's line; off a terminal JSON events only."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.converter.conftest import Image
from tests.harness.oci_registry import Registry
from tests.harness.pty_run import run_on_pty

NYDUSIFY = str(Path(sys.executable).parent / "nydusify")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def convert_args(registry: Registry, source_image: Image, tag: str, tmp: Path) -> list[str]:
    return [NYDUSIFY, "convert", "--source", source_image.ref, "--source-insecure",
            "--target", f"{registry.host}/dst/texture:{tag}", "--target-insecure",
            "--work-dir", str(tmp / "w")]


def test_terminal_gets_bars_with_log_lines_above(registry: Registry, source_image: Image,
                                                 tmp_path: Path) -> None:
    code, raw = run_on_pty(convert_args(registry, source_image, "tty", tmp_path))
    assert code == 0, raw
    out = ANSI.sub("", raw)
    assert re.search(r"pull +[0-9a-f]{12}[^\r\n]*100%\|", out), out
    assert re.search(r"push +[0-9a-f]{12}[^\r\n]*100%\|", out), out
    # log lines are the console form and each starts its own line (tqdm.write clears the bars first)
    logs = [seg for seg in re.split(r"[\r\n]+", out) if "layer_phase_finished" in seg]
    line = re.compile(r"\d{4}-\d\d-\d\dT[\d:.]+Z \[info +\] layer_phase_finished")
    assert logs and all(line.match(s) for s in logs), logs
    assert not re.search(r"\|[^\r\n|]*(B/s|it/s)[^\r\n]*layer_phase", out)
    assert '{"' not in out
    assert "converted " in out


def test_no_terminal_json_events_only(registry: Registry, source_image: Image, tmp_path: Path) -> None:
    r = subprocess.run(convert_args(registry, source_image, "pipe", tmp_path), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stderr.splitlines()]
    assert {"layer_phase_started", "layer_phase_finished"} <= {e["event"] for e in events}
    assert "%|" not in r.stderr
