"""`make demo`: build a sample image, mount it with nydusd, read it (finished by the daemon work)."""

from __future__ import annotations

import sys


def main() -> int:
    print("demo: not implemented yet (needs nydus-image create and nydusd)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
