"""Test runner: a real ``Daemon`` + FUSE session serving several images in a pseudo root, without the
HTTP API (so the shared-daemon path is testable on its own).

``python -m tests.harness.serve MOUNTPOINT THREADS /sub=BOOTSTRAP=CONFIG_FILE ...``"""

from __future__ import annotations

import sys

from nydusd.daemon.service import Daemon
from nydusd.log import configure_logging


def main(argv: list[str]) -> int:
    configure_logging("info")
    mountpoint, threads, specs = argv[0], int(argv[1]), argv[2:]
    daemon = Daemon(mountpoint=mountpoint, threads=threads)
    for spec in specs:
        sub, bootstrap, config = spec.split("=", 2)
        with open(config) as f:
            daemon.mount(sub, bootstrap, f.read())
    return daemon.run()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
