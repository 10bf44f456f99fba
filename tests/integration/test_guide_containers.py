"""docs/containers.md, run verbatim: every ```sh block preceded by ``<!-- guide:run -->`` runs, in
order, in one empty temporary directory, against a real docker-registry, nydusd (registry backend),
overlayfs and runc. The only substitution is the registry port (``127.0.0.1:5000`` -> a free port).
The test then checks what the guide claims: the container printed the image's file, the mount was
lazy (no data blob fetched before the first read), and the clean-up left no mount or process."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.daemon import ROOT, force_unmount, is_mounted
from tests.harness.servers.base import free_port

pytestmark = pytest.mark.fuse

GUIDE = ROOT / "docs" / "containers.md"
MARKER = "<!-- guide:run -->"
TOOLS = ("docker-registry", "umoci", "skopeo", "runc", "curl", "busybox", "mountpoint")


def guide_blocks(text: str) -> list[str]:
    """The bodies of the ```sh blocks right after a ``<!-- guide:run -->`` line, in order."""
    return re.findall(r"^" + re.escape(MARKER) + r"\n```sh\n(.*?)```", text, re.S | re.M)


def test_every_shell_block_of_the_guide_is_marked() -> None:
    text = GUIDE.read_text()
    markers = re.findall(r"^" + re.escape(MARKER) + r"$", text, re.M)
    assert len(guide_blocks(text)) == text.count("```sh") == len(markers) >= 6


def run_block(block: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # background servers write to log files, so the pipes close when the block's shell exits
    return subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=180, stdin=subprocess.DEVNULL)


def kill_pidfile(path: Path) -> None:
    if path.exists():
        try:
            os.kill(int(path.read_text()), 9)
        except (ProcessLookupError, ValueError):
            pass


def test_guide_runs_verbatim(tmp_path: Path) -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {' '.join(missing)} (run scripts/setup.sh)")
    port = free_port()
    home = tmp_path / "home"
    home.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    # skopeo/umoci keep state under $HOME and TMPDIR: keep it in the test's directory
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HOME": str(home),
           "TMPDIR": str(home), "XDG_RUNTIME_DIR": str(home), "XDG_CONFIG_HOME": str(home)}
    outputs: list[str] = []
    try:
        for block in guide_blocks(GUIDE.read_text()):
            r = run_block(block.replace("127.0.0.1:5000", f"127.0.0.1:{port}"), work, env)
            assert r.returncode == 0, f"{block}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"
            outputs.append(r.stdout)
        by_start = {b.splitlines()[0]: out for b, out in zip(guide_blocks(GUIDE.read_text()), outputs,
                                                              strict=True)}
        metrics = by_start["nydusctl -S $PWD/nydusd.sock metrics backend"]
        # lazy: listing the tree read no data blob; the motd read did
        before, motd, after = re.split(r"^(hello from a nydus image)\n", metrics, flags=re.M)
        assert re.search(r"^Reads +0$", before, re.M) and re.search(r"^Read +0 B$", before, re.M), metrics
        reads = re.search(r"^Reads +(\d+)$", after, re.M)
        assert reads is not None and int(reads.group(1)) >= 1, metrics
        runc_out = next(out for b, out in by_start.items() if b.startswith("mkdir -p container"))
        assert "hello from a nydus image\n" in runc_out and runc_out.endswith("written\n"), runc_out
        assert (work / "cache").is_dir() and any((work / "cache").iterdir())
        assert not is_mounted(work / "mnt") and not is_mounted(work / "container" / "rootfs")
    finally:
        if is_mounted(work / "container" / "rootfs"):
            subprocess.run(["umount", "-l", str(work / "container" / "rootfs")], check=False)
        subprocess.run(["runc", "--root", str(work / "runc-state"), "delete", "-f", "demo"],
                       check=False, capture_output=True)
        kill_pidfile(work / "nydusd.pid")
        force_unmount(work / "mnt")
        kill_pidfile(work / "registry.pid")


def test_unsupported_modes_fail_with_the_message_the_guide_quotes() -> None:
    quoted = re.search(r'`nydusd singleton` exits with "([^"]+)"', GUIDE.read_text())
    assert quoted is not None
    r = subprocess.run([sys.executable, "-m", "nydusd", "singleton"], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode != 0 and quoted.group(1) in r.stderr, r.stderr
