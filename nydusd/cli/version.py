"""``--version`` for every command-line tool: upstream's build lines (``Version:``, ``Git Commit:``,
``Build Time:``, ``Profile:``, ``Rustc:``) that nydus-snapshotter and acceleration-service parse.

Owns: ``VersionAction`` (an argparse action printing ``nydusd.daemon.version_text`` for the parser's
prog and exiting). The daemon stack is imported only when the option is used.
"""

from __future__ import annotations

import argparse
from typing import Any


class VersionAction(argparse.Action):
    """``-V/--version``: print the build lines, then exit 0."""

    def __init__(self, option_strings: list[str], dest: str, **kw: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help=kw.get("help") or "print version information")

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from nydusd.daemon import version_text

        print(version_text(parser.prog), end="")
        parser.exit()
