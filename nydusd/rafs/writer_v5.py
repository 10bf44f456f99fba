"""RAFS v5 serialisation (spec §2.10): superblock, inode table, prefetch table, blob tables,
records in index order with Merkle digests.

Owns: ``v5_bytes(bootstrap) -> bytes``. Must not import fs, daemon, builder.
Threading: pure function over a model that is only read.
"""

from __future__ import annotations

import stat
from collections.abc import Sequence

from nydusd.digest import DigestAlgorithm
from nydusd.rafs import layout as L
from nydusd.rafs.model import Bootstrap
from nydusd.rafs.numbering import Entry, data_size, number_tree, prefetch_entries, sb_flags
from nydusd.storage.chunk import ChunkInfo


# ---- v5 -------------------------------------------------------------------------------------------
def _v5_xattr_block(xattrs: dict[bytes, bytes]) -> bytes:
    if not xattrs:
        return b""
    payload = b"".join(L.V5_XATTR_PAIR.pack(len(k) + 1 + len(v)) + k + b"\0" + v
                       for k, v in sorted(xattrs.items()))
    return L.V5_XATTR_SIZE.pack(len(payload)) + _pad8(payload)


def _pad8(b: bytes) -> bytes:
    return b + bytes(-len(b) % 8)


def _v5_digests(entries: list[Entry], digester: DigestAlgorithm) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for e in reversed(entries):  # children always have larger indexes: post-order suffices
        n = e.primary.node
        if n.is_dir:
            out[e.index] = digester.hash(b"".join(out[c.index] for c in e.children))
        elif n.is_reg:
            out[e.index] = digester.hash(b"".join(c.digest for c in n.chunks))
        elif n.is_symlink:
            out[e.index] = digester.hash(n.symlink or b"")
        else:
            out[e.index] = digester.hash(b"")
    return out


def _v5_record(e: Entry, bootstrap: Bootstrap, digest: bytes) -> bytes:
    n = e.primary.node
    name = b"/" if e.parent is None else e.node.name
    xattr = _v5_xattr_block(n.xattrs)
    chunks: Sequence[ChunkInfo] = n.chunks if n.is_reg else ()
    if n.is_dir:
        size = L.align(sum(len(c.node.name) + 8 for c in e.children), 4096) or 4096
        child_index, child_count = e.child_index, len(e.children)
    else:
        size, child_index, child_count = data_size(e, bootstrap), 0, len(chunks)
    xattr_payload = len(xattr) - 8 if xattr else 0
    flags = (L.V5_INODE_SYMLINK if n.is_symlink else 0) | (L.V5_INODE_XATTR if xattr else 0)
    rdev = L.encode_dev(n.rdev) if stat.S_ISCHR(n.mode) or stat.S_ISBLK(n.mode) else 0
    uid, gid = (n.uid, n.gid) if bootstrap.explicit_uid_gid else (0, 0)
    symlink = n.symlink or b"" if n.is_symlink else b""
    head = L.V5_INODE.pack(digest, e.parent.ino if e.parent else 0, e.ino, uid, gid, 0, n.mode, size,
                           -(-(size + L.align(xattr_payload, 8)) // 512), flags, e.nlink, child_index,
                           child_count, len(name), len(symlink), rdev, n.mtime_nsec, n.mtime)
    recs = b"".join(L.CHUNK.pack(c.digest, c.blob_index, c.flags, c.compressed_size,
                                 c.uncompressed_size, c.compressed_offset, c.uncompressed_offset,
                                 c.file_offset, c.index, c.crc32) for c in chunks)
    return head + _pad8(name) + _pad8(symlink) + xattr + recs


def v5_bytes(bootstrap: Bootstrap) -> bytes:
    entries = number_tree(bootstrap)
    digests = _v5_digests(entries, bootstrap.digester)
    n = len(entries)
    has_xattr = any(e.node.xattrs for e in entries)
    prefetch = [e.ino for e in prefetch_entries(bootstrap, entries)]
    blob_table = bytearray()
    for i, b in enumerate(bootstrap.blobs):
        blob_table += L.V5_BLOB_HEAD.pack(b.readahead_offset, b.readahead_size) + b.blob_id.encode()
        if i + 1 < len(bootstrap.blobs):
            blob_table += b"\0"
    blob_table = bytearray(_pad8(bytes(blob_table)))
    ext = b"".join(L.V5_EXT_BLOB.pack(b.chunk_count, b.features, b.uncompressed_size, b.compressed_size)
                   for b in bootstrap.blobs)
    it_off = L.V5_SB_SIZE
    pf_off = it_off + L.align(4 * n, 8)
    bt_off = pf_off + L.align(4 * len(prefetch), 8)
    ext_off = bt_off + len(blob_table)
    rec_off = ext_off + len(ext)
    records, slots, pos = [], [], rec_off
    for e in entries:
        rec = _v5_record(e, bootstrap, digests[e.index])
        slots.append(pos >> 3)
        records.append(rec)
        pos += len(rec)
    distinct = len({e.ino for e in entries})
    sb = L.V5_SUPER.pack(L.V5_MAGIC, L.V5_VERSION, L.V5_SB_SIZE, bootstrap.chunk_size,
                         sb_flags(bootstrap, has_xattr, 5), distinct, it_off, pf_off, bt_off, n,
                         len(prefetch), len(blob_table), len(bootstrap.blobs),
                         ext_off if bootstrap.blobs else 0)
    table = b"".join(s.to_bytes(4, "little") for s in slots)
    pf = b"".join(i.to_bytes(4, "little") for i in prefetch)
    return b"".join([sb.ljust(L.V5_SB_SIZE, b"\0"), _pad8(table), _pad8(pf), bytes(blob_table), ext,
                     *records])


