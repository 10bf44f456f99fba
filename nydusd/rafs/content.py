"""File content of a loaded image, read chunk by chunk from blob data (tools and tests).

Owns: ``BlobSource`` (the "read ``size`` bytes at ``offset`` of blob X" callable the readers take),
``LocalBlobs`` (a source over local blob files: a blob directory and/or explicit files, ``os.pread``,
no shared cursor, every range checked against the file size), ``check_range`` / ``bounded`` (the
sanity bound on a requested blob range, for sources over a backend) and ``read_chunk`` /
``iter_file`` / ``read_file`` which decode and verify chunks with
``nydusd.storage.chunk.decode_chunk``, and ``file_chunks`` (a regular file's chunk list checked
against its size: a v5 file without the hole flag has exactly ``ceil(size / chunk_size)`` chunks,
as upstream's v5 inode validation requires, and no chunk reaches past the end of its file).
Holes are produced ``ZERO_PIECE`` bytes at a time, so memory stays bounded whatever size an inode
claims. The daemon reads through storage's BlobDevice instead.

Must not import fs, daemon, builder, storage.backend (callers adapt a backend into a BlobSource).
Threading: LocalBlobs opens each blob file once under a lock; ``os.pread`` is thread-safe.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator

from nydusd.errors import BlobNotFound, CorruptMetadata, IntegrityError
from nydusd.rafs.rafs_super import Inode, RafsSuper
from nydusd.storage.chunk import BlobInfo, ChunkInfo, decode_chunk

BlobSource = Callable[[BlobInfo, int, int], bytes]

#: the largest piece of zeros ``iter_file`` produces for a hole
ZERO_PIECE = 1 << 20
_ZEROS = bytes(ZERO_PIECE)

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


def file_chunks(sb: RafsSuper, inode: Inode) -> list[ChunkInfo]:
    """The chunks of regular file ``inode``; CorruptMetadata when they do not fit its size (see
    the module docstring)."""
    chunks = sb.chunks(inode.ino)
    if sb.version == 5 and not inode.has_hole:
        want = -(-inode.size // sb.chunk_size)
        if want != len(chunks):
            raise CorruptMetadata("file size does not match its chunk count", field="i_size",
                                  offset=inode.meta_offset, ino=inode.ino, size=inode.size,
                                  chunks=len(chunks), expected_chunks=want)
    for c in chunks:
        if c.file_offset + c.uncompressed_size > inode.size:
            raise CorruptMetadata("chunk reaches past the end of its file", field="file_offset",
                                  ino=inode.ino, size=inode.size, file_offset=c.file_offset,
                                  chunk_size=c.uncompressed_size)
    return chunks


def _zeros(size: int) -> Iterator[bytes | memoryview]:
    view = memoryview(_ZEROS)
    while size > 0:
        n = min(size, ZERO_PIECE)
        yield view[:n]
        size -= n


def iter_file(sb: RafsSuper, ino: int, source: BlobSource, verify: bool = True,
              chunks: list[ChunkInfo] | None = None) -> Iterator[bytes | memoryview]:
    """The content of regular file ``ino`` as consecutive pieces (bytes not covered by any chunk
    -- holes -- come out as zeros, at most ``ZERO_PIECE`` at a time). Total length is exactly the
    file size. ``chunks``: the file's ``file_chunks`` when the caller has them already."""
    inode = sb.get_inode(ino)
    pos = 0
    for chunk in file_chunks(sb, inode) if chunks is None else chunks:
        if chunk.file_offset < pos:
            continue  # overlapping: ignore (robust against odd v5 images)
        yield from _zeros(chunk.file_offset - pos)
        data = read_chunk(source, chunk, sb.blobs[chunk.blob_index], verify)
        yield data
        pos = chunk.file_offset + len(data)
    yield from _zeros(inode.size - pos)


def read_file(sb: RafsSuper, ino: int, source: BlobSource, verify: bool = True) -> bytes:
    return b"".join(iter_file(sb, ino, source, verify))
