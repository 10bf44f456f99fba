"""Fixed-size chunking, hashing, compression and deduplication of file content.

Owns: ``ChunkDict`` (digest -> existing chunk, for dedup within the image, against the parent image
and against a chunk dictionary) and ``ChunkPipeline`` (reads a file stream in ``chunk_size`` pieces,
hashes + compresses them in a thread pool, and hands results to the ``BlobWriter`` in submission
order, so the blob is deterministic).
Must not import rafs. Threading: ``ChunkPipeline`` is driven by one thread (the producer, which
also consumes results in order); worker threads run only ``_digest_and_compress`` (hashlib, blake3,
lz4 and zstandard release the GIL) and touch shared state only through ``_claim`` under
``_claim_lock``. At most ``max_inflight`` pieces are in flight, which bounds memory.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO

from nydusd.builder.blob_writer import BlobWriter
from nydusd.builder.tree import BlobRef, ChunkRef, FileData
from nydusd.compress import Compressor, compress
from nydusd.digest import DigestAlgorithm
from nydusd.errors import BuildError
from nydusd.log import get_logger

log = get_logger(__name__)

# (digest, payload or None when another piece claimed the digest, compressed, size, the raw piece
# when unclaimed)
_Result = tuple[bytes, bytes | None, bool, int, bytes | None]


class ChunkDict:
    """Known chunks by digest. The first chunk recorded for a digest wins."""

    def __init__(self) -> None:
        self._by_digest: dict[bytes, ChunkRef] = {}

    def __len__(self) -> int:
        return len(self._by_digest)

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._by_digest

    def get(self, digest: bytes) -> ChunkRef | None:
        return self._by_digest.get(digest)

    def add(self, ref: ChunkRef) -> None:
        self._by_digest.setdefault(ref.chunk.digest, ref)

    def add_all(self, refs: Iterable[ChunkRef]) -> None:
        for ref in refs:
            self.add(ref)

    def digests(self) -> set[bytes]:
        return set(self._by_digest)


class ChunkStats:
    """Counters reported by a build (``--output-json`` trace and tests)."""

    def __init__(self) -> None:
        self.chunks = 0          # chunk references made by files
        self.new_chunks = 0      # chunks written into the new blob
        self.dedup_chunks = 0    # references satisfied by an existing chunk
        self.bytes_read = 0

    def as_dict(self) -> dict[str, int]:
        return {"chunks": self.chunks, "new_chunks": self.new_chunks,
                "dedup_chunks": self.dedup_chunks, "bytes_read": self.bytes_read}


class ChunkPipeline:
    """Chunk, hash, compress and deduplicate file contents into one blob, in order.

    Use as a context manager; ``add_stream`` per file, then ``finish``. The pool threads are joined
    on exit even when an error escapes.
    """

    def __init__(self, *, chunk_size: int, compressor: Compressor, digester: DigestAlgorithm,
                 writer: BlobWriter, new_blob: BlobRef, chunk_dict: ChunkDict, workers: int) -> None:
        self.chunk_size = chunk_size
        self.compressor = compressor
        self.digester = digester
        self.writer = writer
        self.new_blob = new_blob
        self.dict = chunk_dict
        self.stats = ChunkStats()
        self.max_inflight = max(4, workers * 4)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nydus-chunk")
        self._inflight: deque[tuple[FileData, Future[_Result]]] = deque()
        # digests some worker already compressed (or that exist already): later duplicates skip
        # compression; the consumer falls back to compressing inline if it loses that race.
        self._claimed: set[bytes] = chunk_dict.digests()
        self._claim_lock = threading.Lock()

    def __enter__(self) -> ChunkPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        for _, fut in self._inflight:
            fut.cancel()
        self._inflight.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    # ---------------------------------------------------------------- worker side
    def _claim(self, digest: bytes) -> bool:
        with self._claim_lock:
            if digest in self._claimed:
                return False
            self._claimed.add(digest)
            return True

    def _digest_and_compress(self, piece: bytes) -> _Result:
        digest = self.digester.hash(piece)
        if not self._claim(digest):
            return digest, None, False, len(piece), piece
        payload, compressed = compress(piece, self.compressor)
        return digest, payload, compressed, len(piece), None

    # ---------------------------------------------------------------- producer side
    def add_stream(self, data: FileData, stream: BinaryIO, path: str) -> None:
        """Chunk ``data.size`` bytes read from ``stream`` into ``data.chunks``.

        Raises BuildError when the stream ends before ``data.size`` bytes (a file that shrank
        while the image was being built, a truncated tar) or cannot be read; bytes a file gained
        after it was stat'ed are not read, so the image is the file as of the walk.
        """
        remaining = data.size
        while remaining > 0:
            want = min(self.chunk_size, remaining)
            try:
                piece = _read_exact(stream, want)
            except OSError as e:
                raise BuildError(f"cannot read file: {e.strerror or e}", path=path) from None
            if len(piece) != want:
                raise BuildError("file is shorter than its recorded size (changed while building?)",
                                 path=path, size=data.size, read=data.size - remaining + len(piece))
            remaining -= want
            self.stats.bytes_read += want
            self._inflight.append((data, self._pool.submit(self._digest_and_compress, piece)))
            if len(self._inflight) >= self.max_inflight:
                self._consume_one()

    def finish(self) -> None:
        """Wait for every piece in flight and record it."""
        while self._inflight:
            self._consume_one()

    def _consume_one(self) -> None:
        data, fut = self._inflight.popleft()
        digest, payload, compressed, usize, piece = fut.result()
        self.stats.chunks += 1
        existing = self.dict.get(digest)
        if existing is not None:
            self.stats.dedup_chunks += 1
            data.chunks.append(existing)
            return
        if payload is None:
            # a later piece with the same digest claimed it first (rare race): compress here
            assert piece is not None
            payload, compressed = compress(piece, self.compressor)
        chunk = self.writer.add_chunk(digest, payload, compressed, usize)
        ref = ChunkRef(self.new_blob, chunk)
        self.dict.add(ref)
        self.stats.new_chunks += 1
        data.chunks.append(ref)


def _read_exact(stream: BinaryIO, size: int) -> bytes:
    """Read exactly ``size`` bytes unless the stream ends first (large reads, few copies)."""
    first = stream.read(size)
    if first is None or len(first) == size or not first:
        return first or b""
    parts = [first]
    got = len(first)
    while got < size:
        more = stream.read(size - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)
