"""The ``nydusd`` entry point: through a warm zygote when ``$NYDUSD_ZYGOTE`` names one (a daemon
then starts in the time of a fork, see ``nydusd/cli/zygote.py``), else in this process.

Must not import at module level: anything but the standard library -- this runs first in every
``nydusd`` start, before the daemon's own imports (or instead of them).
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    path = os.environ.get("NYDUSD_ZYGOTE")
    if path:
        from nydusd.cli.zygote import run_via_zygote

        code = run_via_zygote(path, sys.argv[1:])
        if code is not None:
            return code
    from nydusd.cli.daemon import main as daemon_main

    return daemon_main()


if __name__ == "__main__":
    raise SystemExit(main())
