"""Image statistics and full-metadata checks (``nydus-image stat`` / ``check``).

Owns: ``ImageStats`` (upstream's ImageInfo field names: dirs, files, symlinks, chunks, file_size,
comp_size, uncomp_size, padding_size, chunk_sizes[9], file_sizes[45], dedup_*, own_*, ref_*) with
per-blob totals, ``image_stats`` / ``compare_stats`` and ``check_image`` (decode every record, v5
Merkle digests; with a BlobSource every chunk's data digest and, for v6, the blob's chunk-info
array and blob.digest array against the bootstrap's chunk table).

Must not import fs, daemon, builder. Threading: pure functions over a RafsSuper.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from nydusd.errors import CorruptMetadata
from nydusd.rafs import layout as L
from nydusd.rafs.blobmeta import load_chunk_infos, read_toc
from nydusd.rafs.content import MAX_BLOB_END, BlobSource, file_chunks, read_chunk
from nydusd.rafs.rafs_super import RafsSuper
from nydusd.storage.device import BlobInfo, ChunkInfo


def _bucket(size: int, base_bits: int, n: int) -> int:
    return min(max(size - 1, 0).bit_length() - base_bits, n - 1) if size > 1 << base_bits else 0


@dataclass
class ImageStats:
    dirs: int = 0
    files: int = 0
    symlinks: int = 0
    chunks: int = 0
    file_size: int = 0
    comp_size: int = 0
    uncomp_size: int = 0
    padding_size: int = 0
    chunk_sizes: list[int] = field(default_factory=lambda: [0] * 9)   # <=4K, <=8K, ... >512K
    file_sizes: list[int] = field(default_factory=lambda: [0] * 45)   # by bit length of size
    dedup_chunks: int = 0
    dedup_comp_size: int = 0
    dedup_uncomp_size: int = 0
    own_chunks: int = 0
    own_comp_size: int = 0
    own_uncomp_size: int = 0
    ref_chunks: int = 0
    ref_comp_size: int = 0
    ref_uncomp_size: int = 0
    blobs: dict[str, dict[str, int]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def dedup_ratio(self) -> float:
        return self.uncomp_size / self.dedup_uncomp_size if self.dedup_uncomp_size else 1.0


def _collect(sb: RafsSuper, st: ImageStats,
             unique: dict[tuple[bytes, str], ChunkInfo]) -> None:
    """Add ``sb``'s entries to ``st`` and its chunks to ``unique`` (keyed by digest and blob id,
    so the same chunk in several images counts once)."""
    seen_inodes: set[int] = set()
    for _path, inode in sb.walk():
        if inode.is_dir:
            st.dirs += 1
            continue
        if inode.is_symlink:
            st.symlinks += 1
            continue
        if not inode.is_reg or inode.ino in seen_inodes:
            continue
        seen_inodes.add(inode.ino)
        st.files += 1
        st.file_size += inode.size
        st.file_sizes[min(inode.size.bit_length(), 44)] += 1
        for c in sb.chunks(inode.ino):
            st.chunks += 1
            st.comp_size += c.compressed_size
            st.uncomp_size += c.uncompressed_size
            st.padding_size += -c.uncompressed_size % L.V6_BLOCK_SIZE if sb.version == 6 else 0
            st.chunk_sizes[_bucket(c.uncompressed_size, 12, 9)] += 1
            unique.setdefault((c.digest, sb.blobs[c.blob_index].blob_id), c)


def _unique(sb: RafsSuper) -> dict[tuple[bytes, str], ChunkInfo]:
    unique: dict[tuple[bytes, str], ChunkInfo] = {}
    _collect(sb, ImageStats(), unique)
    return unique


def image_stats(*sbs: RafsSuper) -> ImageStats:
    """Counts and sizes of one image, or of several together (``stat --blob-dir``): hard-linked
    files count once per image; dedup_* = chunks unique by (digest, blob id) across all of them."""
    st = ImageStats()
    unique: dict[tuple[bytes, str], ChunkInfo] = {}
    for sb in sbs:
        for b in sb.blobs:
            st.blobs.setdefault(b.blob_id, {"chunks": 0, "comp_size": 0, "uncomp_size": 0})
        _collect(sb, st, unique)
    for (_digest, blob_id), c in unique.items():
        st.dedup_chunks += 1
        st.dedup_comp_size += c.compressed_size
        st.dedup_uncomp_size += c.uncompressed_size
        per = st.blobs[blob_id]
        per["chunks"] += 1
        per["comp_size"] += c.compressed_size
        per["uncomp_size"] += c.uncompressed_size
    return st


def compare_stats(base: RafsSuper, target: RafsSuper) -> ImageStats:
    """``target``'s stats with own_* (chunks not in ``base``) and ref_* (chunks found in ``base``)."""
    st = image_stats(target)
    base_digests = {d for d, _ in _unique(base)}
    for (digest, _b), c in _unique(target).items():
        if digest in base_digests:
            st.ref_chunks += 1
            st.ref_comp_size += c.compressed_size
            st.ref_uncomp_size += c.uncompressed_size
        else:
            st.own_chunks += 1
            st.own_comp_size += c.compressed_size
            st.own_uncomp_size += c.uncompressed_size
    return st


def check_image(sb: RafsSuper, source: BlobSource | None = None) -> dict[str, int]:
    """Decode every record of ``sb`` (tree, symlinks, xattrs, chunk lists, prefetch table), check
    every chunk lies inside its blob (by the blob table's size); for v5 also verify every inode's
    Merkle digest; with ``source`` read and verify every unique chunk.

    Returns counters; raises CorruptMetadata (or IntegrityError/BackendError for chunk data).
    """
    entries = files = chunks_read = 0
    verified: set[tuple[bytes, int]] = set()
    for path, inode in sb.walk():
        entries += 1
        if inode.has_xattr:
            sb.xattrs(inode.ino)
        if inode.is_symlink:
            sb.readlink(inode.ino)
        if inode.is_reg:
            files += 1
            for c in file_chunks(sb, inode):
                _check_chunk_range(c, sb.blobs[c.blob_index], path)
                if source is not None and (c.digest, c.blob_index) not in verified:
                    read_chunk(source, c, sb.blobs[c.blob_index], verify=True)
                    verified.add((c.digest, c.blob_index))
                    chunks_read += 1
    sb.prefetch_inodes()
    if sb.version == 5:
        _verify_v5_digests(sb)
    elif source is not None:
        _verify_blob_meta(sb, source, verified)
    return {"entries": entries, "files": files, "chunks_verified": chunks_read}


def _check_chunk_range(c: ChunkInfo, blob: BlobInfo, path: bytes) -> None:
    """A chunk's stored range must fit a file (``off_t``) and, when the blob table records the
    blob's size (non-zero), lie inside it."""
    end = c.compressed_offset + c.compressed_size
    limit = blob.compressed_size or MAX_BLOB_END
    if end > min(limit, MAX_BLOB_END):
        raise CorruptMetadata("chunk lies beyond the end of its blob", field="compressed_offset",
                              blob_id=blob.blob_id, offset=c.compressed_offset, size=c.compressed_size,
                              blob_size=blob.compressed_size or None,
                              path=path.decode(errors="replace"))


def _verify_blob_meta(sb: RafsSuper, source: BlobSource, used: set[tuple[bytes, int]]) -> None:
    """v6: every chunk the bootstrap uses agrees with its blob's chunk-info array (route 2 of
    §3.13) and, when the blob carries one, with its blob.digest array."""
    by_blob: dict[int, list[ChunkInfo]] = {}
    for _path, inode in sb.walk():
        if inode.is_reg:
            for c in sb.chunks(inode.ino):
                by_blob.setdefault(c.blob_index, []).append(c)
    for blob_index, chunks in by_blob.items():
        blob = sb.blobs[blob_index]
        read = _reader(source, blob)
        entries = load_chunk_infos(read, blob)
        digests = _digest_array(read, blob)
        for c in chunks:
            e = entries[c.index] if c.index < len(entries) else None
            if e is None or (e.compressed_offset, e.compressed_size, e.uncompressed_offset,
                             e.uncompressed_size, e.compressed) != (
                    c.compressed_offset, c.compressed_size, c.uncompressed_offset,
                    c.uncompressed_size, c.is_compressed):
                raise CorruptMetadata("chunk table differs from the blob's chunk-info array",
                                      field="ci_array", blob_id=blob.blob_id, chunk_index=c.index)
            if digests is not None and digests[32 * c.index:32 * c.index + 32] != c.digest:
                raise CorruptMetadata("chunk digest differs from the blob's blob.digest array",
                                      field="blob.digest", blob_id=blob.blob_id, chunk_index=c.index)


def _reader(source: BlobSource, blob: BlobInfo) -> Callable[[int, int], bytes]:
    return lambda off, size: source(blob, off, size)


def _digest_array(read: Callable[[int, int], bytes], blob: BlobInfo) -> bytes | None:
    if not blob.features & L.BLOB_INLINED_CHUNK_DIGEST or not blob.features & L.BLOB_HAS_TOC:
        return None
    toc = {e.name: e for e in read_toc(read, blob.compressed_size)}
    entry = toc.get("blob.digest")
    if entry is None or entry.compressed_size != 32 * blob.chunk_count:
        raise CorruptMetadata("blob.digest missing from the blob's ToC", field="blob.digest",
                              blob_id=blob.blob_id)
    return read(entry.compressed_offset, entry.compressed_size)


def _verify_v5_digests(sb: RafsSuper) -> None:
    """Recompute the v5 Merkle digests (§2.8) bottom-up and compare with ``i_digest``."""
    from nydusd.rafs.v5 import RafsV5Super

    assert isinstance(sb, RafsV5Super)
    digests: dict[bytes, bytes] = {}
    items = list(sb.walk())
    for path, inode in reversed(items):
        if inode.is_dir:
            kids = [digests[(path.rstrip(b"/") + b"/" + name)] for name, _ in sb.children(inode.ino)]
            data = b"".join(kids)
        elif inode.is_reg:
            data = b"".join(c.digest for c in sb.chunks(inode.ino))
        elif inode.is_symlink:
            data = sb.readlink(inode.ino)
        else:
            data = b""
        digest = sb.digester.hash(data)
        if sb.record_digest(inode.ino) != digest:
            raise CorruptMetadata("inode digest mismatch", offset=inode.meta_offset, field="i_digest",
                                  path=path.decode(errors="replace"))
        digests[path] = digest
