"""v6 data-blob trailers (spec §4.3-§4.6): chunk-info arrays, blob-meta header, tar segments, ToC,
blob.digest, inlined bootstraps -- decoding and encoding, as functions over bytes.

Owns: ``CiEntry`` + ``decode_ci_array`` / ``encode_ci_v1`` (16-byte v1 and 24-byte v2 records),
``parse_meta_header`` / ``load_chunk_infos`` (blob-meta route 2 of §3.13), ``tar_header`` /
``parse_tar_header`` / ``tar_segments`` (walk a blob backwards from its end), ``parse_toc``,
``extract_inlined_bootstrap`` and the writer side ``blob_trailer`` (bytes a builder appends to a
blob whose chunk payloads are written) with ``BlobTrailer.blob_id``.

Must not import fs, daemon, builder. Threading: pure functions over bytes; no shared state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from nydusd.compress import Compressor, compress, decompress
from nydusd.digest import DigestAlgorithm
from nydusd.errors import CorruptMetadata, IntegrityError
from nydusd.rafs import layout as L
from nydusd.rafs.layout import corrupt, unpack_at
from nydusd.storage.chunk import CHUNK_FLAG_COMPRESSED, BlobInfo, ChunkInfo

Reader = Callable[[int, int], bytes]  # (offset, size) -> bytes of one blob
MAX_TOC_SIZE = 1 << 20  # upstream's limit
MAX_INLINED_BOOTSTRAP = 1 << 29  # refuse to inflate more than 512 MiB of metadata
_MASK20 = (1 << 20) - 1


class CiEntry(NamedTuple):
    """One decoded chunk-info record."""

    compressed_offset: int
    compressed_size: int
    uncompressed_offset: int
    uncompressed_size: int
    compressed: bool
    flags: int = 0
    data: int = 0


# ---- chunk-info arrays ------------------------------------------------------------------------------
def decode_ci_array(data: bytes, count: int, v2: bool, base: int = 0) -> list[CiEntry]:
    """Decode ``count`` records (v1: 16 bytes, v2: 24 bytes). ``base`` is used in error offsets.

    Raises CorruptMetadata for a short array, zero/oversized sizes or unaligned offsets.
    """
    st = L.CI_V2 if v2 else L.CI_V1
    if count < 0 or count * st.size > len(data):
        raise corrupt("chunk-info array shorter than its entry count", base, "ci_entries",
                      value=count, size=len(data))
    out = []
    for k, rec in enumerate(st.iter_unpack(data[:count * st.size])):
        if not v2 and rec[0] & 0xFF:
            raise corrupt("reserved bits set in a v1 chunk-info entry", base + k * st.size, "uncomp_info",
                          index=k)
        out.append(_decode_v2(rec) if v2 else _decode_v1(rec))
        e = out[-1]
        if e.uncompressed_offset % L.V6_BLOCK_SIZE or not 0 < e.uncompressed_size <= L.MAX_CHUNK_SIZE:
            raise corrupt("bad chunk-info entry", base + k * st.size, "uncomp_info", index=k)
    return out


def _decode_v1(rec: tuple[int, ...]) -> CiEntry:
    uinfo, cinfo = rec
    usize = (((uinfo >> 8) & 0xF) << 20 | (uinfo >> 44)) + 1
    uoff = uinfo & 0x0000_0FFF_FFFF_F000
    csize = (((cinfo >> 40) & 0xF) << 20 | (cinfo >> 44)) + 1
    coff = cinfo & 0xFF_FFFF_FFFF
    return CiEntry(coff, csize, uoff, usize, csize != usize)


def _decode_v2(rec: tuple[int, ...]) -> CiEntry:
    uinfo, cinfo, data = rec
    flags = uinfo >> 56
    return CiEntry(cinfo & 0xFF_FFFF_FFFF, cinfo >> 40, (uinfo & 0xFFFF_FFFF) * L.V6_BLOCK_SIZE,
                   ((uinfo >> 32) & 0xFF_FFFF) + 1, bool(flags & 0x01), flags, data)


def encode_ci_v1(chunks: Sequence[ChunkInfo]) -> bytes:
    """The v1 chunk-info array of ``chunks`` (in chunk-index order)."""
    out = bytearray()
    for c in chunks:
        u, s = c.uncompressed_size - 1, c.compressed_size - 1
        if c.uncompressed_offset % L.V6_BLOCK_SIZE or not 0 <= u < L.MAX_CHUNK_SIZE \
                or not 0 <= s < L.MAX_CHUNK_SIZE:
            raise ValueError(f"chunk {c.index} cannot be encoded in a v1 chunk-info record")
        uinfo = (u & _MASK20) << 44 | c.uncompressed_offset | (u >> 20) << 8
        cinfo = (s & _MASK20) << 44 | (s >> 20) << 40 | c.compressed_offset
        out += L.CI_V1.pack(uinfo, cinfo)
    return bytes(out)


@dataclass(frozen=True)
class MetaHeader:
    features: int
    ci_compressor: Compressor
    ci_entries: int
    ci_offset: int
    ci_compressed_size: int
    ci_uncompressed_size: int
    zran_offset: int = 0
    zran_size: int = 0
    zran_count: int = 0

    def pack(self) -> bytes:
        return L.BLOB_META_HEADER.pack(L.BLOB_META_MAGIC, self.features, self.ci_compressor.algo,
                                       self.ci_entries, self.ci_offset, self.ci_compressed_size,
                                       self.ci_uncompressed_size, self.zran_offset, self.zran_size,
                                       self.zran_count, L.BLOB_META_MAGIC)


def parse_meta_header(data: bytes, base: int = 0) -> MetaHeader:
    """Decode the 4096-byte blob-meta header. Raises CorruptMetadata."""
    (m1, features, ci_comp, entries, ci_off, ci_csize, ci_usize, zoff, zsize, zcount,
     m2) = unpack_at(L.BLOB_META_HEADER, data, 0, "blob_meta_header")
    if m1 != L.BLOB_META_MAGIC or m2 != L.BLOB_META_MAGIC:
        raise corrupt("bad blob-meta header magic", base, "blob_meta_magic", value=hex(m1))
    try:
        comp = Compressor.from_algo(ci_comp)
    except ValueError:
        raise corrupt("unknown chunk-info compressor", base + 8, "ci_compressor", value=ci_comp) from None
    return MetaHeader(features, comp, entries, ci_off, ci_csize, ci_usize, zoff, zsize, zcount)


def load_chunk_infos(read: Reader, blob: BlobInfo) -> list[CiEntry]:
    """Route 2 of §3.13: read and decode the chunk-info array of ``blob`` through ``read``.

    The header following the array must agree with the blob-table entry. Raises CorruptMetadata.
    """
    if blob.ci_compressed_size > 64 * L.MAX_CHUNK_SIZE or blob.ci_uncompressed_size > 64 * L.MAX_CHUNK_SIZE:
        raise corrupt("chunk-info array too large", None, "ci_compressed_size", blob_id=blob.blob_id)
    raw = read(blob.ci_offset, blob.ci_compressed_size + L.BLOB_META_HEADER.size)
    hdr = parse_meta_header(raw[blob.ci_compressed_size:], blob.ci_offset + blob.ci_compressed_size)
    want = (blob.features, blob.ci_compressor, blob.chunk_count, blob.ci_offset,
            blob.ci_compressed_size, blob.ci_uncompressed_size)
    got = (hdr.features, hdr.ci_compressor, hdr.ci_entries, hdr.ci_offset, hdr.ci_compressed_size,
           hdr.ci_uncompressed_size)
    if want != got:
        raise corrupt("blob-meta header differs from the blob table", blob.ci_offset, "blob_meta_header",
                      blob_id=blob.blob_id)
    data = raw[:blob.ci_compressed_size]
    if blob.ci_compressor is not Compressor.NONE and blob.ci_compressed_size != blob.ci_uncompressed_size:
        try:
            data = decompress(data, blob.ci_compressor, blob.ci_uncompressed_size)
        except IntegrityError as e:
            raise corrupt(f"chunk-info array does not decompress: {e}", blob.ci_offset, "ci_array") from None
    return decode_ci_array(data, blob.chunk_count, bool(blob.features & L.BLOB_CHUNK_INFO_V2),
                           blob.ci_offset)


def ci_to_chunk(entry: CiEntry, index: int, digest: bytes, blob_index: int,
                file_offset: int = 0) -> ChunkInfo:
    return ChunkInfo(digest=digest, blob_index=blob_index,
                     flags=CHUNK_FLAG_COMPRESSED if entry.compressed else 0,
                     compressed_size=entry.compressed_size, uncompressed_size=entry.uncompressed_size,
                     compressed_offset=entry.compressed_offset,
                     uncompressed_offset=entry.uncompressed_offset, file_offset=file_offset, index=index)


# ---- tar segments and ToC -------------------------------------------------------------------------
def tar_header(name: str, size: int) -> bytes:
    """A 512-byte GNU tar header exactly as upstream writes it after each blob segment."""
    h = bytearray(L.TAR_BLOCK)
    raw = name.encode()
    h[0:len(raw)] = raw
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"00000000000\0"
    h[156:157] = b"0"
    h[257:265] = b"ustar  \0"
    h[148:156] = b" " * 8
    h[148:156] = b"%07o\0" % sum(h)
    return bytes(h)


def parse_tar_header(h: bytes) -> tuple[str, int] | None:
    """``(name, size)`` of a regular-file tar header with a valid checksum, else None."""
    if len(h) != L.TAR_BLOCK or h[156:157] not in (b"0", b"\0") or h[257:262] != b"ustar":
        return None
    try:
        size = int(h[124:136].rstrip(b"\0 ") or b"0", 8)
        chk = int(h[148:156].rstrip(b"\0 ") or b"0", 8)
        name = h[0:100].rstrip(b"\0").decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    if chk != sum(h[:148]) + 8 * 32 + sum(h[156:]):
        return None
    return name, size


def tar_segments(read: Reader, blob_size: int) -> dict[str, tuple[int, int]]:
    """Walk a HAS_TAR_HEADER blob backwards: ``name -> (data offset, size)``.

    Stops at the first block that is not a valid tar header. Raises CorruptMetadata when a header
    claims more data than precedes it.
    """
    out: dict[str, tuple[int, int]] = {}
    end = blob_size
    while end >= L.TAR_BLOCK and len(out) < 64:
        parsed = parse_tar_header(read(end - L.TAR_BLOCK, L.TAR_BLOCK))
        if parsed is None:
            break
        name, size = parsed
        start = end - L.TAR_BLOCK - size
        if start < 0:
            raise corrupt("tar segment larger than the blob", end - L.TAR_BLOCK, "tar_size", value=size)
        out.setdefault(name, (start, size))
        end = start
    return out


class TocEntry(NamedTuple):
    name: str
    flags: int
    digest: bytes
    compressed_offset: int
    compressed_size: int
    uncompressed_size: int

    @property
    def compressor(self) -> Compressor:
        return {0x2: Compressor.ZSTD, 0x4: Compressor.LZ4_BLOCK}.get(self.flags & 0x7, Compressor.NONE)


def parse_toc(data: bytes, base: int = 0) -> list[TocEntry]:
    """Decode the ToC entries (128 bytes each; bytes 80-127 are ignored). Raises CorruptMetadata."""
    if len(data) % L.TOC_ENTRY.size:
        raise corrupt("ToC size is not a multiple of 128", base, "blob_toc_size", value=len(data))
    out = []
    for k, (flags, _r, name, digest, coff, csize, usize) in enumerate(L.TOC_ENTRY.iter_unpack(data)):
        try:
            text = name.rstrip(b"\0").decode("ascii")
        except UnicodeDecodeError:
            raise corrupt("ToC entry name is not ASCII", base + 128 * k + 8, "toc_name") from None
        out.append(TocEntry(text, flags, digest, coff, csize, usize))
    return out


def read_toc(read: Reader, blob_size: int) -> list[TocEntry]:
    """The ToC of a blob (empty list when it has none)."""
    seg = tar_segments(read, blob_size).get(L.TOC_NAME.decode())
    if seg is None:
        return []
    if seg[1] > MAX_TOC_SIZE:
        raise corrupt("ToC larger than 1 MiB", seg[0], "rafs.blob.toc", value=seg[1])
    return parse_toc(read(*seg), seg[0])


def extract_inlined_bootstrap(read: Reader, blob_size: int) -> bytes:
    """The bootstrap stored as ``image.boot`` in a blob (ToC route, else the tar segment; zstd
    compressed when the ToC says so). Raises CorruptMetadata when the blob carries none."""
    toc = {e.name: e for e in read_toc(read, blob_size)}
    entry = toc.get("image.boot")
    if entry is not None:
        if entry.compressed_offset + entry.compressed_size > blob_size or \
                entry.uncompressed_size > MAX_INLINED_BOOTSTRAP:
            raise corrupt("image.boot ToC entry outside the blob", entry.compressed_offset, "image.boot")
        data = read(entry.compressed_offset, entry.compressed_size)
        if entry.compressor is not Compressor.NONE:
            try:
                data = decompress(data, entry.compressor, entry.uncompressed_size)
            except IntegrityError as e:
                raise corrupt(f"inlined bootstrap does not decompress: {e}", entry.compressed_offset,
                              "image.boot") from None
        if hashlib.sha256(data).digest() != entry.digest:
            raise corrupt("inlined bootstrap digest mismatch", entry.compressed_offset, "image.boot")
        return data
    seg = tar_segments(read, blob_size).get("image.boot")
    if seg is None:
        raise CorruptMetadata("blob has no inlined bootstrap (image.boot)", field="image.boot")
    if seg[1] > MAX_INLINED_BOOTSTRAP:
        raise corrupt("inlined bootstrap too large", seg[0], "image.boot", value=seg[1])
    return read(*seg)  # without a ToC the bootstrap is stored raw (§4.4)


# ---- writer side ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlobTrailer:
    """What ``blob_trailer`` produces: ``data`` to append after the chunk payloads, the values to
    copy into the blob's BlobInfo (features, ci_*, blob_toc_*) and the blob id (§4.1) when the
    chunk-data hasher was given."""

    data: bytes
    features: int
    ci_compressor: Compressor
    ci_offset: int
    ci_compressed_size: int
    ci_uncompressed_size: int
    blob_toc_size: int
    blob_toc_digest: bytes
    digest_range: tuple[int, int]  # (start, end) of the blob.digest payload inside ``data``
    blob_id: str | None = None

    def apply(self, blob: BlobInfo) -> BlobInfo:
        """``blob`` with this trailer's features / ci / ToC fields (and id, when known)."""
        return replace(blob, features=self.features, ci_compressor=self.ci_compressor,
                       ci_offset=self.ci_offset, ci_compressed_size=self.ci_compressed_size,
                       ci_uncompressed_size=self.ci_uncompressed_size,
                       blob_toc_size=self.blob_toc_size, blob_toc_digest=self.blob_toc_digest,
                       blob_id=self.blob_id or blob.blob_id)


def blob_trailer(chunks: Sequence[ChunkInfo], *, data_size: int, compressor: Compressor,
                 digester: DigestAlgorithm | None = None, with_toc: bool = True,
                 data_hasher: Any = None) -> BlobTrailer:
    """The v6 trailer of one blob whose unique chunks (``chunks``, in chunk-index order 0..n-1,
    4 KiB-aligned uncompressed offsets) occupy ``[0, data_size)`` of the blob.

    ``data_hasher``: a ``hashlib.sha256()`` object that has hashed exactly those ``data_size``
    bytes (it is copied, not consumed); required with ``with_toc`` (the ``image.blob`` ToC digest
    covers the data) and used to compute ``BlobTrailer.blob_id``.
    Without ToC: ``ci array + header`` (features ALIGNED). With ToC (upstream default profile):
    ``tar(image.blob) ci+header tar(blob.meta) digests tar(blob.digest) ToC tar(rafs.blob.toc)``.
    Raises ValueError for chunks that cannot be described (wrong order, unaligned, too large).
    """
    del digester  # chunk digests are already in ``chunks``; kept for signature stability
    if with_toc and data_hasher is None:
        raise ValueError("with_toc needs the data_hasher of the chunk data")
    for k, c in enumerate(chunks):
        if c.index != k:
            raise ValueError(f"chunk {k} has index {c.index}: chunks must be in chunk-index order")
    ci_raw = encode_ci_v1(chunks)
    ci_data, ci_compressed = compress(ci_raw, compressor)
    ci_comp = compressor if ci_compressed else Compressor.NONE
    features = L.BLOB_ALIGNED
    if with_toc:
        features |= (L.BLOB_CAP_TAR_TOC | L.BLOB_HAS_TAR_HEADER | L.BLOB_HAS_TOC
                     | L.BLOB_INLINED_CHUNK_DIGEST)
    out = bytearray()
    if with_toc:
        out += tar_header("image.blob", data_size)
    ci_offset = data_size + len(out)
    header = MetaHeader(features, ci_comp, len(chunks), ci_offset, len(ci_data), len(ci_raw)).pack()
    out += ci_data + header
    toc_size, toc_digest, dig_range = 0, b"\0" * 32, (len(out), len(out))
    if with_toc:
        out += tar_header("blob.meta", len(ci_data) + len(header))
        digests = b"".join(c.digest for c in chunks)
        dig_range = (len(out), len(out) + len(digests))
        out += digests + tar_header("blob.digest", len(digests))
        toc_bytes = _toc(out, chunks, data_size, data_hasher, ci_comp, ci_raw, len(ci_data),
                         ci_offset, header, dig_range)
        out += toc_bytes
        toc_size, toc_digest = len(toc_bytes), hashlib.sha256(toc_bytes).digest()
    blob_id = None
    if data_hasher is not None:
        h = data_hasher.copy()
        h.update(out[:dig_range[0]])
        h.update(out[dig_range[1]:])
        blob_id = h.hexdigest()
    return BlobTrailer(bytes(out), features, ci_comp, ci_offset, len(ci_data), len(ci_raw), toc_size,
                       toc_digest, dig_range, blob_id)


def _toc(out: bytearray, chunks: Sequence[ChunkInfo], data_size: int, data_hasher: Any,
         ci_comp: Compressor, ci_raw: bytes, ci_csize: int, ci_offset: int, header: bytes,
         dig_range: tuple[int, int]) -> bytes:
    """ToC entries + their tar header for a trailer ``out`` written so far (§4.4)."""
    h = data_hasher.copy()
    h.update(out[:L.TAR_BLOCK])  # image.blob's digest covers the data and its tar header
    digests = bytes(out[dig_range[0]:dig_range[1]])
    uncompressed = sum(L.align(c.uncompressed_size, L.V6_BLOCK_SIZE) for c in chunks)
    entries = [
        ("image.blob", Compressor.NONE, h.digest(), 0, data_size, uncompressed),
        ("blob.meta", ci_comp, hashlib.sha256(ci_raw).digest(), ci_offset, ci_csize, len(ci_raw)),
        ("blob.meta.header", Compressor.NONE, hashlib.sha256(header).digest(), ci_offset + ci_csize,
         len(header), len(header)),
        ("blob.digest", Compressor.NONE, hashlib.sha256(digests).digest(), data_size + dig_range[0],
         len(digests), len(digests)),
    ]
    toc = b"".join(L.TOC_ENTRY.pack(comp.toc_flag, 0, name.encode(), digest, off, csize, usize)
                   for name, comp, digest, off, csize, usize in entries)
    return toc + tar_header("rafs.blob.toc", len(toc))
