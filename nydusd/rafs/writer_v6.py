"""RAFS v6 (EROFS) serialisation (spec §3.14): superblocks, device slots, blob table, prefetch
table, metadata area (extended inodes, inline xattrs, FLAT_INLINE/PLAIN directories and symlinks,
chunk-based files) and the sorted chunk table.

Owns: ``v6_bytes(bootstrap) -> bytes``. Placement follows upstream's visit order (a directory, then
its non-directory children, then its subdirectories) without free-space reuse; every object obeys
the EROFS rules (inline tails share the inode's block; no dirent straddles a block), so the output
is accepted by the kernel and fsck.erofs with the blobs' uncompressed data as extra devices.

Must not import fs, daemon, builder. Threading: pure function over a model that is only read.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field

from nydusd.errors import BuildError
from nydusd.rafs import layout as L
from nydusd.rafs.model import Bootstrap, Node
from nydusd.rafs.numbering import Entry, entry_path, number_tree, prefetch_entries, sb_flags
from nydusd.storage.chunk import ChunkInfo

BS = L.V6_BLOCK_SIZE
INODE_SIZE = L.V6_EXTENDED_INODE.size
_PREFIX_INDEX = [(b"user.", 1), (b"trusted.", 4), (b"security.", 6)]
_EXACT_INDEX = {b"system.posix_acl_access": 2, b"system.posix_acl_default": 3}


@dataclass(eq=False)
class _Obj:
    """Placement of one inode (relative to the metadata area)."""

    entry: Entry
    xattr: bytes
    data: bytes = b""  # directory blocks / symlink target
    offset: int = 0
    layout: int = L.V6_LAYOUT_FLAT_PLAIN
    data_block: int = 0  # relative block of the first non-inline data block
    extra: list[bytes] = field(default_factory=list)

    @property
    def isize(self) -> int:
        return INODE_SIZE + len(self.xattr)


def _xattr_area(node: Node, path: bytes) -> bytes:
    if not node.xattrs:
        return b""
    body = bytearray()
    for name, value in sorted(node.xattrs.items()):
        index = _EXACT_INDEX.get(name)
        suffix = b""
        if index is None:
            for prefix, idx in _PREFIX_INDEX:
                if name.startswith(prefix):
                    index, suffix = idx, name[len(prefix):]
                    break
        if index is None or len(suffix) > 255 or len(value) > 0xFFFF:
            raise BuildError("xattr not representable in RAFS v6", path=path.decode(errors="replace"),
                             xattr=name.decode(errors="replace"))
        ent = L.V6_XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value
        body += ent + bytes(-len(ent) % 4)
    if (len(body) // 4 + 1) > 0xFFFF:
        raise BuildError("xattrs too large for RAFS v6", path=path.decode(errors="replace"))
    return L.V6_XATTR_HEADER.pack(0, 0) + bytes(body)


def _dir_names(e: Entry) -> list[tuple[bytes, Entry]]:
    names = [(b".", e), (b"..", e.parent or e)] + [(c.node.name, c) for c in e.children]
    return sorted(names, key=lambda t: t[0])


def _dir_block_layout(names: list[tuple[bytes, Entry]]) -> list[list[tuple[bytes, Entry]]]:
    blocks: list[list[tuple[bytes, Entry]]] = [[]]
    used = 0
    for name, target in names:
        need = 12 + len(name)
        if used + need > BS:
            blocks.append([])
            used = 0
        blocks[-1].append((name, target))
        used += need
    return blocks


def _dir_size(blocks: list[list[tuple[bytes, Entry]]]) -> int:
    return (len(blocks) - 1) * BS + sum(12 + len(n) for n, _ in blocks[-1])


class _Placer:
    def __init__(self) -> None:
        self.cursor = BS  # relative to the metadata area; block 0 (nids 0..127) stays unused

    def _align(self, a: int) -> None:
        self.cursor = L.align(self.cursor, a)

    def flat(self, obj: _Obj, size: int) -> None:
        tail = size % BS
        if tail and obj.isize + tail <= BS:
            if BS - self.cursor % BS < obj.isize + tail:
                self._align(BS)
            obj.offset, obj.layout = self.cursor, L.V6_LAYOUT_FLAT_INLINE
            self.cursor += obj.isize + tail
            if size > tail:
                self._align(BS)
                obj.data_block = self.cursor // BS
                self.cursor += size - tail
        else:
            self.small(obj, obj.isize)
            self._align(BS)
            obj.data_block = self.cursor // BS
            self.cursor += size
            self._align(BS)
        self._align(32)

    def small(self, obj: _Obj, size: int) -> None:
        # keep inode + xattrs inside one block (simplest rule the kernel and nydus both accept)
        if self.cursor % BS + obj.isize > BS:
            self._align(BS)
        obj.offset = self.cursor
        self.cursor += size
        self._align(32)


def _place(entries: list[Entry]) -> tuple[dict[int, _Obj], int]:
    """Upstream visit order; returns (primary entry index -> placed object, end offset)."""
    objs: dict[int, _Obj] = {}
    placer = _Placer()

    def place(e: Entry) -> None:
        if e.inode is not None:
            return
        n = e.node
        obj = _Obj(e, _xattr_area(n, entry_path(e)))
        objs[e.index] = obj
        if n.is_dir:
            blocks = _dir_block_layout(_dir_names(e))
            obj.extra = [b"" for _ in blocks]
            placer.flat(obj, _dir_size(blocks))
        elif n.is_symlink:
            obj.data = n.symlink or b""
            placer.flat(obj, len(obj.data))
        elif n.is_reg:
            obj.layout = L.V6_LAYOUT_CHUNK_BASED
            placer.small(obj, L.align(obj.isize, 8) + 8 * len(n.chunks))
        else:
            placer.small(obj, obj.isize)

    stack = [entries[0]]
    while stack:
        d = stack.pop()
        place(d)
        for c in d.children:
            if not c.node.is_dir:
                place(c)
        stack.extend(reversed([c for c in d.children if c.node.is_dir]))
    return objs, placer.cursor


# ---- serialisation --------------------------------------------------------------------------------
def _chunk_word(n: Node, chunk_size: int) -> int:
    bits = chunk_size.bit_length() - 1
    cs = n.chunks
    if len(cs) > 1 and all(c.blob_index == cs[0].blob_index
                           and c.uncompressed_offset == cs[0].uncompressed_offset + i * chunk_size
                           for i, c in enumerate(cs)):
        bits = (n.size - 1).bit_length()  # next power of two: the kernel sees one extent
    return L.V6_CHUNK_FORMAT_INDEXES | (bits - L.V6_BLOCK_BITS)


def _chunk_indexes(n: Node, path: bytes) -> bytes:
    out = bytearray()
    for c in n.chunks:
        if c.uncompressed_offset % BS or c.index >= L.V6_MAX_CHUNKS_PER_BLOB:
            raise BuildError("v6 chunks need 4 KiB-aligned uncompressed offsets and index < 2^24",
                             path=path.decode(errors="replace"), chunk_index=c.index)
        out += L.V6_CHUNK_INDEX.pack(c.index & 0xFFFF, (c.blob_index + 1) | (c.index >> 16) << 8,
                                     c.uncompressed_offset // BS)
    return bytes(out)


class _Writer:
    def __init__(self, bootstrap: Bootstrap, objs: dict[int, _Obj], meta_addr: int, size: int) -> None:
        self.b = bootstrap
        self.objs = objs
        self.meta_blk = meta_addr // BS
        self.buf = bytearray(size)

    def nid(self, e: Entry) -> int:
        return self.objs[e.primary.index].offset // 32

    def put(self, off: int, data: bytes) -> None:
        self.buf[off:off + len(data)] = data

    def write(self, obj: _Obj) -> None:
        e, n = obj.entry, obj.entry.node
        path = entry_path(e)
        i_u, size, tail_data, blocks = 0, 0, b"", b""
        if n.is_dir:
            data = self._dir_data(e)
            size = len(data)
        elif n.is_symlink:
            data = obj.data
            size = len(data)
        if n.is_dir or n.is_symlink:
            if obj.layout == L.V6_LAYOUT_FLAT_INLINE:
                cut = size - size % BS
                blocks, tail_data = data[:cut], data[cut:]
            else:
                blocks = data
            if blocks:
                i_u = self.meta_blk + obj.data_block
                self.put(obj.data_block * BS, blocks)
        elif n.is_reg:
            size = n.size
            i_u = _chunk_word(n, self.b.chunk_size)
            self.put(obj.offset + L.align(obj.isize, 8), _chunk_indexes(n, path))
        elif stat.S_ISCHR(n.mode) or stat.S_ISBLK(n.mode):
            i_u = L.encode_dev(n.rdev)
        uid, gid = (n.uid, n.gid) if self.b.explicit_uid_gid else (0, 0)
        icount = (len(obj.xattr) - 12) // 4 + 1 if obj.xattr else 0
        inode = L.V6_EXTENDED_INODE.pack(1 | obj.layout << 1, icount, n.mode, 0, size, i_u, e.ino,
                                         uid, gid, n.mtime, n.mtime_nsec, e.nlink)
        self.put(obj.offset, inode + obj.xattr + tail_data)

    def _dir_data(self, e: Entry) -> bytes:
        out = bytearray()
        blocks = _dir_block_layout(_dir_names(e))
        for k, block in enumerate(blocks):
            nameoff = 12 * len(block)
            dirents, names = bytearray(), bytearray()
            for name, target in block:
                ftype = L.EROFS_FT.get(stat.S_IFMT(target.node.mode), 0)
                dirents += L.V6_DIRENT.pack(self.nid(target), nameoff + len(names), ftype, 0)
                names += name
            blk = bytes(dirents + names)
            out += blk if k == len(blocks) - 1 else blk.ljust(BS, b"\0")
        return bytes(out)


def _chunk_table(entries: list[Entry]) -> bytes:
    seen: dict[tuple[int, int], ChunkInfo] = {}
    for e in entries:
        if e.inode is None and e.node.is_reg:
            for c in e.node.chunks:
                seen.setdefault((c.blob_index, c.index), c)
    recs = sorted(seen.values(), key=lambda c: (c.digest, c.blob_index, c.index))
    return b"".join(L.CHUNK.pack(c.digest, c.blob_index, c.flags, c.compressed_size,
                                 c.uncompressed_size, c.compressed_offset, c.uncompressed_offset,
                                 c.file_offset, c.index, c.crc32) for c in recs)


def _blob_tables(bootstrap: Bootstrap, bootstrap_blocks: int) -> tuple[bytes, bytes, int]:
    slots, table, total = bytearray(), bytearray(), 0
    mapped_end = bootstrap_blocks
    for b in bootstrap.blobs:
        if not b.features & L.BLOB_ALIGNED:
            raise BuildError("v6 blobs need the ALIGNED feature (4 KiB-aligned chunks)", blob_id=b.blob_id)
        raw_id = b.blob_id.encode("ascii", errors="replace")
        if len(raw_id) > 64:
            raise BuildError("blob id longer than 64 bytes", blob_id=b.blob_id)
        blocks = max(1, -(-b.uncompressed_size // BS))
        mapped = L.align(mapped_end, 128)
        mapped_end = mapped + blocks
        total += blocks
        slots += L.V6_DEVSLOT.pack(raw_id, blocks, mapped)
        table += L.V6_BLOB.pack(raw_id, b.blob_index, bootstrap.chunk_size, b.chunk_count,
                                b.compressor.algo, b.digester.algo, b.features, b.compressed_size,
                                b.uncompressed_size, b.blob_toc_size, b.ci_compressor.algo,
                                b.ci_offset, b.ci_compressed_size, b.ci_uncompressed_size,
                                b.blob_toc_digest, b.blob_meta_digest, b.blob_meta_size, 0, 0)
    return bytes(slots), bytes(table), total


def v6_bytes(bootstrap: Bootstrap) -> bytes:
    """Serialise ``bootstrap`` as RAFS v6. Raises BuildError for an unrepresentable model."""
    entries = number_tree(bootstrap)
    nblobs = len(bootstrap.blobs)
    if nblobs > L.V6_MAX_BLOBS:
        raise BuildError("RAFS v6 supports at most 254 blobs", blobs=nblobs)
    objs, end = _place(entries)
    if objs[1].offset // 32 > 0xFFFF:
        raise BuildError("root inode beyond the 16-bit nid range")
    bt_off = L.align(L.V6_DEVT_OFFSET + 128 * nblobs, BS)
    pf_off = bt_off + 256 * nblobs
    prefetch = prefetch_entries(bootstrap, entries)
    meta_addr = L.align(pf_off + 4 * len(prefetch), BS)
    meta_len = L.align(end, BS)
    w = _Writer(bootstrap, objs, meta_addr, meta_len)
    for obj in objs.values():
        w.write(obj)
    chunk_table = _chunk_table(entries)
    ct_off = meta_addr + meta_len
    total = ct_off + L.align(len(chunk_table), BS)
    slots, table, data_blocks = _blob_tables(bootstrap, total // BS)
    has_xattr = any(e.node.xattrs for e in entries)
    flags = sb_flags(bootstrap, has_xattr, 6) | L.SB_ENCRYPTION_NONE
    erofs = L.EROFS_SUPER.pack(L.EROFS_MAGIC, 0, L.EROFS_COMPAT_RAFS_V6, L.V6_BLOCK_BITS, 0,
                               objs[1].offset // 32, len(entries), 0, 0, data_blocks,
                               meta_addr // BS, 0, bytes(16), bytes(16), L.EROFS_INCOMPAT_RAFS_V6, 0,
                               nblobs, L.V6_DEVT_SLOTOFF)
    ext = L.V6_EXT_SUPER.pack(flags, bt_off, len(table), bootstrap.chunk_size, ct_off,
                              len(chunk_table), pf_off if prefetch else 0, 4 * len(prefetch), 0)
    out = bytearray(total)
    out[L.EROFS_SB_OFFSET:L.EROFS_SB_OFFSET + 128] = erofs
    out[L.V6_EXT_SB_OFFSET:L.V6_EXT_SB_OFFSET + 256] = ext
    out[L.V6_DEVT_OFFSET:L.V6_DEVT_OFFSET + len(slots)] = slots
    out[bt_off:bt_off + len(table)] = table
    pf = b"".join((w.nid(e)).to_bytes(4, "little") for e in prefetch)
    out[pf_off:pf_off + len(pf)] = pf
    out[meta_addr:meta_addr + meta_len] = w.buf
    out[ct_off:ct_off + len(chunk_table)] = chunk_table
    return bytes(out)
