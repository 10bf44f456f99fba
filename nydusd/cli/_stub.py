"""Placeholder entry point for tools whose issue has not landed yet."""

from __future__ import annotations

import sys


def not_implemented(tool: str) -> int:
    print(f"{tool}: not implemented yet", file=sys.stderr)
    return 2
