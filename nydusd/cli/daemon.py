"""`nydusd` command line (not implemented yet)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("nydusd: not implemented yet", file=sys.stderr)
    return 2
