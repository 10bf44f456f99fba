"""The nydusd service: lifecycle state machine, mounted RAFS instances, metrics (== nydus-service).

Owns: ``Daemon`` -- the one object the API (``api/``) and the CLI talk to. It owns the ``Vfs`` (the
pseudo root and its mount table), the ``FuseSession``, the RAFS instances (bootstrap + backend +
cache + device + ``RafsFs`` + ``FsIoStats`` per mountpoint) and the state machine of spec §3.3:
INIT -> READY -> RUNNING -> (READY) -> STOPPED. Also ``version_info`` (the ``--version`` fields, the
same ``git_commit`` as ``GET /api/v1/daemon``) and ``build_rafs_instance`` (the default factory).

Must not import: the API (``api/``), llfuse (only ``fs/fuse.py``/``fs/session.py`` do).

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
- mount/umount/remount (API thread): the instance (bootstrap parse, backend, cache) is built with no
  lock held except ``_mount_lock`` (serialises mount-table changes between API requests); the
  ``Vfs`` then swaps its copy-on-write table under its own small lock and the kernel's cache of a
  removed entry is invalidated (asynchronously, never blocking on a worker).
- ``exit()``: the daemon marks "keep the mount" and stops the session (``FuseSession.stop``, which
  may come before, during or after the loop); ``close(unmount=False)`` leaves the kernel mount.
- Failover / hot upgrade (``--supervisor``, own ``/dev/fuse`` session, ``fs/devfuse.py``):
  ``sendfd`` (API thread) pushes the state and the device fd to the supervisor
  (``nydusd/upgrade.py``); in upgrade mode the main thread waits in INIT, ``takeover`` (API
  thread) restores every mount at its old Vfs index and adopts the fd (READY), ``start`` wakes the
  main thread, which serves the adopted session as after a normal mount.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import email.utils
import json
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from nydusd import __version__, upgrade
from nydusd.config import ConfigV2, RafsConfig, load_config
from nydusd.errors import (
    AlreadyExists,
    ConfigError,
    InvalidArgument,
    NotFound,
    NotReady,
    NydusError,
    Unsupported,
    redact_credentials,
)
from nydusd.fs.attrs import ROOT_INO
from nydusd.fs.devfuse import DevFuseSession
from nydusd.fs.fuse import FuseOperations
from nydusd.fs.rafs_fs import RafsFs
from nydusd.fs.session import FuseSession
from nydusd.fs.vfs import Vfs, normalize_path
from nydusd.log import get_logger
from nydusd.metrics import FsIoStats
from nydusd.rafs import check_servable, load_image
from nydusd.storage.backend import create_backend
from nydusd.storage.cache import create_cache
from nydusd.storage.device import BlobDevice
from nydusd.storage.waits import limits as backend_wait_limits
from nydusd.virtiofs.server import VirtioFsServer

log = get_logger(__name__)

INIT, READY, RUNNING, STOPPED = "INIT", "READY", "RUNNING", "STOPPED"
MAX_EVENTS = 500
#: keys ``PUT /api/v1/config`` accepts (spec §3.1)
RUNTIME_CONFIG_KEYS = ("registry_auth", "proxy_url", "dragonfly_scheduler_endpoint")
MAX_EVENTS_SIZE = 50 * 1024
#: signals that stop the daemon (llfuse's set: SIGHUP too)
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


def block_stop_signals() -> None:
    """Block the stop signals in the calling thread -- call it in the main thread before any other
    thread starts, so every thread inherits the mask and only ``sigwait`` receives them."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


#: the superblock summary fields of ``GET /api/v1/daemon/backend`` (spec §3.1)
_BACKEND_INFO_KEYS = ("magic", "version", "sb_size", "root_inode", "chunk_size", "batch_size",
                      "inodes_count", "flags", "inode_table_entries", "inode_table_offset",
                      "blob_table_size", "blob_table_offset", "extended_blob_table_offset",
                      "extended_blob_table_entries", "blob_device_table_count",
                      "blob_device_table_offset", "prefetch_table_offset", "prefetch_table_entries",
                      "attr_timeout", "entry_timeout", "is_chunk_dict", "meta_blkaddr", "root_nid",
                      "chunk_table_offset", "chunk_table_size")


class UnexpectedEvent(InvalidArgument):
    """An event the state machine does not accept in the current state (HTTP 400)."""

    code = "UNEXPECTED_EVENT"


# --------------------------------------------------------------------------------------- version
def _git_commit() -> str:
    """The commit of the checkout this package runs from ("unknown" outside a git checkout)."""
    git = Path(__file__).resolve().parent.parent / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        if (git / ref).is_file():
            return (git / ref).read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return "unknown"


_VERSION: dict[str, str] | None = None


def version_info() -> dict[str, str]:
    """Build info as in DaemonInfo.version; ``git_commit`` equals the ``--version`` Git Commit line."""
    global _VERSION
    if _VERSION is None:
        _VERSION = {"package_ver": f"v{__version__}", "git_commit": _git_commit(),
                    "build_time": "", "profile": "release", "rustc": "python"}
    return dict(_VERSION)


def version_text(prog: str = "nydusd") -> str:
    """The ``--version`` text; ``Version:`` and ``Git Commit:`` start their own lines (spec §1.7)."""
    v = version_info()
    return (f"{prog}\nVersion: \t{v['package_ver']}\nGit Commit: \t{v['git_commit']}\n"
            f"Build Time: \t{v['build_time']}\nProfile: \t{v['profile']}\nRustc: \t\t{v['rustc']}\n")


# -------------------------------------------------------------------------------------- instances
@dataclass(eq=False)
class RafsInstance:
    """One mounted image: everything to close when it is unmounted."""

    mountpoint: str
    source: str
    fs_type: str
    config: ConfigV2
    fs: RafsFs
    stats: FsIoStats
    backend: Any = None
    cache: Any = None
    prefetch_files: list[str] | None = None
    mounted_time: _dt.datetime = field(default_factory=lambda: _dt.datetime.now().astimezone())
    closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self, metadata_guard: AbstractContextManager[None] | None = None) -> None:
        """Stop prefetch, close device/cache/backend, then the image metadata -- the last step under
        ``metadata_guard`` (the FUSE session's quiesce lock) so no handler is reading it. Never
        raises (logs instead). Reads still waiting on the backend fail first, at once."""
        abort = getattr(self.cache, "abort", None)
        if abort is not None:
            self._safely(abort)
        for closer in [*self.closers, getattr(self.cache, "close", None),
                       getattr(self.backend, "close", None)]:
            if closer is not None:
                self._safely(closer)
        with metadata_guard or contextlib.nullcontext():
            self._safely(self.fs.close)

    def _safely(self, closer: Callable[[], None]) -> None:
        try:
            closer()
        except Exception as e:  # noqa: BLE001 - unmount must finish
            log.warning("instance_close_failed", mountpoint=self.mountpoint, error=repr(e))

    def summary(self) -> dict[str, Any]:
        """The ``backend_collection`` entry of DaemonInfo."""
        offset = self.mounted_time.utcoffset() or _dt.timedelta()
        secs = int(offset.total_seconds())
        sign = "-" if secs < 0 else "+"
        secs = abs(secs)
        tz = f"{sign}{secs // 3600:02d}:{secs % 3600 // 60:02d}:{secs % 60:02d}"
        stamp = self.mounted_time.strftime("%Y-%m-%d %H:%M:%S.%f") + " " + tz
        return {"backend_type": "Rafs", "mountpoint": self.mountpoint, "mounted_time": stamp,
                "config": self.config.to_dict(redact=True)}


class InstanceFactory(Protocol):
    def __call__(self, mountpoint: str, source: str, cfg: ConfigV2, *,
                 prefetch_files: list[str] | None) -> RafsInstance: ...


def build_rafs_instance(mountpoint: str, source: str, cfg: ConfigV2, *,
                        prefetch_files: list[str] | None = None) -> RafsInstance:
    """Parse the bootstrap and assemble backend -> cache -> device -> RafsFs for one mount.

    Raises NotFound (no bootstrap file), CorruptMetadata, ConfigError (no backend), Unsupported.
    """
    if not os.path.isfile(source):
        raise NotFound("bootstrap file not found", source=source)
    rafs = cfg.rafs or RafsConfig()
    if cfg.backend is None:
        raise ConfigError("backend: a backend is required to mount an image", field="backend")
    sb = load_image(source)  # a bootstrap, or a data blob with one inlined (upstream accepts both)
    try:
        check_servable(sb)
        backend = create_backend(cfg.backend)
    except BaseException:
        sb.close()
        raise
    try:
        backend.check_blobs([b.blob_id for b in sb.blobs if b.compressed_size])
        cache = create_cache(cfg.cache, backend, digest_validate=rafs.validate,
                             batch_size=rafs.batch_size, id=cfg.id)
        device = BlobDevice(list(sb.blobs), cache, chunk_size=sb.chunk_size or None,
                            batch_size=rafs.batch_size, prefetch_config=_prefetch_config(cfg))
    except BaseException:
        backend.close()
        sb.close()
        raise
    cache.waits.name = mountpoint
    fs = RafsFs(sb, device, enable_xattr=rafs.enable_xattr)
    stats = FsIoStats(mountpoint, files_account=rafs.iostats_files, access_pattern=rafs.access_pattern,
                      latest_read_files=rafs.latest_read_files)
    inst = RafsInstance(mountpoint, source, "rafs", cfg, fs, stats, backend, device, prefetch_files)
    halt_prefetch = fs.start_prefetch(_prefetch_config(cfg), prefetch_files, name=mountpoint)
    if halt_prefetch is not None:
        inst.closers.append(halt_prefetch)
    return inst


def _prefetch_config(cfg: ConfigV2) -> Any:
    rafs = cfg.rafs or RafsConfig()
    return rafs.prefetch if rafs.prefetch.enable else cfg.cache.prefetch


def _root_names(inst: RafsInstance) -> list[bytes]:
    """Names in an image's root directory (the kernel entries to forget when "/" is swapped)."""
    return inst.fs.root_names()


# ----------------------------------------------------------------------------------------- daemon
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
        self.failover_policy = failover_policy
        #: "llfuse" or "own" (fs/devfuse.py: the one that can hand its connection over)
        self.fuse_session = fuse_session
        # own session: file handles start at a fresh base, never colliding with a predecessor's
        self.vfs = Vfs(uid=os.getuid(), gid=os.getgid(), on_error=self.record_error,
                       first_fh=time.time_ns() if fuse_session == "own" else 1)
        self.session: FuseSession | DevFuseSession | VirtioFsServer | None = None
        self._factory = instance_factory
        self._set_log_level = set_log_level
        self._state = INIT
        self._state_lock = threading.Lock()
        self._mount_lock = threading.Lock()
        self._instances: dict[str, RafsInstance] = {}
        self._events: deque[str] = deque(maxlen=MAX_EVENTS)
        self._info_lock = threading.Lock()  # guards the events ring and the runtime config store
        self._runtime_config: dict[str, dict[str, str]] = {}
        self._total_errors = 0
        self._keep_mount = False
        self._stop = threading.Event()
        self._stop_reason = "unmounted"
        self._warned_unvalidated = False
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

    # -- hand-over (supervisor protocol, nydusd/upgrade.py) -----------------------------------

    def sendfd(self) -> None:
        """``PUT /daemon/fuse/sendfd``: push the state and the ``/dev/fuse`` fd to the supervisor.
        Raises NotReady (nothing mounted yet), Unsupported (llfuse/virtio-fs session),
        UpgradeError (no supervisor, supervisor unreachable)."""
        if self.supervisor is None:
            raise upgrade.UpgradeError("no supervisor: start nydusd with --id and --supervisor")
        session = self.session
        if session is None or self._state not in (READY, RUNNING):
            raise NotReady("the FUSE session is not set up yet", state=self._state)
        if not isinstance(session, DevFuseSession) or self.mountpoint is None:
            raise Unsupported("this session cannot hand its FUSE connection over; "
                              "use --fuse-session own (the default with --supervisor)")
        deadline = time.monotonic() + 1.0  # the kernel's INIT is answered right after the mount
        while not session.engine.initialized and time.monotonic() < deadline:
            time.sleep(0.005)
        with self._mount_lock:
            layout = self.vfs.layout()
            mounts = [upgrade.MountState(
                mountpoint=path, index=layout["mounts"][path], source=inst.source,
                config=json.dumps(inst.config.to_dict(redact=False)), fs_type=inst.fs_type,
                prefetch_files=inst.prefetch_files) for path, inst in self._instances.items()]
        state = upgrade.UpgradeState(daemon_id=self.id, mountpoint=self.mountpoint,
                                     fuse=session.engine.export_state(), pseudo=layout["pseudo"],
                                     next_index=layout["next_index"], mounts=mounts)
        upgrade.send_state(self.supervisor, state.encode(), session.fd)

    def takeover(self) -> None:
        """``PUT /daemon/fuse/takeover``: INIT -> READY; fetch state and fd from the supervisor,
        re-create every mount at its old Vfs index and adopt the FUSE connection (served from
        ``start``). Mounts made through the API while in INIT give way to the restored ones.
        Raises UnexpectedEvent (not INIT), UpgradeError, and what a mount raises."""
        with self._takeover_lock:
            if self._state != INIT or self.session is not None:
                raise UnexpectedEvent("UnexpectedEvent(\"Takeover\")", state=self._state)
            if self.supervisor is None or self.mountpoint is None:
                raise upgrade.UpgradeError("no supervisor: start nydusd with --id and --supervisor")
            data, fd = upgrade.fetch_state(self.supervisor)
            try:
                session = self._restore(upgrade.UpgradeState.decode(data), fd)
            except BaseException:
                os.close(fd)
                raise
            with self._state_lock:
                self.session = session
                if self._stop.is_set():
                    session.stop(self._stop_reason)
            self._transition((INIT,), READY, "Takeover")
        log.info("takeover_done", mounts=len(self._instances), supervisor=self.supervisor)

    def _restore(self, state: upgrade.UpgradeState, fd: int) -> DevFuseSession:
        if state.mountpoint != self.mountpoint:
            raise upgrade.UpgradeError("the supervisor's state is for another mountpoint",
                                       state_mountpoint=state.mountpoint, mountpoint=self.mountpoint)
        self.close_instances()  # restore wins over mounts made in INIT (spec: as upstream)
        for path in list(self.vfs.mounts()):
            self.vfs.detach(path)
        built: dict[str, RafsInstance] = {}
        try:
            self.vfs.restore_layout(state.pseudo, state.next_index)
            for m in state.mounts:
                self._check_fs_type(m.fs_type)
                inst = self._build(normalize_path(m.mountpoint), m.source, m.config,
                                   m.prefetch_files)
                built[inst.mountpoint] = inst
                self.vfs.attach(inst.mountpoint, inst.fs, inst.stats, index=m.index)
            session = DevFuseSession(self.vfs, self.mountpoint, threads=self.threads,
                                     writable=self.writable, failover_policy=self.failover_policy)
            session.adopt(fd, state.fuse)
        except BaseException:
            for path, inst in built.items():
                with contextlib.suppress(NydusError):
                    self.vfs.detach(path)
                inst.close()
            raise
        with self._mount_lock:
            self._instances = built
        return session

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

    # -- info -----------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """DaemonInfo (spec §3.3)."""
        return {"version": version_info(), "id": self.id, "supervisor": self.supervisor,
                "state": self._state,
                "backend_collection": {mp: inst.summary() for mp, inst in self._instances.items()}}

    def record_error(self, message: str) -> None:
        """Add one entry to the events ring (``GET /api/v1/daemon/events``). Thread-safe (FUSE
        workers report read failures here with llfuse's lock released)."""
        stamp = email.utils.formatdate(time.time(), usegmt=True)
        with self._info_lock:
            self._events.append(f"{stamp} - {message}")
            self._total_errors += 1
            while sum(len(e) for e in self._events) > MAX_EVENTS_SIZE:
                self._events.popleft()

    def events(self) -> dict[str, Any]:
        """``GET /daemon/events``: ``{max_errors, total_errors, max_size, total_size, errors}``."""
        with self._info_lock:
            errors = list(self._events)
        return {"max_errors": MAX_EVENTS, "total_errors": self._total_errors,
                "max_size": MAX_EVENTS_SIZE, "total_size": sum(len(e) for e in errors),
                "errors": errors}

    def set_config(self, values: dict[str, Any]) -> None:
        """``PUT /api/v1/daemon``: only ``log_level`` is configurable. Raises ConfigError."""
        from nydusd.log import level_number

        level = values.get("log_level")
        if not isinstance(level, str):
            raise ConfigError("log_level: expected a string", field="log_level")
        level_number(level)
        if self._set_log_level is not None:
            self._set_log_level(level.lower())
        log.info("log_level_changed", level=level.lower())

    # -- runtime configuration (/api/v1/config) --------------------------------------------------

    def get_config(self, id: str | None = None) -> dict[str, str]:
        """Stored runtime values: ``{key: value}`` for ``id``, or ``{"<id>:<key>": value}`` for all."""
        with self._info_lock:
            # registry_auth is echoed (nydus-snapshotter's hot-reload contract reads it back);
            # URLs (proxy_url) are shown without their password
            store = {k: {key: value if key == "registry_auth" else redact_credentials(value)
                         for key, value in v.items()} for k, v in self._runtime_config.items()}
        if id is not None:
            return store.get(id, {})
        return {f"{i}:{k}": v for i, values in store.items() for k, v in values.items()}

    def update_config(self, id: str, values: dict[str, Any]) -> None:
        """``PUT /api/v1/config``: store ``registry_auth``/``proxy_url``/``dragonfly_scheduler_endpoint``
        for ``id`` (a mountpoint or config id); a new ``registry_auth`` reaches the registry backend
        of the matching mounts at once (their next request). Raises NydusError for an unknown key
        or a non-string value (HTTP 500, as upstream)."""
        for key, value in values.items():
            if key not in RUNTIME_CONFIG_KEYS:
                raise NydusError(f"unknown configuration key {key!r}", id=id)
            if not isinstance(value, str):
                raise NydusError(f"configuration value of {key!r} must be a string", id=id)
        with self._info_lock:
            self._runtime_config.setdefault(id, {}).update(values)
        for inst in self._instances.values():
            if id in (inst.mountpoint, inst.config.id) or id == "":
                self._apply_runtime_config(inst, values)
        log.info("runtime_config_updated", id=id, keys=sorted(values))

    @staticmethod
    def _apply_runtime_config(inst: RafsInstance, values: dict[str, str]) -> None:
        auth = values.get("registry_auth")
        setter = getattr(inst.backend, "set_credentials", None)
        if auth is not None and setter is not None:
            setter(auth or None)

    def backend_info(self, mountpoint: str | None = None) -> dict[str, Any]:
        """Superblock summary of the image at ``mountpoint`` (``GET /api/v1/daemon/backend``)."""
        inst = self._instance(mountpoint)
        sb = inst.fs.sb
        summary = getattr(sb, "backend_info", None)
        if callable(summary):
            return dict(summary())
        timeout = {"secs": int(inst.fs.timeout), "nanos": 0}
        version = int(getattr(sb, "version", 0))
        info: dict[str, Any] = dict.fromkeys(_BACKEND_INFO_KEYS, 0)
        info.update({
            "magic": 0x52414653 if version == 5 else 0xE0F5E1E2, "version": version << 8,
            "sb_size": 8192 if version == 5 else 128, "root_inode": int(sb.root_ino),
            "chunk_size": int(getattr(sb, "chunk_size", 0)),
            "batch_size": int((inst.config.rafs or RafsConfig()).batch_size),
            "inodes_count": int(getattr(sb, "inode_count", 0)), "flags": int(getattr(sb, "flags", 0)),
            "blob_table_size": len(getattr(sb, "blobs", ())), "attr_timeout": timeout,
            "entry_timeout": timeout, "is_chunk_dict": False,
            "root_nid": int(sb.root_ino) if version == 6 else 0})
        return info

    # -- mounts ---------------------------------------------------------------------------------

    def mounts(self) -> dict[str, dict[str, Any]]:
        return {mp: inst.summary() for mp, inst in self._instances.items()}

    def _instance(self, mountpoint: str | None) -> RafsInstance:
        """The instance at ``mountpoint`` (None: the only one). Raises NotFound -- the API renders
        it per route: ``Metrics(Stats(NoCounter))`` for the metrics routes whose callers match on
        that text, ``Other("object or filesystem doesn't exist: ...")`` for /daemon/backend."""
        instances = self._instances
        if mountpoint is None:
            if len(instances) != 1:
                raise NotFound("no filesystem mounted" if not instances else
                               "several filesystems mounted: name one", mounts=len(instances))
            return next(iter(instances.values()))
        try:
            path = normalize_path(mountpoint)
        except InvalidArgument:
            raise NotFound("no filesystem mounted here", mountpoint=mountpoint) from None
        inst = instances.get(path)
        if inst is None:
            raise NotFound("no filesystem mounted here", mountpoint=mountpoint)
        return inst

    def _check_fs_type(self, fs_type: str) -> None:
        if fs_type in ("passthrough", "passthroughfs", "passthrough_fs"):
            raise Unsupported("passthrough filesystems are not supported", fs_type=fs_type)
        if fs_type != "rafs":
            raise InvalidArgument("unknown fs_type", fs_type=fs_type)

    def _build(self, path: str, source: str, config: str | ConfigV2,
               prefetch_files: list[str] | None) -> RafsInstance:
        for entry in prefetch_files or ():
            if not entry.startswith("/") or "\0" in entry or ".." in entry.split("/"):
                raise InvalidArgument("prefetch_files entries must be absolute paths without '..'",
                                      entry=entry[:200])
        cfg = load_config(config) if isinstance(config, str) else config
        try:
            return self._factory(path, source, cfg, prefetch_files=prefetch_files)
        except NydusError as e:
            self.record_error(f"mount {path} failed: {e}")
            log.warning("mount_failed", mountpoint=path, source=source, error=str(e))
            raise

    def mount(self, mountpoint: str, source: str, config: str | ConfigV2, *, fs_type: str = "rafs",
              prefetch_files: list[str] | None = None) -> None:
        """Attach the image ``source`` at ``mountpoint`` (a path inside the FUSE tree).

        ``config`` is config text (JSON/TOML, v1 or v2) or an already parsed ConfigV2.
        Raises AlreadyExists, NotFound, InvalidArgument, ConfigError, CorruptMetadata, Unsupported.
        """
        self._check_fs_type(fs_type)
        path = normalize_path(mountpoint)
        if self._state == STOPPED:
            raise UnexpectedEvent("UnexpectedEvent(\"Mount\")", state=self._state)
        with self._mount_lock:
            if path in self._instances:
                raise AlreadyExists("object or filesystem already exists", mountpoint=path)
            inst = self._build(path, source, config, prefetch_files)
            try:
                self.vfs.attach(path, inst.fs, inst.stats)
            except NydusError:
                inst.close()
                raise
            self._instances = {**self._instances, path: inst}
        for key in dict.fromkeys(("", inst.config.id, path)):  # most specific last: it wins
            self._apply_runtime_config(inst, self.get_config(key))
        log.info("instance_mounted", mountpoint=path, source=source)
        self._warn_unvalidated(inst)

    def remount(self, mountpoint: str, source: str, config: str | ConfigV2, *, fs_type: str = "rafs",
                prefetch_files: list[str] | None = None) -> None:
        """Swap the image at ``mountpoint`` for ``source`` atomically. Raises NotFound and as mount."""
        self._check_fs_type(fs_type)
        path = normalize_path(mountpoint)
        with self._mount_lock:
            old = self._instances.get(path)
            if old is None:
                raise NotFound("no filesystem mounted here", mountpoint=path)
            inst = self._build(path, source, config, prefetch_files)
            old_root_names = _root_names(old) if path == "/" else []
            self.vfs.replace(path, inst.fs, inst.stats)
            self._instances = {**self._instances, path: inst}
        self._invalidate(path, old_root_names)
        old.close(self._quiesced())
        log.info("instance_remounted", mountpoint=path, source=source)
        self._warn_unvalidated(inst)

    def _warn_unvalidated(self, inst: RafsInstance) -> None:
        """Say once per process (at the first such mount) that chunk data is served unchecked:
        without ``digest_validate``/``cache.validate`` no chunk digest is verified."""
        if self._warned_unvalidated or inst.config.chunk_validation:
            return
        self._warned_unvalidated = True
        log.warning("chunk_digests_unvalidated", mountpoint=inst.mountpoint,
                    detail="chunk digests are not verified (neither rafs.validate/digest_validate "
                           "nor cache.validate is set): corrupted blob or cache data is served as is")

    def umount(self, mountpoint: str) -> None:
        """Detach the image at ``mountpoint`` and make the kernel forget it. Raises NotFound."""
        path = normalize_path(mountpoint)
        with self._mount_lock:
            inst = self._instances.get(path)
            if inst is None:
                raise NotFound("no filesystem mounted here", mountpoint=path)
            root_names = _root_names(inst) if path == "/" else []
            _mount, parent, name = self.vfs.detach(path)
            self._instances = {k: v for k, v in self._instances.items() if k != path}
        if self.session is not None:
            if name:
                self.session.invalidate_entry(parent, name)
            else:
                self._invalidate(path, root_names)
            self.session.settle()
        inst.close(self._quiesced())
        log.info("instance_umounted", mountpoint=path)

    def _quiesced(self) -> AbstractContextManager[None]:
        session = self.session
        return session.quiesced() if session is not None else contextlib.nullcontext()

    def _invalidate(self, path: str, root_names: list[bytes]) -> None:
        session = self.session
        if session is None:
            return
        if path == "/":
            session.invalidate_inode(ROOT_INO)
            for name in root_names:
                session.invalidate_entry(ROOT_INO, name)
        else:
            try:
                parent, name = self.vfs.entry_of(path)
            except NydusError:
                return
            session.invalidate_entry(parent, name)
        session.settle()

    # -- metrics --------------------------------------------------------------------------------

    def metrics_fs(self, id: str | None = None) -> dict[str, Any]:
        return self._instance(id).stats.snapshot()

    def metrics_files(self, id: str | None = None, latest: bool = False) -> Any:
        stats = self._instance(id).stats
        return stats.take_latest_read_files() if latest else stats.files_snapshot()

    def metrics_pattern(self, id: str | None = None) -> list[dict[str, int]]:
        return self._instance(id).stats.pattern_snapshot()

    def metrics_backend(self, id: str | None = None) -> dict[str, Any]:
        inst = self._instance(id)
        if inst.backend is None:
            raise NotFound("this filesystem has no backend", mountpoint=inst.mountpoint)
        return dict(inst.backend.metrics())

    def metrics_blobcache(self, id: str | None = None) -> dict[str, Any]:
        """Blob cache metrics keyed by config id (falls back to the mountpoint)."""
        inst = None
        if id is not None:
            inst = next((i for i in self._instances.values() if i.config.id == id), None)
        if inst is None:
            inst = self._instance(id)
        if inst.cache is None:
            raise NotFound("this filesystem has no blob cache", mountpoint=inst.mountpoint)
        return dict(inst.cache.metrics())

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
        session: FuseSession | DevFuseSession | VirtioFsServer
        _per_mount, shared = backend_wait_limits()
        if self.sock is not None and not self.upgrade:
            # the same reserve as FUSE (below); the pool starts threads only as requests need them
            session = VirtioFsServer(self.vfs, self.sock, threads=self.threads + shared)
        elif self.upgrade or self.mountpoint is None:
            return self._run_idle(on_running)
        elif self.fuse_session == "own":
            # cloned fds lose their in-flight requests with the process: not when handing over;
            # the same reserve as llfuse (below), its workers started only when all are busy
            session = DevFuseSession(self.vfs, self.mountpoint, threads=self.threads,
                                     writable=self.writable, failover_policy=self.failover_policy,
                                     clone_fd=self.supervisor is None, max_threads=self.threads + shared)
        else:
            # --thread-num workers plus one per possible backend wait: a read waiting on a backend
            # holds its worker, and storage/waits.py bounds those waits, so --thread-num workers
            # always stay free for everything else (README of nydusd/fs, "A hung backend")
            session = FuseSession(FuseOperations(self.vfs), self.mountpoint,
                                  threads=self.threads + shared, writable=self.writable,
                                  max_background=2 * (self.threads + shared))
        try:
            session.mount()
        except NydusError:
            self.close_instances()
            raise
        with self._state_lock:
            self.session = session
            if self._stop.is_set():  # a stop that came before the session existed
                session.stop(self._stop_reason)
        self._transition((INIT,), READY, "Mount")
        self._transition((READY,), RUNNING, "Start")
        return self._serve(session, on_running)

    def _serve(self, session: FuseSession | DevFuseSession | VirtioFsServer,
               on_running: Callable[[], None] | None = None) -> int:
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

    def close_instances(self) -> None:
        with self._mount_lock:
            instances, self._instances = self._instances, {}
        for inst in instances.values():
            inst.close()
