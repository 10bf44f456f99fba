"""File content of a loaded image, read chunk by chunk from blob data (tools and tests).

Owns: ``BlobSource`` (the "read ``size`` bytes at ``offset`` of blob X" callable the readers take),
``LocalBlobs`` (a source over local blob files: a blob directory and/or explicit files, ``os.pread``,
no shared cursor, every range checked against the file size), ``check_range`` / ``bounded`` (the
sanity bound on a requested blob range, for sources over a backend) and ``read_chunk`` /
``iter_file`` / ``read_file`` which decode and verify chunks with
``nydusd.storage.device.decode_chunk``. The daemon reads through storage's BlobDevice instead.

Must not import fs, daemon, builder, storage.backend (callers adapt a backend into a BlobSource).
Threading: LocalBlobs opens each blob file once under a lock; ``os.pread`` is thread-safe.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator

from nydusd.errors import BlobNotFound, CorruptMetadata, IntegrityError
from nydusd.rafs.rafs_super import RafsSuper
from nydusd.storage.device import BlobInfo, ChunkInfo, decode_chunk

BlobSource = Callable[[BlobInfo, int, int], bytes]

#: the largest byte position a blob file can have (``off_t``); metadata pointing beyond it is corrupt
MAX_BLOB_END = (1 << 63) - 1


def check_range(blob: BlobInfo, offset: int, size: int) -> None:
    """Raise CorruptMetadata unless ``[offset, offset + size)`` is a range a blob file can hold."""
    if offset < 0 or size < 0 or offset + size > MAX_BLOB_END:
        raise CorruptMetadata("blob range out of bounds", blob_id=blob.blob_id, offset=offset, size=size)


def bounded(source: BlobSource) -> BlobSource:
    """``source`` with every requested range checked by ``check_range`` first."""
    def read(blob: BlobInfo, offset: int, size: int) -> bytes:
        check_range(blob, offset, size)
        return source(blob, offset, size)
    return read


class LocalBlobs:
    """Blob files on local disk: ``blob_dir/<blob_id>`` and/or explicit ``files``.

    ``files`` maps a blob id to a path; a path given under the key ``"*"`` serves every blob not
    found otherwise (``--blob FILE`` of single-blob images). Raises BlobNotFound for a missing
    blob, CorruptMetadata for a range no file can hold and IntegrityError for a range beyond the
    end of the blob file or a short read.
    """

    def __init__(self, blob_dir: str | None = None, files: dict[str, str] | None = None) -> None:
        self.blob_dir = blob_dir
        self.files = dict(files or {})
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _path(self, blob_id: str) -> str:
        if blob_id in self.files:
            return self.files[blob_id]
        if self.blob_dir is not None:
            path = os.path.join(self.blob_dir, blob_id)
            if os.path.exists(path) or "*" not in self.files:
                return path
        if "*" in self.files:
            return self.files["*"]
        raise BlobNotFound("no blob file or directory given for blob", blob_id=blob_id)

    def _fd(self, blob_id: str) -> int:
        with self._lock:
            fd = self._fds.get(blob_id)
            if fd is None:
                path = self._path(blob_id)
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as e:
                    raise BlobNotFound(f"cannot open blob file: {e.strerror}", blob_id=blob_id,
                                       path=path) from None
                self._fds[blob_id] = fd
            return fd

    def __call__(self, blob: BlobInfo, offset: int, size: int) -> bytes:
        check_range(blob, offset, size)
        fd = self._fd(blob.blob_id)
        file_size = os.fstat(fd).st_size
        if offset + size > file_size:
            raise IntegrityError("blob range beyond the end of the blob file", blob_id=blob.blob_id,
                                 offset=offset, size=size, blob_size=file_size)
        try:
            data = os.pread(fd, size, offset)
        except (OverflowError, ValueError) as e:
            raise CorruptMetadata(f"blob range not readable: {e}", blob_id=blob.blob_id, offset=offset,
                                  size=size) from None
        if len(data) != size:
            raise IntegrityError("short read from blob file", blob_id=blob.blob_id, offset=offset,
                                 size=size, got=len(data))
        return data

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> LocalBlobs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_chunk(source: BlobSource, chunk: ChunkInfo, blob: BlobInfo, verify: bool = True) -> bytes:
    """The plain bytes of ``chunk``. Raises CorruptMetadata (a range no blob can hold) /
    IntegrityError / BackendError / BlobNotFound."""
    check_range(blob, chunk.compressed_offset, chunk.compressed_size)
    payload = source(blob, chunk.compressed_offset, chunk.compressed_size)
    return decode_chunk(payload, chunk, blob, verify)


def iter_file(sb: RafsSuper, ino: int, source: BlobSource, verify: bool = True) -> Iterator[bytes]:
    """The content of regular file ``ino`` as consecutive pieces (bytes not covered by any chunk
    -- holes -- come out as zeros). Total length is exactly the file size."""
    inode = sb.get_inode(ino)
    pos = 0
    for chunk in sb.chunks(ino):
        if chunk.file_offset > pos:
            yield bytes(min(chunk.file_offset, inode.size) - pos)
            pos = min(chunk.file_offset, inode.size)
        if chunk.file_offset < pos or pos >= inode.size:
            continue  # overlapping or beyond EOF: ignore (robust against odd v5 images)
        data = read_chunk(source, chunk, sb.blobs[chunk.blob_index], verify)
        piece = data[:inode.size - pos]
        yield piece
        pos += len(piece)
    if pos < inode.size:
        yield bytes(inode.size - pos)


def read_file(sb: RafsSuper, ino: int, source: BlobSource, verify: bool = True) -> bytes:
    return b"".join(iter_file(sb, ino, source, verify))
