"""The nydus service (== nydus-service): the one object the API and the CLI talk to.

- ``service.py``: ``Daemon`` -- state machine, run/stop, signals, DaemonInfo; the threading model.
- ``mounts.py``: ``MountTable`` -- the RAFS instances attached to the ``Vfs``.
- ``instance.py``: ``RafsInstance`` and ``build_rafs_instance`` (bootstrap -> backend -> cache ->
  device -> ``RafsFs``), the fs_prefetch walk.
- ``events.py``: the events ring and the runtime configuration (``/api/v1/config``).
- ``handover.py``: the daemon's side of ``sendfd``/``takeover``; ``upgrade.py``: the supervisor
  wire protocol (also used by ``nydusctl supervise``).

Import the names from their modules; this package re-exports nothing, so importing one of them
(e.g. ``upgrade`` for the supervisor) loads no other.
"""
