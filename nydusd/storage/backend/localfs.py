"""The ``localfs`` backend: blobs are plain files in a directory (or one given file).

Owns: ``LocalFsBackend``. Blob ``<id>`` is ``<dir>/<id>``, then ``<alt_dir>/<id>`` for each of
``alt_dirs``; with ``blob_file`` set every blob id reads that one file (upstream's single-blob mode).
``readahead``/``readahead_sec`` are accepted for compatibility and ignored (the kernel page cache
already reads ahead on these files).

Must not import any HTTP library, cache, rafs or fs.

Threading: file descriptors are opened once per blob and kept in a dict guarded by a lock; reads
use ``os.pread`` which needs no shared file position, so concurrent reads are safe.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from typing import ClassVar

from nydusd.config import LocalFsConfig
from nydusd.errors import BackendError, BlobNotFound, ConfigError, Unsupported
from nydusd.storage.backend.base import BlobBackend, RetryPolicy


class LocalFsBackend(BlobBackend):
    """Read blobs from local files with ``pread``."""

    type: ClassVar[str] = "localfs"

    def __init__(self, cfg: LocalFsConfig, retry: RetryPolicy | None = None) -> None:
        super().__init__(retry)
        self.blob_file: str = cfg.blob_file
        self.dir: str = cfg.dir
        self.alt_dirs: list[str] = list(cfg.alt_dirs)
        if not self.blob_file and not self.dir:
            raise ConfigError("localfs backend needs `dir` or `blob_file`", field="backend.localfs.dir")
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._closed = False

    def _path_candidates(self, blob_id: str) -> list[str]:
        if self.blob_file:
            return [self.blob_file]
        # Blob ids are hex digests; anything that could escape the directory is refused outright.
        if not blob_id or "/" in blob_id or blob_id in (".", "..") or "\0" in blob_id:
            raise BlobNotFound("invalid blob id", blob_id=blob_id)
        return [os.path.join(d, blob_id) for d in [self.dir, *self.alt_dirs] if d]

    def _fd(self, blob_id: str) -> int:
        with self._lock:
            if self._closed:
                raise BackendError("backend is closed", blob_id=blob_id)
            fd = self._fds.get(blob_id)
            if fd is not None:
                return fd
            for path in self._path_candidates(blob_id):
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise BackendError(f"cannot open blob file: {exc.strerror}", path=path,
                                       blob_id=blob_id) from exc
                self._fds[blob_id] = fd
                return fd
        raise BlobNotFound("blob file not found", blob_id=blob_id,
                           path=self.blob_file or os.path.join(self.dir, blob_id))

    def check_blobs(self, blob_ids: list[str]) -> None:
        """Open every blob of the image: a missing file fails the mount instead of every read."""
        for blob_id in blob_ids:
            try:
                self._fd(blob_id)
            except BlobNotFound:
                where = self.blob_file or ", ".join(d for d in [self.dir, *self.alt_dirs] if d)
                raise BlobNotFound(
                    f"localfs blob {blob_id} not found in {where} (point the config's "
                    "backend.config.dir at the directory `nydus-image create --blob-dir` wrote)"
                ) from None

    def try_blob_size(self, blob_id: str) -> int:
        return os.fstat(self._fd(blob_id)).st_size

    def try_read(self, blob_id: str, offset: int, size: int, *, prefetch: bool = False) -> bytes:
        fd = self._fd(blob_id)
        data = os.pread(fd, size, offset)
        # pread may return short for large requests; keep reading until EOF or the full length.
        if len(data) < size and data:
            parts = [data]
            got = len(data)
            while got < size:
                more = os.pread(fd, size - got, offset + got)
                if not more:
                    break
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
        return data

    def try_put(self, blob_id: str, path: str) -> None:
        """Copy ``path`` to ``<dir>/<blob_id>`` atomically (temporary file, fsync, rename)."""
        if self.blob_file or not self.dir:
            raise Unsupported("a localfs backend with `blob_file` cannot store blobs", blob_id=blob_id)
        target = self._path_candidates(blob_id)[0]
        tmp = f"{target}.tmp-{os.getpid()}-{threading.get_ident()}"
        try:
            os.makedirs(self.dir, exist_ok=True)
            shutil.copyfile(path, tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise BackendError(f"cannot store blob file: {exc.strerror or exc}", path=target,
                               blob_id=blob_id) from exc
        # A descriptor opened before the replace still reads the old file: drop it.
        with self._lock:
            stale = self._fds.pop(blob_id, None)
        if stale is not None:
            os.close(stale)

    def is_transient(self, exc: BaseException) -> bool:
        # Local files do not heal by waiting, except for an interrupted system call.
        return isinstance(exc, InterruptedError)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)
        super().close()
