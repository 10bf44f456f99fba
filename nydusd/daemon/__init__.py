"""The nydus service (== nydus-service): the one object the API and the CLI talk to.

- ``service.py``: ``Daemon`` -- state machine, run/stop, signals, DaemonInfo; the threading model.
- ``mounts.py``: ``MountTable`` -- the RAFS instances attached to the ``Vfs``.
- ``instance.py``: ``RafsInstance`` and ``build_rafs_instance`` (bootstrap -> backend -> cache ->
  device -> ``RafsFs``), the fs_prefetch walk.
- ``events.py``: the events ring and the runtime configuration (``/api/v1/config``).
- ``handover.py``: the daemon's side of ``sendfd``/``takeover``; ``upgrade.py``: the supervisor
  wire protocol (also used by ``nydusctl supervise``).

Import the names from their modules; this package re-exports nothing, so importing one of them
(e.g. ``upgrade`` for the supervisor) loads no other. It defines only the stop signals, which the
CLI blocks first thing, before it starts any thread or imports the daemon.
"""

from __future__ import annotations

import signal

#: signals that stop the daemon (llfuse's set: SIGHUP too)
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


def block_stop_signals() -> None:
    """Block the stop signals in the calling thread -- call it in the main thread before any other
    thread starts, so every thread inherits the mask and only ``sigwait`` receives them."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
