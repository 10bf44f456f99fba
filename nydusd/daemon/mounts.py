"""The daemon's mount table: which ``RafsInstance`` serves which Vfs mountpoint.

Owns: ``MountTable`` -- mount, remount and umount of RAFS instances in the ``Vfs`` (building each
with the instance factory, swapping it into the Vfs, making the kernel forget what a removed image
showed, closing what is gone), the lookup of an instance by mountpoint or config id, and
``Session`` (the part of a FUSE / virtio-fs session the daemon uses, a structural type).

Must not import: the API, llfuse, the session modules. Errors are NydusErrors.
Threading: an instance is built with no lock held except ``lock`` (serialises mount-table changes
between API requests, and lets the hand-over read a consistent table); the Vfs then swaps its
copy-on-write table under its own small lock. ``instances`` is replaced, never mutated, so readers
(metrics, info) need no lock. Kernel invalidations are asynchronous, never waiting on a worker.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any, Protocol

from nydusd.config import ConfigV2, load_config
from nydusd.daemon.events import RuntimeConfig
from nydusd.daemon.instance import InstanceFactory, RafsInstance
from nydusd.errors import AlreadyExists, InvalidArgument, NotFound, NydusError, Unsupported
from nydusd.fs.attrs import ROOT_INO
from nydusd.fs.vfs import Vfs, normalize_path
from nydusd.log import get_logger

log = get_logger(__name__)

PASSTHROUGH_TYPES = ("passthrough", "passthroughfs", "passthrough_fs")


class Session(Protocol):
    """What the daemon needs of a session (``fs/session.py``, ``fs/devfuse.py``, ``virtiofs/server.py``)."""

    ops: Any  # ``ops.inflight.snapshot()``: the requests being served

    def mount(self) -> None: ...

    def run(self) -> str | None: ...

    def stop(self, reason: str) -> None: ...

    def close(self, unmount: bool = True) -> None: ...

    def invalidate_entry(self, parent: int, name: bytes) -> None: ...

    def invalidate_inode(self, ino: int) -> None: ...

    def settle(self) -> None: ...

    def quiesced(self) -> AbstractContextManager[None]: ...


def mountpoint_path(mountpoint: str) -> str:
    """``mountpoint`` as the mount table keys it (the Vfs's rules, ``fs/vfs.py``: absolute, no
    ``.``/``..`` component or NUL, within NAME_MAX/PATH_MAX). Raises InvalidArgument."""
    return normalize_path(mountpoint)


def check_prefetch_paths(paths: list[str] | None) -> None:
    """Raises InvalidArgument (``entry`` in its context) for a ``prefetch_files`` entry that is
    not an absolute path inside the image (relative, a ``..`` component, a NUL)."""
    for entry in paths or ():
        if not entry.startswith("/") or "\0" in entry or ".." in entry.split("/"):
            raise InvalidArgument("prefetch_files entries must be absolute paths without '..'",
                                  entry=entry[:200])


def check_fs_type(fs_type: str) -> None:
    """Raises Unsupported (passthrough) or InvalidArgument (unknown) unless ``fs_type`` is rafs."""
    if fs_type in PASSTHROUGH_TYPES:
        raise Unsupported("passthrough filesystems are not supported", fs_type=fs_type)
    if fs_type != "rafs":
        raise InvalidArgument("unknown fs_type", fs_type=fs_type)


class MountTable:
    """RAFS instances by normalized mountpoint, kept in step with the ``Vfs``."""

    def __init__(self, vfs: Vfs, factory: InstanceFactory, runtime: RuntimeConfig, *,
                 session: Callable[[], Session | None], on_error: Callable[[str], None]) -> None:
        self.vfs = vfs
        self.lock = threading.Lock()
        self.instances: dict[str, RafsInstance] = {}
        self._factory = factory
        self._runtime = runtime
        self._session = session
        self._on_error = on_error
        self._warned_unvalidated = False

    def __iter__(self) -> Iterator[RafsInstance]:
        return iter(self.instances.values())

    def __len__(self) -> int:
        return len(self.instances)

    def get(self, mountpoint: str | None) -> RafsInstance:
        """The instance at ``mountpoint`` (None: the only one). Raises NotFound -- the API renders
        it per route: ``Metrics(Stats(NoCounter))`` for the metrics routes whose callers match on
        that text, ``Other("object or filesystem doesn't exist: ...")`` for /daemon/backend."""
        instances = self.instances
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

    def by_config_id(self, id: str) -> RafsInstance | None:
        return next((i for i in self.instances.values() if i.config.id == id), None)

    def build(self, path: str, source: str, config: str | ConfigV2,
              prefetch_files: list[str] | None) -> RafsInstance:
        """A new instance for ``path`` (not yet in the table). Raises InvalidArgument and what the
        factory raises (recorded in the events ring)."""
        check_prefetch_paths(prefetch_files)
        cfg = load_config(config) if isinstance(config, str) else config
        try:
            return self._factory(path, source, cfg, prefetch_files=prefetch_files)
        except NydusError as e:
            self._on_error(f"mount {path} failed: {e}")
            log.warning("mount_failed", mountpoint=path, source=source, error=str(e))
            raise

    def mount(self, path: str, source: str, config: str | ConfigV2,
              prefetch_files: list[str] | None) -> None:
        """Attach ``source`` at the normalized ``path``. Raises AlreadyExists and as ``build``."""
        with self.lock:
            if path in self.instances:
                raise AlreadyExists("object or filesystem already exists", mountpoint=path)
            inst = self.build(path, source, config, prefetch_files)
            try:
                self.vfs.attach(path, inst.fs, inst.stats)
            except NydusError:
                inst.close()
                raise
            self.instances = {**self.instances, path: inst}
        self._runtime.apply_stored(inst)
        log.info("instance_mounted", mountpoint=path, source=source)
        self._warn_unvalidated(inst)

    def remount(self, path: str, source: str, config: str | ConfigV2,
                prefetch_files: list[str] | None) -> None:
        """Swap the image at ``path`` for ``source`` atomically. Raises NotFound and as ``build``."""
        with self.lock:
            old = self.instances.get(path)
            if old is None:
                raise NotFound("no filesystem mounted here", mountpoint=path)
            inst = self.build(path, source, config, prefetch_files)
            old_root_names = old.root_names() if path == "/" else []
            self.vfs.replace(path, inst.fs, inst.stats)
            self.instances = {**self.instances, path: inst}
        self._invalidate(path, old_root_names)
        old.close(self._quiesced())
        log.info("instance_remounted", mountpoint=path, source=source)
        self._warn_unvalidated(inst)

    def umount(self, path: str) -> None:
        """Detach the image at ``path`` and make the kernel forget it. Raises NotFound."""
        with self.lock:
            inst = self.instances.get(path)
            if inst is None:
                raise NotFound("no filesystem mounted here", mountpoint=path)
            root_names = inst.root_names() if path == "/" else []
            _mount, parent, name = self.vfs.detach(path)
            self.instances = {k: v for k, v in self.instances.items() if k != path}
        session = self._session()
        if session is not None:
            if name:
                session.invalidate_entry(parent, name)
            else:
                self._invalidate(path, root_names)
            session.settle()
        inst.close(self._quiesced())
        log.info("instance_umounted", mountpoint=path)

    def replace_all(self, built: dict[str, RafsInstance]) -> None:
        """Take ``built`` (already attached to the Vfs) as the whole table (a takeover)."""
        with self.lock:
            self.instances = built

    def close_all(self) -> None:
        """Close every instance and empty the table (the Vfs keeps its entries)."""
        with self.lock:
            instances, self.instances = self.instances, {}
        for inst in instances.values():
            inst.close()

    def _warn_unvalidated(self, inst: RafsInstance) -> None:
        """Say once per process (at the first such mount) that chunk data is served unchecked:
        without ``digest_validate``/``cache.validate`` no chunk digest is verified."""
        if self._warned_unvalidated or inst.config.chunk_validation:
            return
        self._warned_unvalidated = True
        log.warning("chunk_digests_unvalidated", mountpoint=inst.mountpoint,
                    detail="chunk digests are not verified (neither rafs.validate/digest_validate "
                           "nor cache.validate is set): corrupted blob or cache data is served as is")

    def _quiesced(self) -> AbstractContextManager[None]:
        session = self._session()
        return session.quiesced() if session is not None else contextlib.nullcontext()

    def _invalidate(self, path: str, root_names: list[bytes]) -> None:
        session = self._session()
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
