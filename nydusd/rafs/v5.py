"""RAFS v5 bootstrap decoding (spec §2): superblock, tables, inode records, chunk records.

Owns: ``RafsV5Super`` -- validation of the superblock and its tables at open time, and on-demand
decoding of inode records (bounded LRU cache), names, symlinks, xattr blocks and chunk records.
Inode numbers are the records' ``i_ino``; inode *index* k lives in inode-table slot k-1.

Must not import fs, daemon, builder. Threading: see rafs_super.py (no cursor, cached decodes).
"""

from __future__ import annotations

import stat
import struct
from collections.abc import Iterator
from dataclasses import replace
from functools import lru_cache
from typing import Any

from nydusd.compress import Compressor
from nydusd.digest import DigestAlgorithm
from nydusd.errors import CorruptMetadata, NotFound, Unsupported
from nydusd.rafs import layout as L
from nydusd.rafs.layout import corrupt, unpack_at
from nydusd.rafs.rafs_super import Inode, RafsSuper
from nydusd.storage.chunk import BlobInfo, ChunkInfo

INODE_CACHE_SIZE = 16384  # decoded records (~300 bytes each with the name)
_TYPES = (stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO,
          stat.S_IFSOCK)
_U32 = struct.Struct("<I")


class RafsV5Super(RafsSuper):
    """A RAFS v5 bootstrap over a buffer (mmap or bytes). Raises CorruptMetadata at open time for
    a malformed superblock / table and later for malformed records."""

    version = 5
    root_ino = 1

    def __init__(self, buf: Any, source: str = "") -> None:
        super().__init__(buf, source)
        self._parse_super()
        self._record = lru_cache(maxsize=INODE_CACHE_SIZE)(self._decode_index)
        try:
            root_is_dir = self.get_inode(self.root_ino).is_dir
        except CorruptMetadata:
            self._refuse_prerelease_layout()
            raise
        if not root_is_dir:
            self._refuse_prerelease_layout()
            raise corrupt("root inode is not a directory", self._it_off, "inode_table")

    def _refuse_prerelease_layout(self) -> None:
        """Raise Unsupported when the root record has the pre-release (2021) v5 inode layout
        (spec §8: a directory mode at +52 where the current layout has i_gid, zero at +48, and
        no directory mode at +60): such images are old, not corrupt."""
        try:
            (v,) = unpack_at(_U32, self._buf, self._it_off, "inode_table")
            off = v << 3
            zero, old_mode = struct.unpack_from("<II", self._buf, off + 48)
            (new_mode,) = struct.unpack_from("<I", self._buf, off + 60)
        except (CorruptMetadata, struct.error):
            return
        if zero == 0 and stat.S_ISDIR(old_mode) and not stat.S_ISDIR(new_mode):
            raise Unsupported("pre-release (2021) RAFS v5 inode layout: not supported (upstream "
                              "cannot read it either), rebuild the image", offset=off + 52,
                              field="i_mode")

    # ---- superblock and tables ----------------------------------------------------------------------
    def _parse_super(self) -> None:
        buf = self._buf
        size = len(buf)
        if size <= L.V5_SB_SIZE or size % 8:
            raise corrupt("v5 bootstrap size must exceed 8192 and be a multiple of 8", 0, "file_size",
                          size=size)
        (magic, version, sb_size, chunk_size, flags, inodes_count, it_off, pf_off, bt_off, it_n,
         pf_n, bt_size, ext_n, ext_off) = unpack_at(L.V5_SUPER, buf, 0, "superblock")
        if magic != L.V5_MAGIC:
            raise corrupt("bad v5 magic", 0, "s_magic", value=hex(magic))
        if version != L.V5_VERSION:
            raise corrupt("unsupported v5 version", 4, "s_fs_version", value=hex(version))
        if sb_size != L.V5_SB_SIZE:
            raise corrupt("bad superblock size", 8, "s_sb_size", value=sb_size)
        if not L.is_pow2(chunk_size) or not L.MIN_CHUNK_SIZE <= chunk_size <= L.MAX_CHUNK_SIZE:
            raise corrupt("bad chunk size", 12, "s_block_size", value=chunk_size)
        if flags & ~L.SB_KNOWN_FLAGS:
            raise corrupt("unknown superblock flags", 16, "s_flags", value=hex(flags))
        if not 1 <= it_n <= L.V5_MAX_INODES:
            raise corrupt("bad inode table entry count", 56, "s_inode_table_entries", value=it_n)
        if inodes_count > it_n:
            raise corrupt("more inodes than inode table slots", 24, "s_inodes_count", value=inodes_count)
        regions = [("s_inode_table_offset", 32, it_off, L.align(4 * it_n, 8)),
                   ("s_prefetch_table_offset", 40, pf_off, L.align(4 * pf_n, 8)),
                   ("s_blob_table_offset", 48, bt_off, bt_size),
                   ("s_extended_blob_table_offset", 72, ext_off, 64 * ext_n)]
        self._check_regions(regions, size)
        self.flags = flags
        self.chunk_size = chunk_size
        self.compressor = Compressor.from_sb_flags(flags)
        self.digester = DigestAlgorithm.from_sb_flags(flags)
        self.inode_count = it_n
        self.inodes_count_field = inodes_count
        self._it_off, self._n = it_off, it_n
        self._pf_off, self._pf_n = pf_off, pf_n
        self.blobs = self._parse_blobs(bt_off, bt_size, ext_off, ext_n)

    @staticmethod
    def _check_regions(regions: list[tuple[str, int, int, int]], size: int) -> None:
        used: list[tuple[int, int, str]] = []
        for field, sb_off, off, length in regions:
            if length == 0:
                continue
            if off < L.V5_SB_SIZE or off % 8 or off + length > size:
                raise corrupt("table outside the bootstrap or misaligned", sb_off, field,
                              value=off, length=length)
            for start, end, other in used:
                if off < end and start < off + length:
                    raise corrupt(f"table overlaps {other}", sb_off, field, value=off)
            used.append((off, off + length, field))

    def _parse_blobs(self, bt_off: int, bt_size: int, ext_off: int, ext_n: int) -> list[BlobInfo]:
        buf = self._buf
        entries: list[tuple[int, int, str]] = []
        pos, end = bt_off, bt_off + bt_size
        while end - pos > 8:
            ra_off, ra_size = unpack_at(L.V5_BLOB_HEAD, buf, pos, "blob_table")
            raw = bytes(buf[pos + 8:end])
            nul = raw.find(b"\0")
            raw_id = raw if nul < 0 else raw[:nul]
            try:
                blob_id = raw_id.decode("ascii")
            except UnicodeDecodeError:
                raise corrupt("blob id is not ASCII", pos + 8, "blob_id") from None
            if not blob_id:
                break  # only padding left
            entries.append((ra_off, ra_size, blob_id))
            pos += 8 + len(raw_id) + 1
        if ext_n and ext_n < len(entries):
            raise corrupt("extended blob table shorter than the blob table", 68,
                          "s_extended_blob_table_entries", value=ext_n, blobs=len(entries))
        blobs = []
        for i, (ra_off, ra_size, blob_id) in enumerate(entries):
            count = features = usize = csize = 0
            if ext_n:
                count, features, usize, csize = unpack_at(L.V5_EXT_BLOB, buf, ext_off + 64 * i,
                                                          "extended_blob_table")
                if features & (L.BLOB_INCOMPAT_UNKNOWN | L.BLOB_V5_NO_EXT):
                    raise corrupt("unsupported blob features", ext_off + 64 * i + 4, "features",
                                  value=hex(features))
            blobs.append(BlobInfo(blob_id=blob_id, blob_index=i, compressor=self.compressor,
                                  digester=self.digester, chunk_size=self.chunk_size,
                                  chunk_count=count, compressed_size=csize, uncompressed_size=usize,
                                  features=features, readahead_offset=ra_off,
                                  readahead_size=ra_size))
        return blobs

    # ---- inode records ------------------------------------------------------------------------------
    def _decode_index(self, index: int) -> Inode:
        """Decode the record of inode index ``index`` (1-based) with every bound checked."""
        buf = self._buf
        slot_off = self._it_off + 4 * (index - 1)
        (v,) = unpack_at(_U32, buf, slot_off, "inode_table")
        if v <= 1024 or v >= 1 << 29:
            raise corrupt("inode table slot out of range", slot_off, "inode_table", value=v, index=index)
        off = v << 3
        (_digest, parent, ino, uid, gid, _projid, mode, size, blocks, iflags, nlink, child_index,
         child_count, name_size, symlink_size, rdev, nsec, mtime) = unpack_at(L.V5_INODE, buf, off,
                                                                              "inode")
        self._check_record(off, index, ino, mode, iflags, name_size, symlink_size, child_index,
                           child_count)
        name_off = off + L.V5_INODE.size
        sym_off = name_off + L.align(name_size, 8)
        tail = sym_off + L.align(symlink_size, 8)
        xattr_off = 0
        if iflags & L.V5_INODE_XATTR:
            xattr_off = tail
            (payload,) = unpack_at(L.V5_XATTR_SIZE, buf, tail, "xattr_size")
            tail += 8 + L.align(payload, 8)
            if tail > len(buf):
                raise corrupt("xattr block exceeds the bootstrap", xattr_off, "xattr_size", value=payload)
        name = bytes(buf[name_off:name_off + name_size])
        if index != 1 and (b"/" in name or b"\0" in name or name in (b".", b"..")):
            raise corrupt("invalid file name", name_off, "name", index=index)
        ftype = stat.S_IFMT(mode)
        if ftype == stat.S_IFREG and tail + L.CHUNK.size * child_count > len(buf):
            raise corrupt("chunk records exceed the bootstrap", tail, "i_child_count", value=child_count)
        if ftype == stat.S_IFLNK:
            size = symlink_size
        is_dev = ftype in (stat.S_IFCHR, stat.S_IFBLK)
        return Inode(ino=ino, mode=mode, uid=uid, gid=gid, size=size, nlink=nlink,
                     rdev=L.decode_dev(rdev) if is_dev else 0, mtime=mtime, mtime_nsec=nsec,
                     blocks=blocks, has_xattr=bool(xattr_off), meta_offset=off,
                     child_index=child_index, child_count=child_count,
                     name=name, symlink_offset=sym_off,
                     inode_size=symlink_size, xattr_offset=xattr_off, chunk_offset=tail, index=index,
                     parent=parent, has_hole=bool(iflags & L.V5_INODE_HAS_HOLE))

    def _check_record(self, off: int, index: int, ino: int, mode: int, iflags: int, name_size: int,
                      symlink_size: int, child_index: int, child_count: int) -> None:
        ftype = stat.S_IFMT(mode)
        if ftype not in _TYPES:
            raise corrupt("unknown file type", off + 60, "i_mode", value=oct(mode))
        if not 1 <= ino <= self._n:
            raise corrupt("inode number out of range", off + 40, "i_ino", value=ino)
        if iflags & ~L.V5_INODE_KNOWN:
            raise corrupt("unknown inode flags", off + 80, "i_flags", value=hex(iflags))
        if not 1 <= name_size <= 256 or (index != 1 and name_size > 255):
            raise corrupt("bad name length", off + 100, "i_name_size", value=name_size)
        if (ftype == stat.S_IFLNK) != (symlink_size > 0):
            raise corrupt("symlink size does not match the file type", off + 102, "i_symlink_size",
                          value=symlink_size)
        if ftype == stat.S_IFDIR and child_count:
            if child_index <= index or child_index + child_count - 1 > self._n:
                raise corrupt("directory children out of range", off + 92, "i_child_index",
                              value=child_index, count=child_count)
        elif ftype not in (stat.S_IFDIR, stat.S_IFREG) and child_count:
            raise corrupt("child count on a non-directory", off + 96, "i_child_count", value=child_count)
        if ftype == stat.S_IFDIR and ino != index:
            raise corrupt("directory inode number differs from its index", off + 40, "i_ino", value=ino)

    def _by_index(self, index: int) -> Inode:
        if not 1 <= index <= self._n:
            raise NotFound("inode index out of range", index=index)
        return self._record(index)

    def get_inode(self, ino: int) -> Inode:
        inode = self._by_index(ino)
        if inode.ino != ino:
            raise CorruptMetadata("inode number differs from its table slot", offset=inode.meta_offset,
                                  field="i_ino", value=inode.ino, slot=ino)
        return inode

    def lookup(self, parent_ino: int, name: bytes) -> Inode:
        parent = self.get_inode(parent_ino)
        self._require(parent, "dir")
        if name == b".":
            return parent
        if name == b"..":
            return self.get_inode(parent.parent or self.root_ino)
        lo, hi = parent.child_index, parent.child_index + parent.child_count - 1
        while lo <= hi:
            mid = (lo + hi) // 2
            rec = self._by_index(mid)
            if rec.name == name:
                return self._link_target(rec)
            if rec.name < name:
                lo = mid + 1
            else:
                hi = mid - 1
        raise self._not_found(parent_ino, name)

    def iter_dir(self, ino: int, offset: int = 0) -> Iterator[tuple[bytes, int, int]]:
        inode = self.get_inode(ino)
        self._require(inode, "dir")
        if offset <= 0:
            yield b".", ino, 1
        if offset <= 1:
            yield b"..", inode.parent or self.root_ino, 2
        for k in range(max(offset - 2, 0), inode.child_count):
            rec = self._link_target(self._by_index(inode.child_index + k))
            yield rec.name, rec.ino, k + 3

    def _link_target(self, rec: Inode) -> Inode:
        """``rec`` itself, or for a later name of a hardlink group the group's first record
        (must be a regular file too, else the numbering is corrupt)."""
        if rec.ino == rec.index:
            return rec
        first = self.get_inode(rec.ino)
        if not (rec.is_reg and first.is_reg):
            raise corrupt("hard link to a non-regular inode", rec.meta_offset + 40, "i_ino",
                          value=rec.ino, index=rec.index)
        return replace(first, name=rec.name, parent=rec.parent)

    def readlink(self, ino: int) -> bytes:
        inode = self.get_inode(ino)
        self._require(inode, "symlink")
        start = inode.symlink_offset
        return bytes(self._buf[start:start + inode.inode_size])

    def xattrs(self, ino: int) -> dict[bytes, bytes]:
        inode = self.get_inode(ino)
        if not inode.xattr_offset:
            return {}
        buf, off = self._buf, inode.xattr_offset
        (payload,) = unpack_at(L.V5_XATTR_SIZE, buf, off, "xattr_size")
        pos, end = off + 8, off + 8 + payload
        out: dict[bytes, bytes] = {}
        while pos < end:
            (plen,) = unpack_at(L.V5_XATTR_PAIR, buf, pos, "xattr_pair")
            if pos + 4 + plen > end:
                raise corrupt("xattr pair exceeds its block", pos, "xattr_pair", value=plen)
            pair = bytes(buf[pos + 4:pos + 4 + plen])
            name, sep, value = pair.partition(b"\0")
            if not sep or not name:
                raise corrupt("xattr pair without a name", pos, "xattr_pair")
            out[name] = value
            pos += 4 + plen
        return out

    def chunks(self, ino: int) -> list[ChunkInfo]:
        inode = self.get_inode(ino)
        self._require(inode, "reg")
        off, n = inode.chunk_offset, inode.child_count
        out = []
        for i in range(n):
            rec = unpack_at(L.CHUNK, self._buf, off + i * L.CHUNK.size, "chunk")
            out.append(self._chunk(rec, off + i * L.CHUNK.size))
        return out

    def _chunk(self, rec: tuple[Any, ...], off: int) -> ChunkInfo:
        digest, blob_index, flags, csize, usize, coff, uoff, foff, index, crc = rec
        if blob_index >= len(self.blobs):
            raise corrupt("chunk refers to a missing blob", off + 32, "blob_index", value=blob_index)
        if usize > self.chunk_size or csize > L.MAX_CHUNK_SIZE * 2:
            raise corrupt("chunk size exceeds the limit", off + 40, "chunk_size", value=usize)
        return ChunkInfo(digest=digest, blob_index=blob_index, flags=flags, compressed_size=csize,
                         uncompressed_size=usize, compressed_offset=coff, uncompressed_offset=uoff,
                         file_offset=foff, index=index, crc32=crc)

    def prefetch_inodes(self) -> list[int]:
        out = []
        for i in range(self._pf_n):
            (ino,) = unpack_at(_U32, self._buf, self._pf_off + 4 * i, "prefetch_table")
            if ino == 0:
                break
            if ino > self._n:
                raise corrupt("prefetch entry out of range", self._pf_off + 4 * i, "prefetch_table",
                              value=ino)
            out.append(ino)
        return out

    def _parent_map(self) -> dict[int, tuple[int, bytes]]:
        # v5 records carry their parent and name: no walk needed.
        return _V5Parents(self)

    def record_digest(self, ino: int) -> bytes:
        """The stored Merkle digest ``i_digest`` of inode ``ino``."""
        inode = self.get_inode(ino)
        return bytes(self._buf[inode.meta_offset:inode.meta_offset + 32])


class _V5Parents(dict):  # type: ignore[type-arg]
    """Read-only mapping ino -> (parent ino, name) computed from the records on demand."""

    def __init__(self, sb: RafsV5Super) -> None:
        super().__init__()
        self._sb = sb

    def __contains__(self, ino: object) -> bool:
        return isinstance(ino, int) and 1 <= ino <= self._sb.inode_count

    def __getitem__(self, ino: int) -> tuple[int, bytes]:
        rec = self._sb.get_inode(ino)
        return rec.parent, rec.name
