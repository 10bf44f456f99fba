"""`nydusd` command line (not implemented yet)."""

from __future__ import annotations

from nydusd.cli._stub import not_implemented


def main(argv: list[str] | None = None) -> int:
    return not_implemented("nydusd")
