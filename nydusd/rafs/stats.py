"""Image statistics and full-metadata checks (``nydus-image stat`` / ``check``).

Owns: ``ImageStats`` / ``ImageStat`` (upstream's ``nydus-image stat``: its ImageInfo fields with
their upstream meaning, the base/target/dedup roles, the JSON layout and the text dump; see the
class docstrings) and ``check_image`` (decode every record, every file's chunk list against its
size, v5 Merkle digests; with a BlobSource every chunk's data digest and, for v6, the blob's
chunk-info array and blob.digest array against the bootstrap's chunk table).

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
from nydusd.storage.chunk import BlobInfo, ChunkInfo

#: ``DedupInfo`` rows of the dedup table (thresholds 1..20), as upstream
DEDUP_THRESHOLDS = 20


@dataclass
class ImageStats:
    """Upstream's ``ImageInfo``: one image (or the union of the base images), field by field.

    ``files`` counts every name of a regular file (hard links included); every other file
    figure counts a hard-linked inode once: ``file_size``, ``file_sizes`` (by bit length of the
    size, capped at 44), ``padding_size`` (up to the next 4 KiB per file), ``chunks``,
    ``comp_size``/``uncomp_size`` (its chunks; ``uncomp_size`` gains ``padding_size`` at
    ``finalize``) and ``chunk_sizes[k]`` (the chunks the file would have with chunks of
    ``2 ** (12 + k)`` bytes). ``own_*``: a base image's distinct chunks (by digest), or a
    target's chunks not found in the base images; ``ref_*``: a target's chunks found there;
    ``dedup_*``: with ``--blob-dir``, the distinct chunks of all base images together.
    """

    dirs: int = 0
    files: int = 0
    symlinks: int = 0
    chunks: int = 0
    file_size: int = 0
    comp_size: int = 0
    uncomp_size: int = 0
    padding_size: int = 0
    chunk_sizes: list[int] = field(default_factory=lambda: [0] * 9)
    file_sizes: list[int] = field(default_factory=lambda: [0] * 45)
    dedup_chunks: int = 0
    dedup_comp_size: int = 0
    dedup_uncomp_size: int = 0
    own_chunks: int = 0
    own_comp_size: int = 0
    own_uncomp_size: int = 0
    ref_chunks: int = 0
    ref_comp_size: int = 0
    ref_uncomp_size: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def add_file(self, size: int, chunks: list[ChunkInfo]) -> None:
        self.file_sizes[min(size.bit_length(), 44)] += 1
        self.file_size += size
        self.padding_size += -size % 4096
        self.chunks += len(chunks)
        for c in chunks:
            self.comp_size += c.compressed_size
            self.uncomp_size += c.uncompressed_size
        for k in range(9):
            self.chunk_sizes[k] += -(-size // (1 << (12 + k)))

    def add_chunk(self, kind: str, c: ChunkInfo) -> None:
        setattr(self, f"{kind}_chunks", getattr(self, f"{kind}_chunks") + 1)
        setattr(self, f"{kind}_comp_size", getattr(self, f"{kind}_comp_size") + c.compressed_size)
        setattr(self, f"{kind}_uncomp_size", getattr(self, f"{kind}_uncomp_size") + c.uncompressed_size)

    def dump(self) -> str:
        lines = ["", f"Directories:            {self.dirs}", f"Files:                  {self.files}",
                 f"Symlinks:               {self.symlinks}", f"Chunks:                 {self.chunks}",
                 f"File Size:              {self.file_size}",
                 f"Padding Size:           {self.padding_size}",
                 f"Uncompressed Size:      {self.uncomp_size}",
                 f"Compressed Size:        {self.comp_size}", "", "File Size Bits:\t\tFile Count:"]
        lines += [f"{bits}:\t\t\t{n}" for bits, n in enumerate(self.file_sizes)]
        lines += ["", "Chunk Size Bits:\tChunk Count:"]
        lines += [f"{12 + k}:\t\t\t{n}" for k, n in enumerate(self.chunk_sizes)]
        lines += ["", f"Raw Content Size:\t{self.file_size}", f"Comp Content Size:\t{self.comp_size}",
                  f"Raw Chunk Count:\t{self.chunks}", f"Dedup Comp Size:\t{self.dedup_comp_size}",
                  f"Dedup Uncomp Size:\t{self.dedup_uncomp_size}",
                  f"Dedup Chunk Count:\t{self.dedup_chunks}", f"Owned Comp Size:\t{self.own_comp_size}",
                  f"Owned Uncomp Size:\t{self.own_uncomp_size}", f"Owned Chunk Count:\t{self.own_chunks}",
                  f"Referenced Comp Size:\t{self.ref_comp_size}",
                  f"Referenced Uncomp Size:\t{self.ref_uncomp_size}",
                  f"Referenced Chunk Count:\t{self.ref_chunks}"]
        return "\n".join(lines)


class ImageStat:
    """Upstream's ``nydus-image stat``: base image(s) (``--bootstrap`` or every image of
    ``--blob-dir``, which enables dedup figures), an optional target (``--target``), and the
    chunk dictionary of the base images. Only chunks of images digested with ``digester`` enter
    that dictionary (upstream's ``--digester``, default blake3), so only they count as dedup or
    referenced chunks."""

    def __init__(self, digester: str = "blake3") -> None:
        self.digester = digester
        self.dedup_enabled = False
        self.target_enabled = False
        self.base = ImageStats()
        self.target = ImageStats()
        # digest -> (first chunk, how many base images had it)
        self._dict: dict[bytes, tuple[ChunkInfo, int]] = {}

    def add(self, sb: RafsSuper, *, is_base: bool) -> None:
        image = self.base if is_base else self.target
        if not is_base:
            self.target_enabled = True
        seen: set[int] = set()
        unique: dict[bytes, ChunkInfo] = {}  # this image's distinct chunks, by digest
        for _path, inode in sb.walk():
            if inode.is_dir:
                image.dirs += 1
            elif inode.is_symlink:
                image.symlinks += 1
            elif inode.is_reg:
                image.files += 1
                chunks = sb.chunks(inode.ino)
                for c in chunks:
                    unique.setdefault(c.digest, c)
                if inode.nlink > 1:
                    if inode.ino in seen:
                        continue
                    seen.add(inode.ino)
                image.add_file(inode.size, chunks)
        same_digester = sb.digester.value == self.digester
        for digest, c in unique.items():
            if is_base:
                image.add_chunk("own", c)
                if same_digester:
                    first, count = self._dict.get(digest, (c, 0))
                    self._dict[digest] = (first, count + 1)
            elif self._known(digest, c):
                image.add_chunk("ref", c)
            else:
                image.add_chunk("own", c)

    def _known(self, digest: bytes, c: ChunkInfo) -> bool:
        entry = self._dict.get(digest)
        return entry is not None and entry[0].uncompressed_size in (0, c.uncompressed_size)

    def finalize(self) -> None:
        self.base.uncomp_size += self.base.padding_size
        if self.target_enabled:
            self.target.uncomp_size += self.target.padding_size
        if self.dedup_enabled:
            for c, _count in self._dict.values():
                self.base.add_chunk("dedup", c)

    def as_dict(self) -> dict[str, Any]:
        return {"dedup_enabled": self.dedup_enabled, "target_enabled": self.target_enabled,
                "base_image": self.base.as_dict(), "target_image": self.target.as_dict()}

    def dedup_table(self) -> list[list[int]]:
        """Upstream's "Chunk Deduplication Statistics" rows for global dedup thresholds 1..20:
        raw chunks, dedup chunks, comp content/base/image size, uncomp content/base/image size. A
        chunk found in ``count`` base images is deduplicated at thresholds up to ``count`` (kept
        once, in the "base") and kept in every image above it."""
        rows = [[0] * 8 for _ in range(DEDUP_THRESHOLDS)]
        for c, count in self._dict.values():
            usize, csize = c.uncompressed_size, c.compressed_size
            for i, row in enumerate(rows):
                row[0] += count
                row[2] += count * csize
                row[5] += count * usize
                if i < count:
                    row[1] += 1
                    row[3] += csize
                    row[6] += usize
                else:
                    row[1] += count
                    row[4] += count * csize
                    row[7] += count * usize
        return rows

    def dump(self) -> str:
        out = []
        if self.target_enabled:
            out += ["Target Image Statistics:", self.target.dump()]
        out += ["", "", "Base Image Statistics:", self.base.dump()]
        if self.dedup_enabled:
            out += ["", "", "Chunk Deduplication Statistics:",
                    "Global Dedup Thresh:\tRaw Chunks:\tDedup Chunks:\tComp Content Size:\tComp Base Size:"
                    "\tComp Image Size:\tUncomp Content Size:\tUncomp Base Size\tUncomp Image Size"]
            for i, row in enumerate(self.dedup_table()):
                if row[1] == 0:
                    break
                out.append(f"{i + 1:<24}" + "".join(f"0x{v:<14x}" for v in row))
        return "\n".join(out)


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
