"""``--version`` for every command-line tool: the argparse side of ``nydusd.version``.

Owns: ``VersionAction`` (an argparse action printing ``nydusd.version.version_text`` for the
parser's prog and exiting). ``nydusd.version`` is a leaf, so the option loads no daemon code.
"""

from __future__ import annotations

import argparse
from typing import Any

from nydusd.version import version_text


class VersionAction(argparse.Action):
    """``-V/--version``: print the build lines, then exit 0."""

    def __init__(self, option_strings: list[str], dest: str, **kw: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help=kw.get("help") or "print version information")

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(version_text(parser.prog), end="")
        parser.exit()
