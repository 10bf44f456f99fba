"""Versions and help of the command-line tools, as a new user (and tools parsing them) see them:
``--version`` carries upstream's ``Version:`` / ``Git Commit:`` lines for nydus-image and nydusify,
``nydusd --help`` lists the subcommands and ``nydusd fuse --help`` is the subcommand's own help,
every ``nydusify check`` / ``mount`` option says what it does."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nydusd.cli.convert import build_parser

BIN = Path(sys.executable).parent


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("argv", [("nydus-image", "--version"), ("nydus-image", "-V"),
                                  ("nydusify", "--version"), ("nydusify", "-v")])
def test_version_lines(argv: tuple[str, ...]) -> None:
    r = run(*argv)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == argv[0]
    # acceleration-service's pattern on nydus-image, nydus-snapshotter's field split
    assert re.search(r"^Version:\s*(v.*)$", r.stdout, re.M)
    assert re.search(r"^Git Commit:\s*\S+$", r.stdout, re.M)
    assert run("nydusd", "--version").stdout.splitlines()[1:] == lines[1:]


def test_nydusd_help_lists_subcommands_and_fuse_help_is_its_own() -> None:
    root = run("nydusd", "--help")
    assert root.returncode == 0
    listed = re.findall(r"^  (\w+) +\S", root.stdout[root.stdout.index("subcommands:"):], re.M)
    assert listed == ["fuse", "virtiofs", "singleton"]
    fuse = run("nydusd", "fuse", "--help")
    assert fuse.returncode == 0
    assert fuse.stdout.startswith("usage: nydusd fuse ")
    assert "serve RAFS images over FUSE at --mountpoint" in fuse.stdout
    assert "subcommands:" not in fuse.stdout and fuse.stdout != root.stdout


@pytest.mark.parametrize("command", ["convert", "check", "mount", "copy"])
def test_every_nydusify_flag_has_help(command: str) -> None:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[command]
    missing = [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]
    assert missing == []
    assert len([a for a in parser._actions if a.option_strings]) >= 10
