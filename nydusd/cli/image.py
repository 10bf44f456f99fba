"""`nydus-image` command line: a dispatcher over subcommand modules.

``image_query`` owns check / inspect / stat / unpack (format library); ``image_build`` owns create /
merge (builder). Each exposes ``register(subparsers)``; every subcommand sets ``func(args) -> int``.
Errors become an ``error: ...`` line on stderr and the error's exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from nydusd.cli.version import VersionAction
from nydusd.errors import NydusError

SUBCOMMAND_MODULES = ("nydusd.cli.image_build", "nydusd.cli.image_query")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nydus-image",
                                     description="Build, merge, inspect, check and unpack RAFS images")
    parser.add_argument("-V", "--version", action=VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except NydusError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
