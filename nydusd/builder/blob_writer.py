"""Data blob output: chunk payloads appended sequentially, then the v6 blob trailer.

Owns: ``BlobWriter`` (appends payloads, assigns chunk ``index`` / compressed and uncompressed
offsets, keeps the running SHA-256 that becomes the blob id, spec §4.1) and the trailer segments of
spec §4.3-4.6: ``blob.meta`` (chunk-info v1 array + 4096-byte header), GNU tar headers after each
segment, ``blob.digest``, an inlined bootstrap ``image.boot`` and the ``rafs.blob.toc``.
The output is written strictly sequentially (never seeks), so ``out`` may be a FIFO.
Must not import rafs beyond ``rafs.layout`` / ``rafs.blobmeta`` (record shapes and codecs).
Threading: one thread drives a writer.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import BinaryIO

from nydusd.compress import Compressor, compress
from nydusd.digest import DigestAlgorithm
from nydusd.errors import BuildError
from nydusd.rafs import blobmeta
from nydusd.rafs import layout as L
from nydusd.storage.chunk import CHUNK_FLAG_COMPRESSED, BlobInfo, ChunkInfo

BLOB_META_HEADER_SIZE = 4096
INLINE_PLACEHOLDER_ID = "x" * 64


def tar_header(name: bytes, size: int) -> bytes:
    """The 512-byte GNU tar header upstream writes after a blob segment (spec §4.4)."""
    return blobmeta.tar_header(name.decode(), size)


@dataclass
class _Segment:
    name: bytes
    flags: int
    sha256: bytes
    offset: int
    size: int
    usize: int


class BlobWriter:
    """Append chunk payloads to ``out`` and finish the blob (v5: payloads only; v6: + trailer).

    ``out`` is written sequentially; the caller owns it (temp file or FIFO) and renames/closes it.
    """

    def __init__(self, out: BinaryIO, *, fs_version: int, compressor: Compressor,
                 digester: DigestAlgorithm, chunk_size: int, aligned: bool, blob_toc: bool = False,
                 inline_meta: bool = False) -> None:
        self.out = out
        self.fs_version = fs_version
        self.compressor = compressor
        self.digester = digester
        self.chunk_size = chunk_size
        self.aligned = aligned
        self.blob_toc = blob_toc and fs_version == 6
        self.inline_meta = inline_meta
        self.chunks: list[ChunkInfo] = []
        self.offset = 0                 # bytes written so far
        self.uncompressed_size = 0      # next uncompressed offset
        self._id_hash = hashlib.sha256()  # blob id: everything but the blob.digest payload
        self._file_hash = hashlib.sha256()  # the whole file (the registry digest of the layer)
        self._segments: list[_Segment] = []

    @property
    def tar_headers(self) -> bool:
        # v5 blobs get tar headers only to carry an inlined bootstrap (found by walking backwards)
        return self.blob_toc or self.inline_meta

    @property
    def features(self) -> int:
        # upstream marks every blob it builds (v5 too) with CAP_TAR_TOC ("built by nydus-image >= 2.2")
        f = L.BLOB_CAP_TAR_TOC | (L.BLOB_ALIGNED if self.aligned else 0)
        if self.tar_headers:
            f |= L.BLOB_HAS_TAR_HEADER
        if self.blob_toc:
            f |= L.BLOB_HAS_TOC | L.BLOB_INLINED_CHUNK_DIGEST
        if self.inline_meta:
            f |= L.BLOB_INLINED_FS_META
        return f

    def _write(self, data: bytes, hashed: bool = True) -> None:
        try:
            self.out.write(data)
        except OSError as e:
            raise BuildError(f"cannot write blob: {e.strerror}") from None
        if hashed:
            self._id_hash.update(data)
        self._file_hash.update(data)
        self.offset += len(data)

    def add_chunk(self, digest: bytes, payload: bytes, compressed: bool, usize: int) -> ChunkInfo:
        """Append one payload; returns its record (``blob_index`` 0, ``file_offset`` 0)."""
        chunk = ChunkInfo(digest=digest, blob_index=0, flags=CHUNK_FLAG_COMPRESSED if compressed else 0,
                          compressed_size=len(payload), uncompressed_size=usize,
                          compressed_offset=self.offset, uncompressed_offset=self.uncompressed_size,
                          file_offset=0, index=len(self.chunks))
        self._write(payload)
        self.chunks.append(chunk)
        self.uncompressed_size += L.align(usize, 4096) if self.aligned else usize
        return chunk

    # ------------------------------------------------------------------ trailer
    def _segment(self, name: bytes, data: bytes, *, flags: int = 1, usize: int | None = None,
                 sha: bytes | None = None, hashed: bool = True) -> None:
        offset = self.offset
        self._write(data, hashed)
        if self.tar_headers:
            self._write(tar_header(name, len(data)))
        self._segments.append(_Segment(name, flags, sha or hashlib.sha256(data).digest(), offset,
                                       len(data), len(data) if usize is None else usize))

    def blob_info(self, blob_id: str, blob_index: int = 0) -> BlobInfo:
        """The blob table entry for this blob (after ``finish_data``). Its ``compressed_size`` is
        the blob size written so far, as upstream records it: the whole file after ``finish``, or
        everything before the inlined bootstrap."""
        return replace(self._info, blob_id=blob_id, blob_index=blob_index, compressed_size=self.offset)

    def finish_data(self) -> None:
        """Write everything that precedes an inlined bootstrap: the ``image.blob`` tar header and, for
        v6, ``blob.meta`` and ``blob.digest``. Fixes the fields of ``blob_info``."""
        data_size = self.offset
        ci = {"ci_compressor": Compressor.NONE, "ci_offset": 0, "ci_compressed_size": 0,
              "ci_uncompressed_size": 0}
        if self.tar_headers:
            self._write(tar_header(b"image.blob", data_size))
            blob_sha = self._id_hash.copy().digest()
            self._segments.append(_Segment(b"image.blob", 1, blob_sha, 0, data_size,
                                           self.uncompressed_size))
        if self.fs_version == 6:
            ci = self._write_blob_meta()
        if self.blob_toc:
            digests = b"".join(c.digest for c in self.chunks)
            self._segment(b"blob.digest", digests, hashed=False)
        toc_size = (len(self._segments) + int(self.inline_meta)) * 128 + 512 if self.blob_toc else 0
        self._info = BlobInfo(
            blob_id="", blob_index=0, compressor=self.compressor, digester=self.digester,
            chunk_size=self.chunk_size, chunk_count=len(self.chunks), compressed_size=data_size,
            uncompressed_size=self.uncompressed_size, features=self.features,
            blob_toc_size=toc_size, **ci)  # type: ignore[arg-type]

    def _write_blob_meta(self) -> dict[str, object]:
        try:
            raw = blobmeta.encode_ci_v1(self.chunks)
        except ValueError as e:
            raise BuildError(f"blob meta: {e}") from None
        payload, compressed = compress(raw, self.compressor) if raw else (raw, False)
        ci_comp = self.compressor if compressed else Compressor.NONE
        ci_offset = self.offset
        header = L.BLOB_META_HEADER.pack(
            L.BLOB_META_MAGIC, self.features, ci_comp.algo, len(self.chunks), ci_offset,
            len(payload), len(raw), 0, 0, 0, L.BLOB_META_MAGIC)
        meta_offset = self.offset
        self._write(payload + header)
        if self.tar_headers:
            self._write(tar_header(b"blob.meta", len(payload) + len(header)))
        self._segments.append(_Segment(b"blob.meta", ci_comp.toc_flag, hashlib.sha256(raw).digest(),
                                       meta_offset, len(payload), len(raw)))
        self._segments.append(_Segment(b"blob.meta.header", 1, hashlib.sha256(header).digest(),
                                       meta_offset + len(payload), len(header), len(header)))
        return {"ci_compressor": ci_comp, "ci_offset": ci_offset, "ci_compressed_size": len(payload),
                "ci_uncompressed_size": len(raw)}

    def finish(self, inline_bootstrap: bytes | None = None, *, whole_file_id: bool = False) -> str:
        """Write the inlined bootstrap (if any) and the ToC; returns the blob id: spec §4.1 for a
        blob with a separate bootstrap; for a blob carrying its bootstrap, whose id readers take
        from its file name, or with ``whole_file_id``, the SHA-256 of the whole file (= its
        registry layer digest)."""
        if inline_bootstrap is not None:
            if self.blob_toc:
                boot, _ = compress(inline_bootstrap, Compressor.ZSTD)
                if len(boot) >= len(inline_bootstrap):
                    raise BuildError("inlined bootstrap did not compress")
                self._segment(b"image.boot", boot, flags=Compressor.ZSTD.toc_flag,
                              usize=len(inline_bootstrap),
                              sha=hashlib.sha256(inline_bootstrap).digest())
            else:
                self._segment(b"image.boot", inline_bootstrap)
        if self.blob_toc:
            entries = b"".join(L.TOC_ENTRY.pack(s.flags, 0, s.name, s.sha256, s.offset, s.size, s.usize)
                               for s in self._segments)
            self._write(entries)
            self._write(tar_header(L.TOC_NAME, len(entries)))
            self.toc_digest = hashlib.sha256(entries + tar_header(L.TOC_NAME, len(entries))).digest()
        whole = whole_file_id or inline_bootstrap is not None
        return (self._file_hash if whole else self._id_hash).hexdigest()
