"""The nydusd service: ``Daemon``, the one object the API (``api/``) and the CLI talk to
(== nydus-service).

Owns: the state machine of spec §3.3 (INIT -> READY -> RUNNING -> (READY) -> STOPPED), ``run`` (the
session: llfuse, our own ``/dev/fuse`` or virtio-fs) and stop (signals, ``exit``), DaemonInfo, the
log level, and the API's entry points into the mount table (``daemon/mounts.py``), the runtime
configuration and events (``daemon/events.py``) and the hand-over (``daemon/handover.py``).

Must not import: the API; llfuse (only ``fs/fuse.py``/``fs/session.py`` do). The session modules
are imported when ``run`` picks one, the hand-over when it is asked for.

Threading model:
- Main thread: ``Daemon.run`` -> ``FuseSession.mount`` (llfuse.init) -> ``llfuse.main(workers=N)``
  -> ``llfuse.close``; or, with ``sock`` (virtio-fs), ``VirtioFsServer.mount`` (listen) -> ``run``
  (one QEMU connection after another, the mounts surviving each) -> ``close``.
- Signals: SIGTERM/SIGINT/SIGHUP are blocked in every thread (``block_stop_signals``, called by the
  CLI before any thread exists, so all later threads inherit the mask) and taken by one
  ``nydusd-signals`` thread with ``sigwait``, which calls ``request_stop``. So a signal is never lost
  to whichever thread the kernel picks, never kills the process half-way through start-up (the API
  socket appears before the FUSE loop runs), and a second one during shutdown is harmless.
- API thread: uvicorn on the unix socket (started by the CLI through ``run(on_running=...)`` once the
  daemon is RUNNING, so the socket appears only then -- the snapshotter relies on that order).
- FUSE workers: run handlers with llfuse's global lock held; ``fs/fuse.py`` releases it around
  ``Vfs.read`` only, so everything below ``fs`` has its own locks.
- mount/umount/remount (API thread): see ``daemon/mounts.py`` (built with no FUSE lock held, the
  Vfs swaps its copy-on-write table, kernel entries are invalidated asynchronously).
- ``exit()``: the daemon marks "keep the mount" and stops the session (``stop``, which may come
  before, during or after the loop); ``close(unmount=False)`` leaves the kernel mount.
- Failover / hot upgrade (``--supervisor``, own ``/dev/fuse`` session, ``fs/devfuse.py``):
  ``sendfd`` (API thread) pushes the state and the device fd to the supervisor; in upgrade mode
  the main thread waits in INIT, ``takeover`` (API thread) restores every mount at its old Vfs
  index and adopts the fd (READY), ``start`` wakes the main thread, which serves the adopted
  session as after a normal mount.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from nydusd.config import ConfigV2
from nydusd.daemon import STOP_SIGNALS, block_stop_signals
from nydusd.daemon.events import EventLog, RuntimeConfig, apply
from nydusd.daemon.instance import InstanceFactory, RafsInstance, build_rafs_instance
from nydusd.daemon.mounts import MountTable, Session, check_fs_type
from nydusd.daemon.upgrade import UpgradeError
from nydusd.errors import ConfigError, InvalidArgument, NotFound, NotReady, Unsupported
from nydusd.fs.vfs import Vfs, normalize_path
from nydusd.log import get_logger, level_number
from nydusd.version import version_info

log = get_logger(__name__)

INIT, READY, RUNNING, STOPPED = "INIT", "READY", "RUNNING", "STOPPED"
class UnexpectedEvent(InvalidArgument):
    """An event the state machine does not accept in the current state (HTTP 400)."""

    code = "UNEXPECTED_EVENT"


class Daemon:
    """The nydusd service object. Methods are blocking and thread-safe; errors are NydusErrors."""

    def __init__(self, *, mountpoint: str | None = None, threads: int = 4, id: str | None = None,
                 supervisor: str | None = None, upgrade: bool = False, writable: bool = False,
                 failover_policy: str = "resend",
                 instance_factory: InstanceFactory = build_rafs_instance,
                 set_log_level: Callable[[str], None] | None = None,
                 sock: str | None = None, fuse_session: str = "llfuse") -> None:
        self.mountpoint = mountpoint
        #: vhost-user-fs socket: serve the Vfs to a VM (virtio-fs) instead of a FUSE mount
        self.sock = sock
        self.threads = threads
        self.id = id
        self.supervisor = supervisor
        self.upgrade = upgrade
        self.writable = writable
        #: what the own /dev/fuse session asks of the kernel for requests a crash left unanswered
        self.failover_policy = failover_policy
        #: "llfuse" or "own" (fs/devfuse.py: the one that can hand its connection over)
        self.fuse_session = fuse_session
        self.events_log = EventLog()
        self.runtime_config = RuntimeConfig()
        # own session: file handles start at a fresh base, never colliding with a predecessor's
        self.vfs = Vfs(uid=os.getuid(), gid=os.getgid(), on_error=self.record_error,
                       first_fh=time.time_ns() if fuse_session == "own" else 1)
        self.session: Session | None = None
        #: threads the session's loop starts when it runs (0: started as requests need them)
        self.worker_threads = 0
        self.table = MountTable(self.vfs, instance_factory, self.runtime_config,
                                session=lambda: self.session, on_error=self.record_error)
        self._set_log_level = set_log_level
        self._state = INIT
        self._state_lock = threading.Lock()
        self._keep_mount = False
        self._stop = threading.Event()
        self._stop_reason = "unmounted"
        self._wake = threading.Event()  # upgrade mode: stop, or start after a takeover
        self._takeover_lock = threading.Lock()

    # -- state machine --------------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state

    def _transition(self, allowed: tuple[str, ...], to: str, event: str) -> None:
        with self._state_lock:
            if self._state not in allowed:
                raise UnexpectedEvent(f"UnexpectedEvent(\"{event}\")", state=self._state)
            log.info("daemon_state_changed", old=self._state, new=to, trigger=event)
            self._state = to

    def start(self) -> None:
        """``PUT /daemon/start``: READY -> RUNNING (after a takeover: serve the adopted session).
        Raises UnexpectedEvent in any other state."""
        self._transition((READY,), RUNNING, "Start")
        self._wake.set()

    # -- hand-over (supervisor protocol, daemon/upgrade.py) -------------------------------------

    def sendfd(self) -> None:
        """``PUT /daemon/fuse/sendfd``: push the state and the ``/dev/fuse`` fd to the supervisor.
        Raises NotReady (nothing mounted yet), Unsupported (llfuse/virtio-fs session),
        UpgradeError (no supervisor, supervisor unreachable)."""
        from nydusd.daemon.handover import send_to_supervisor
        from nydusd.fs.devfuse import DevFuseSession

        if self.supervisor is None:
            raise UpgradeError("no supervisor: start nydusd with --id and --supervisor")
        session = self.session
        if session is None or self._state not in (READY, RUNNING):
            raise NotReady("the FUSE session is not set up yet", state=self._state)
        if not isinstance(session, DevFuseSession) or self.mountpoint is None:
            raise Unsupported("this session cannot hand its FUSE connection over; "
                              "use --fuse-session own (the default with --supervisor)")
        send_to_supervisor(self.supervisor, self.id, self.mountpoint, session, self.table)

    def takeover(self) -> None:
        """``PUT /daemon/fuse/takeover``: INIT -> READY; fetch state and fd from the supervisor,
        re-create every mount at its old Vfs index and adopt the FUSE connection (served from
        ``start``). Mounts made through the API while in INIT give way to the restored ones.
        Raises UnexpectedEvent (not INIT), UpgradeError, and what a mount raises."""
        from nydusd.daemon.handover import restore_from_supervisor

        with self._takeover_lock:
            if self._state != INIT or self.session is not None:
                raise UnexpectedEvent("UnexpectedEvent(\"Takeover\")", state=self._state)
            if self.supervisor is None or self.mountpoint is None:
                raise UpgradeError("no supervisor: start nydusd with --id and --supervisor")
            session = restore_from_supervisor(
                self.supervisor, self.mountpoint, self.table, threads=self.threads,
                writable=self.writable, failover_policy=self.failover_policy)
            with self._state_lock:
                self.session = session
                if self._stop.is_set():
                    session.stop(self._stop_reason)
            self._transition((INIT,), READY, "Takeover")
        log.info("takeover_done", mounts=len(self.table), supervisor=self.supervisor)

    def exit(self) -> None:
        """``PUT /daemon/exit``: stop serving and leave the process WITHOUT unmounting FUSE."""
        self._transition((INIT, READY, RUNNING), STOPPED, "Exit")
        self._keep_mount = True
        # Let the HTTP reply go out before the loop ends and the process leaves.
        timer = threading.Timer(0.05, self.request_stop, args=("exit",))
        timer.daemon = True
        timer.start()

    def request_stop(self, reason: str = "stop") -> None:
        """Stop serving: ``run`` returns (unmounting unless ``exit()`` asked to keep the mount).
        Thread-safe and idempotent; valid before, during and after the FUSE loop."""
        with self._state_lock:
            if self._stop.is_set():
                return
            self._stop_reason = reason
            self._stop.set()
        session = self.session
        if session is not None:
            session.stop(reason)
        self._wake.set()

    def _watch_signals(self) -> None:
        """Thread: turn each stop signal into ``request_stop`` (the signals are blocked everywhere,
        so ``sigwait`` here is the only receiver)."""
        while True:
            signum = signal.sigwait(STOP_SIGNALS)
            name = signal.Signals(signum).name
            log.info("signal_received", signal=name)
            self.request_stop(f"signal {name}")

    def _start_signal_watcher(self) -> None:
        block_stop_signals()
        threading.Thread(target=self._watch_signals, name="nydusd-signals", daemon=True).start()

    # -- info and configuration ------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """DaemonInfo (spec §3.3)."""
        return {"version": version_info(), "id": self.id, "supervisor": self.supervisor,
                "state": self._state, "backend_collection": self.mounts()}

    def record_error(self, message: str) -> None:
        """Add one entry to the events ring (``GET /api/v1/daemon/events``). Thread-safe (FUSE
        workers report read failures here with llfuse's lock released)."""
        self.events_log.record(message)

    def events(self) -> dict[str, Any]:
        """``GET /daemon/events``: ``{max_errors, total_errors, max_size, total_size, errors}``."""
        return self.events_log.snapshot()

    def set_config(self, values: dict[str, Any]) -> None:
        """``PUT /api/v1/daemon``: only ``log_level`` is configurable. Raises ConfigError."""
        level = values.get("log_level")
        if not isinstance(level, str):
            raise ConfigError("log_level: expected a string", field="log_level")
        level_number(level)
        if self._set_log_level is not None:
            self._set_log_level(level.lower())
        log.info("log_level_changed", level=level.lower())

    def get_config(self, id: str | None = None) -> dict[str, str]:
        """``GET /api/v1/config``: ``{key: value}`` for ``id``, or ``{"<id>:<key>": value}`` for all."""
        return self.runtime_config.get(id)

    def update_config(self, id: str, values: dict[str, Any]) -> None:
        """``PUT /api/v1/config``: store ``registry_auth``/``proxy_url``/``dragonfly_scheduler_endpoint``
        for ``id`` (a mountpoint or config id); a new ``registry_auth`` reaches the registry backend
        of the matching mounts at once (their next request). Raises NydusError for an unknown key
        or a non-string value (HTTP 500, as upstream)."""
        self.runtime_config.update(id, values)
        for inst in self.table:
            if self.runtime_config.matches(id, inst):
                apply(inst, values)
        log.info("runtime_config_updated", id=id, keys=sorted(values))

    def backend_info(self, mountpoint: str | None = None) -> dict[str, Any]:
        """Superblock summary of the image at ``mountpoint`` (``GET /api/v1/daemon/backend``)."""
        return self.table.get(mountpoint).backend_info()

    # -- mounts ---------------------------------------------------------------------------------

    def mounts(self) -> dict[str, dict[str, Any]]:
        return {inst.mountpoint: inst.summary() for inst in self.table}

    def instance(self, mountpoint: str | None = None) -> RafsInstance:
        """The instance at ``mountpoint`` (None: the only one). Raises NotFound."""
        return self.table.get(mountpoint)

    def mount(self, mountpoint: str, source: str, config: str | ConfigV2, *, fs_type: str = "rafs",
              prefetch_files: list[str] | None = None) -> None:
        """Attach the image ``source`` at ``mountpoint`` (a path inside the FUSE tree).

        ``config`` is config text (JSON/TOML, v1 or v2) or an already parsed ConfigV2.
        Raises AlreadyExists, NotFound, InvalidArgument, ConfigError, CorruptMetadata, Unsupported.
        """
        check_fs_type(fs_type)
        path = normalize_path(mountpoint)
        if self._state == STOPPED:
            raise UnexpectedEvent("UnexpectedEvent(\"Mount\")", state=self._state)
        self.table.mount(path, source, config, prefetch_files)

    def remount(self, mountpoint: str, source: str, config: str | ConfigV2, *, fs_type: str = "rafs",
                prefetch_files: list[str] | None = None) -> None:
        """Swap the image at ``mountpoint`` for ``source`` atomically. Raises NotFound and as mount."""
        check_fs_type(fs_type)
        self.table.remount(normalize_path(mountpoint), source, config, prefetch_files)

    def umount(self, mountpoint: str) -> None:
        """Detach the image at ``mountpoint`` and make the kernel forget it. Raises NotFound."""
        self.table.umount(normalize_path(mountpoint))

    def close_instances(self) -> None:
        self.table.close_all()

    # -- metrics --------------------------------------------------------------------------------

    def metrics_fs(self, id: str | None = None) -> dict[str, Any]:
        return self.table.get(id).stats.snapshot()

    def metrics_files(self, id: str | None = None, latest: bool = False) -> Any:
        stats = self.table.get(id).stats
        return stats.take_latest_read_files() if latest else stats.files_snapshot()

    def metrics_pattern(self, id: str | None = None) -> list[dict[str, int]]:
        return self.table.get(id).stats.pattern_snapshot()

    def metrics_backend(self, id: str | None = None) -> dict[str, Any]:
        inst = self.table.get(id)
        if inst.backend is None:
            raise NotFound("this filesystem has no backend", mountpoint=inst.mountpoint)
        return dict(inst.backend.metrics())

    def metrics_blobcache(self, id: str | None = None) -> dict[str, Any]:
        """Blob cache metrics keyed by config id (falls back to the mountpoint)."""
        inst = self.table.by_config_id(id) if id is not None else None
        if inst is None:
            inst = self.table.get(id)
        if inst.device is None:
            raise NotFound("this filesystem has no blob cache", mountpoint=inst.mountpoint)
        return dict(inst.device.metrics())

    def serving(self) -> bool:
        """Whether a FUSE (or virtio-fs) request is being served at this moment. Cheap: no lock."""
        session = self.session
        return session is not None and bool(session.ops.inflight.slots)

    def metrics_inflight(self) -> list[dict[str, Any]]:
        """Requests currently being served (empty list -> HTTP 204)."""
        session = self.session
        return session.ops.inflight.snapshot() if session is not None else []

    # -- lifecycle (main thread) ----------------------------------------------------------------

    def run(self, on_running: Callable[[], None] | None = None) -> int:
        """Serve until stopped; returns the process exit code. Main thread only.

        Normal start: FUSE mount -> READY -> RUNNING -> ``on_running`` (the API server) -> serve.
        Upgrade mode: stay INIT, start the API, wait for exit or a signal.
        """
        self._start_signal_watcher()
        if self.upgrade or (self.mountpoint is None and self.sock is None):
            return self._run_idle(on_running)
        session = self._new_session()
        try:
            session.mount()
        except BaseException:
            self.close_instances()
            raise
        with self._state_lock:
            self.session = session
            if self._stop.is_set():  # a stop that came before the session existed
                session.stop(self._stop_reason)
        self._transition((INIT,), READY, "Mount")
        self._transition((READY,), RUNNING, "Start")
        return self._serve(session, on_running)

    def _new_session(self) -> Session:
        """The session ``run`` serves: virtio-fs with ``sock``, else FUSE at ``mountpoint`` over
        llfuse or our own ``/dev/fuse`` engine. Imported here: a daemon loads only its own."""
        from nydusd.storage.waits import limits as backend_wait_limits

        _per_mount, shared = backend_wait_limits()
        if self.sock is not None:
            from nydusd.virtiofs.server import VirtioFsServer

            # the same reserve as FUSE (below); the pool starts threads only as requests need them
            return VirtioFsServer(self.vfs, self.sock, threads=self.threads + shared)
        assert self.mountpoint is not None
        if self.fuse_session == "own":
            from nydusd.fs.devfuse import DevFuseSession

            self.worker_threads = self.threads  # started up front; the reserve only when all are busy
            # cloned fds lose their in-flight requests with the process: not when handing over;
            # the same reserve as llfuse (below), its workers started only when all are busy
            return DevFuseSession(self.vfs, self.mountpoint, threads=self.threads,
                                  writable=self.writable, failover_policy=self.failover_policy,
                                  clone_fd=self.supervisor is None, max_threads=self.threads + shared)
        from nydusd.fs.fuse import FuseOperations
        from nydusd.fs.session import FuseSession

        # --thread-num workers plus one per possible backend wait: a read waiting on a backend
        # holds its worker, and storage/waits.py bounds those waits, so --thread-num workers
        # always stay free for everything else (README of nydusd/fs, "A hung backend")
        self.worker_threads = self.threads + shared
        return FuseSession(FuseOperations(self.vfs), self.mountpoint,
                           threads=self.threads + shared, writable=self.writable,
                           max_background=2 * (self.threads + shared))

    def _serve(self, session: Session, on_running: Callable[[], None] | None = None) -> int:
        try:
            if on_running is not None:
                on_running()
            reason = session.run()
        finally:
            keep = self._keep_mount
            with self._state_lock:
                self._state = STOPPED
            session.close(unmount=not keep)
            self.close_instances()
        log.info("daemon_stopped", reason=reason or "unmounted", kept_mount=keep)
        return 0

    def _run_idle(self, on_running: Callable[[], None] | None) -> int:
        """Upgrade mode: INIT until a takeover and ``start`` (then serve) or a stop."""
        try:
            if on_running is not None:
                on_running()
            while True:
                self._wake.wait()
                self._wake.clear()
                if self._stop.is_set():
                    break
                if self._state == RUNNING and self.session is not None:
                    return self._serve(self.session)
        except BaseException:
            session = self.session
            if session is not None:
                session.close(unmount=False)
            raise
        with self._state_lock:
            self._state = STOPPED
        session = self.session
        if session is not None:  # stopped after a takeover, before start
            session.close(unmount=not self._keep_mount)
        self.close_instances()
        return 0
