"""Hand-built RAFS data blobs for the storage tests (no builder needed).

``build_blob(files)`` cuts each file into fixed-size chunks, deduplicates them by digest,
compresses them with ``nydusd.compress`` (store-raw rule) and lays them out as upstream does:
payloads back to back, uncompressed offsets advancing by ``align(usize, 4096)``. It returns the
blob bytes, its ``BlobInfo`` and, per file, the ``ChunkInfo`` list in file order.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from nydusd.compress import Compressor, compress
from nydusd.digest import DigestAlgorithm
from nydusd.storage.chunk import CHUNK_FLAG_COMPRESSED, BlobInfo, ChunkInfo


@dataclass
class TestBlob:
    __test__ = False  # not a pytest class

    blob_id: str
    data: bytes
    info: BlobInfo
    files: list[list[ChunkInfo]]
    contents: list[bytes]


def build_blob(contents: list[bytes], *, chunk_size: int = 0x10000,
               compressor: Compressor = Compressor.ZSTD,
               digester: DigestAlgorithm = DigestAlgorithm.BLAKE3, blob_index: int = 0,
               align: int = 4096) -> TestBlob:
    payloads: list[bytes] = []
    by_digest: dict[bytes, ChunkInfo] = {}
    coff = uoff = 0
    files: list[list[ChunkInfo]] = []
    for content in contents:
        chunks: list[ChunkInfo] = []
        for pos in range(0, len(content), chunk_size):
            piece = content[pos:pos + chunk_size]
            digest = digester.hash(piece)
            known = by_digest.get(digest)
            if known is None:
                payload, compressed = compress(piece, compressor)
                known = ChunkInfo(digest=digest, blob_index=blob_index,
                                  flags=CHUNK_FLAG_COMPRESSED if compressed else 0,
                                  compressed_size=len(payload), uncompressed_size=len(piece),
                                  compressed_offset=coff, uncompressed_offset=uoff, file_offset=0,
                                  index=len(by_digest))
                by_digest[digest] = known
                payloads.append(payload)
                coff += len(payload)
                uoff += (len(piece) + align - 1) // align * align
            chunks.append(ChunkInfo(**{**_fields(known), "file_offset": pos}))
        files.append(chunks)
    data = b"".join(payloads)
    blob_id = hashlib.sha256(data).hexdigest()
    info = BlobInfo(blob_id=blob_id, blob_index=blob_index, compressor=compressor, digester=digester,
                    chunk_size=chunk_size, chunk_count=len(by_digest), compressed_size=len(data),
                    uncompressed_size=uoff)
    return TestBlob(blob_id, data, info, files, list(contents))


def _fields(chunk: ChunkInfo) -> dict[str, object]:
    return {name: getattr(chunk, name) for name in ChunkInfo.__slots__}  # type: ignore[attr-defined]


def mixed_content(size: int, seed: int) -> bytes:
    """Deterministic bytes that are partly compressible and partly random (so a blob holds both
    compressed and raw chunks)."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        if rng.random() < 0.5:
            out += rng.randbytes(min(8192, size - len(out)))
        else:
            word = rng.randbytes(16)
            out += (word * 512)[:size - len(out)]
    return bytes(out[:size])
