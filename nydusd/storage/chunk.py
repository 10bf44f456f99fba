"""Chunk and blob descriptors: the value types shared by the format library (rafs), the builder,
the converter and storage (== nydus-storage ``device``'s ``BlobChunkInfo``/``BlobInfo``).

Owns: the chunk flags, ``ChunkInfo`` (one chunk of one blob, as in the 80-byte RAFS chunk
record), ``BlobInfo`` (one entry of a bootstrap's blob table, v5 or v6), ``chunk_key`` and
``decode_chunk`` (payload -> verified plain bytes; ``decode_chunk_into`` the same into a caller's
buffer). Pure values and functions: imports only the leaf modules (compress, digest, errors), so
rafs and the builder can use them without loading the runtime storage stack.

Threading: the value objects are frozen; the functions keep no state.
"""

from __future__ import annotations

from dataclasses import dataclass

from nydusd.compress import Compressor, decompress, decompress_into, whole_bytes
from nydusd.digest import DigestAlgorithm
from nydusd.errors import IntegrityError

CHUNK_FLAG_COMPRESSED = 0x01
CHUNK_FLAG_HOLE = 0x02
CHUNK_FLAG_ENCRYPTED = 0x04
CHUNK_FLAG_BATCH = 0x08
CHUNK_FLAG_HAS_CRC32 = 0x10


@dataclass(frozen=True, slots=True)
class ChunkInfo:
    """One chunk (spec §1.6). ``digest`` is H(uncompressed bytes)."""

    digest: bytes
    blob_index: int
    flags: int
    compressed_size: int
    uncompressed_size: int
    compressed_offset: int
    uncompressed_offset: int
    file_offset: int
    index: int
    crc32: int = 0

    @property
    def is_compressed(self) -> bool:
        return bool(self.flags & CHUNK_FLAG_COMPRESSED)


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """One blob of an image (spec §2.5–2.6 for v5, §3.5 for v6).

    v5 blobs inherit compressor/digester from the superblock; the ``ci_*`` fields locate the v6
    blob-meta chunk-info array inside the blob (zero for v5).
    """

    blob_id: str
    blob_index: int
    compressor: Compressor
    digester: DigestAlgorithm
    chunk_size: int
    chunk_count: int
    compressed_size: int
    uncompressed_size: int
    features: int = 0
    readahead_offset: int = 0
    readahead_size: int = 0
    ci_compressor: Compressor = Compressor.NONE
    ci_offset: int = 0
    ci_compressed_size: int = 0
    ci_uncompressed_size: int = 0
    blob_toc_size: int = 0
    blob_toc_digest: bytes = b"\0" * 32
    blob_meta_digest: bytes = b"\0" * 32
    blob_meta_size: int = 0


def decode_chunk(payload: bytes | memoryview, chunk: ChunkInfo, blob: BlobInfo,
                 verify: bool = True) -> bytes:
    """Turn a chunk's stored payload (``compressed_size`` bytes) into its verified plain bytes.

    Raises IntegrityError when the payload has the wrong length, does not decompress to
    ``uncompressed_size`` bytes, or (with ``verify``) its digest differs from ``chunk.digest``.
    """
    if len(payload) != chunk.compressed_size:
        raise IntegrityError(f"short chunk payload: {len(payload)} of {chunk.compressed_size} bytes",
                             blob_id=blob.blob_id, offset=chunk.compressed_offset)
    if chunk.is_compressed:
        data = decompress(payload, blob.compressor, chunk.uncompressed_size)
    else:
        data = whole_bytes(payload)  # a single-chunk response: no copy
        if len(data) != chunk.uncompressed_size:
            raise IntegrityError("raw chunk size differs from its uncompressed size",
                                 blob_id=blob.blob_id, offset=chunk.compressed_offset)
    if verify and blob.digester.hash(data) != chunk.digest:
        raise IntegrityError("chunk digest mismatch", blob_id=blob.blob_id,
                             offset=chunk.compressed_offset, chunk_index=chunk.index)
    return data


def decode_chunk_into(payload: bytes | memoryview, chunk: ChunkInfo, blob: BlobInfo, out: memoryview,
                      verify: bool = True) -> None:
    """``decode_chunk`` into ``out`` (writable, exactly ``uncompressed_size`` bytes) instead of new
    bytes. Raises IntegrityError like ``decode_chunk`` (``out`` then holds garbage)."""
    if len(payload) != chunk.compressed_size:
        raise IntegrityError(f"short chunk payload: {len(payload)} of {chunk.compressed_size} bytes",
                             blob_id=blob.blob_id, offset=chunk.compressed_offset)
    if len(out) != chunk.uncompressed_size:
        raise ValueError("output buffer does not match the chunk's uncompressed size")
    if chunk.is_compressed:
        try:
            decompress_into(payload, blob.compressor, out)
        except IntegrityError as exc:
            raise IntegrityError(exc.message, blob_id=blob.blob_id, offset=chunk.compressed_offset,
                                 **exc.context) from None
    elif len(payload) != chunk.uncompressed_size:
        raise IntegrityError("raw chunk size differs from its uncompressed size",
                             blob_id=blob.blob_id, offset=chunk.compressed_offset)
    else:
        out[:] = payload
    if verify and blob.digester.hash(out) != chunk.digest:
        raise IntegrityError("chunk digest mismatch", blob_id=blob.blob_id,
                             offset=chunk.compressed_offset, chunk_index=chunk.index)


def chunk_key(chunk: ChunkInfo) -> int:
    """Identity of a chunk's payload inside its blob (deduplicated chunks share it)."""
    return chunk.compressed_offset
