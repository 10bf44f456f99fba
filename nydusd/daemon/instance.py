"""One mounted RAFS image: ``RafsInstance`` and the factory that assembles it (== nydus-service's
``RafsInstance`` + ``fs_manager``'s create path).

Owns: ``RafsInstance`` (mountpoint, source, config, the ``RafsFs``, its ``FsIoStats``, the backend
and the blob device; ``close`` tears them down in order; ``summary`` is the DaemonInfo
``backend_collection`` entry; ``backend_info`` the superblock summary), ``InstanceFactory`` (what
``Daemon`` calls to build one; tests pass their own), ``build_rafs_instance`` (the default:
bootstrap -> backend -> cache -> device -> ``RafsFs``) and the fs_prefetch walk that warms a new
mount's cache.

Must not import: the API, llfuse, the session modules. Raises NydusErrors only.
Threading: built on the API (or main) thread with no lock held; ``close`` runs once, after the
instance left the Vfs mount table. The prefetch walk runs in its own ``prefetch-<mountpoint>``
thread, stopped by ``close``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from nydusd.config import ConfigV2, PrefetchConfig, RafsConfig
from nydusd.errors import ConfigError, NotFound, NydusError
from nydusd.fs.rafs_fs import RafsFs
from nydusd.log import get_logger
from nydusd.metrics import FsIoStats
from nydusd.rafs import check_servable, load_image
from nydusd.storage.backend import BlobBackend, create_backend
from nydusd.storage.cache import create_cache
from nydusd.storage.device import BlobDevice

log = get_logger(__name__)


@dataclass(eq=False)
class RafsInstance:
    """One mounted image: everything to close when it is unmounted. ``backend``/``device`` are
    None only for instances a test builds without storage."""

    mountpoint: str
    source: str
    fs_type: str
    config: ConfigV2
    fs: RafsFs
    stats: FsIoStats
    backend: BlobBackend | None = None
    device: BlobDevice | None = None
    prefetch_files: list[str] | None = None
    mounted_time: _dt.datetime = field(default_factory=lambda: _dt.datetime.now().astimezone())
    closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self, metadata_guard: AbstractContextManager[None] | None = None) -> None:
        """Stop prefetch, close device/cache/backend, then the image metadata -- the last step under
        ``metadata_guard`` (the FUSE session's quiesce lock) so no handler is reading it. Never
        raises (logs instead). Reads still waiting on the backend fail first, at once."""
        closers = list(self.closers)
        if self.device is not None:
            self._safely(self.device.abort)
            closers.append(self.device.close)
        if self.backend is not None:
            closers.append(self.backend.close)
        for closer in closers:
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

    def backend_info(self) -> dict[str, Any]:
        """``GET /api/v1/daemon/backend``: the superblock summary with this mount's batch size and
        attr/entry timeout."""
        summary: dict[str, Any] = self.fs.sb.summary(
            batch_size=(self.config.rafs or RafsConfig()).batch_size, timeout=self.fs.timeout)
        return summary

    def root_names(self) -> list[bytes]:
        """Names in the image's root directory (the kernel entries to forget when "/" is swapped)."""
        try:
            return [e.name for e in self.fs.readdir(self.fs.root_ino) if e.name not in (b".", b"..")]
        except NydusError:
            return []


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


def _prefetch_config(cfg: ConfigV2) -> PrefetchConfig:
    rafs = cfg.rafs or RafsConfig()
    return rafs.prefetch if rafs.prefetch.enable else cfg.cache.prefetch



