"""RAFS v6 (EROFS-compatible) bootstrap decoding (spec §3).

Owns: ``RafsV6Super`` -- validation of the EROFS superblock, the RAFS extended superblock, device
slots and blob table at open time; on-demand decoding of compact/extended inodes, inline xattrs,
FLAT_PLAIN/FLAT_INLINE data (directories, symlinks), directory blocks (binary-searched per block),
chunk indexes and their resolution through the bootstrap chunk table (route 1 of §3.13).
Inode numbers are nids (``inode offset = meta_blkaddr * 4096 + nid * 32``).

Must not import fs, daemon, builder. Threading: see rafs_super.py (no cursor; lru caches; the lazy
chunk-table index is built once under ``self._lock``).
"""

from __future__ import annotations

import stat
import struct
from array import array
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

from nydusd.compress import Compressor
from nydusd.digest import DigestAlgorithm
from nydusd.errors import InvalidArgument, NotFound, Unsupported
from nydusd.rafs import layout as L
from nydusd.rafs.layout import corrupt, unpack_at
from nydusd.rafs.rafs_super import Inode, RafsSuper, StatTuple
from nydusd.storage.chunk import BlobInfo, ChunkInfo

INODE_CACHE_SIZE = 16384  # decoded inodes (~250 bytes each)
DIR_CACHE_SIZE = 4096  # directory geometries (a 5-tuple each); the table starts over when full
DIR_BLOCK_CACHE_SIZE = 256  # decoded directory blocks (up to ~300 entries each)
BS = L.V6_BLOCK_SIZE
_U32 = struct.Struct("<I")
_TYPES = (stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO,
          stat.S_IFSOCK)
_NO_RECORD = -1
_HH = struct.Struct("<HH")
_COMPACT = L.V6_COMPACT_INODE
_EXTENDED = L.V6_EXTENDED_INODE
_DIRENT = L.V6_DIRENT
#: i_format values ``_decode_inode`` accepts: bit 0 = extended, layout (bits 1-3) FLAT_PLAIN,
#: FLAT_INLINE or CHUNK_BASED, nothing above
_FORMATS = frozenset({0, 1, 4, 5, 8, 9})
_IFREG, _IFDIR, _IFLNK = stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK
_DEVICES = frozenset({stat.S_IFCHR, stat.S_IFBLK})
_OTHER_TYPES = frozenset({stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK})


class RafsV6Super(RafsSuper):
    """A RAFS v6 bootstrap over a buffer (mmap or bytes)."""

    version = 6

    def __init__(self, buf: Any, source: str = "") -> None:
        super().__init__(buf, source)
        self._parse_super()
        self._inode = lru_cache(maxsize=INODE_CACHE_SIZE)(self._decode_inode)
        self._dir_block = lru_cache(maxsize=DIR_BLOCK_CACHE_SIZE)(self._decode_dir_block)
        self._chunk_index: list[Any] | None = None
        #: directory nid -> (size, layout, i_u, inode offset, inode + xattr size): what reading
        #: its blocks needs, without an ``Inode``
        self._dirs: dict[int, tuple[int, int, int, int, int]] = {}
        root = self.get_inode(self.root_ino)
        if not root.is_dir:
            raise corrupt("root inode is not a directory", L.EROFS_SB_OFFSET + 14, "s_root_nid",
                          value=self.root_ino)

    # ---- superblocks and tables -----------------------------------------------------------------
    def _parse_super(self) -> None:
        buf = self._buf
        if len(buf) < L.V6_DEVT_OFFSET:
            raise corrupt("v6 bootstrap shorter than its superblocks", 0, "file_size", size=len(buf))
        sb = L.EROFS_SB_OFFSET
        (_magic, _sum, _compat, _bits, _slots, root_nid, inos, _bt, _btn, _blocks, meta_blkaddr, _xattr,
         _uuid, _vol, _incompat, _u, extra_devices, _slotoff) = self._check_erofs_super()
        ext = L.V6_EXT_SB_OFFSET
        (flags, bt_off, bt_size, chunk_size, ct_off, ct_size, pf_off, pf_size,
         _pad) = unpack_at(L.V6_EXT_SUPER, buf, ext, "ext_superblock")
        self._check_ext_flags(flags)
        if not L.is_pow2(chunk_size) or not L.MIN_CHUNK_SIZE <= chunk_size <= L.MAX_CHUNK_SIZE:
            raise corrupt("bad chunk size", ext + 20, "s_chunk_size", value=chunk_size)
        nblobs, rem = divmod(bt_size, L.V6_BLOB.size)
        if rem or nblobs != extra_devices or nblobs > L.V6_MAX_BLOBS:
            raise corrupt("blob table size does not match the device count", ext + 16,
                          "s_blob_table_size", value=bt_size, devices=extra_devices)
        self._check_range(bt_off, bt_size, ext + 8, "s_blob_table_offset", BS)
        if L.V6_DEVT_OFFSET + 128 * nblobs > len(buf):
            raise corrupt("device table exceeds the bootstrap", sb + 86, "s_extra_devices",
                          value=nblobs)
        if ct_size % L.CHUNK.size:
            raise corrupt("chunk table size not a multiple of 80", ext + 32, "s_chunk_table_size",
                          value=ct_size)
        if ct_size:
            self._check_range(ct_off, ct_size, ext + 24, "s_chunk_table_offset", BS)
        if pf_off and pf_size:
            if pf_size % 4:
                raise corrupt("bad prefetch table size", ext + 48, "s_prefetch_table_size",
                              value=pf_size)
            self._check_range(pf_off, pf_size, ext + 40, "s_prefetch_table_offset", 4)
        self._meta = meta_blkaddr * BS
        if self._meta >= len(buf):
            raise corrupt("metadata area outside the bootstrap", sb + 40, "s_meta_blkaddr",
                          value=meta_blkaddr)
        self.flags = flags
        self.chunk_size = chunk_size
        self.compressor = Compressor.from_sb_flags(flags)
        self.digester = DigestAlgorithm.from_sb_flags(flags)
        self.root_ino = root_nid
        self.inode_count = self.inodes_count_field = inos
        self._max_nid = (len(buf) - self._meta) // 32 - 1
        self._len = len(buf)
        self._ct_off, self._ct_n = ct_off, ct_size // L.CHUNK.size
        self._pf_off, self._pf_n = pf_off, (pf_size // 4 if pf_off else 0)
        self.blobs = [self._parse_blob(bt_off + i * L.V6_BLOB.size, i) for i in range(nblobs)]

    def _check_erofs_super(self) -> tuple[Any, ...]:
        sb = L.EROFS_SB_OFFSET
        fields = unpack_at(L.EROFS_SUPER, self._buf, sb, "erofs_superblock")
        (magic, checksum, compat, blkszbits, extslots, _root, _inos, _bt, _btn, _blocks, _meta,
         xattr_blkaddr, _uuid, _vol, incompat, _u, _devs, devt_slotoff) = fields
        checks = [(magic == L.EROFS_MAGIC, 0, "s_magic", magic),
                  (checksum == 0, 4, "s_checksum", checksum),
                  (compat & L.EROFS_COMPAT_RAFS_V6, 8, "s_feature_compat", compat),
                  (blkszbits == L.V6_BLOCK_BITS, 12, "s_blkszbits", blkszbits),
                  (extslots == 0, 13, "s_extslots", extslots),
                  (xattr_blkaddr == 0, 44, "s_xattr_blkaddr", xattr_blkaddr),
                  (incompat == L.EROFS_INCOMPAT_RAFS_V6, 80, "s_feature_incompat", incompat),
                  (devt_slotoff == L.V6_DEVT_SLOTOFF, 88, "s_devt_slotoff", devt_slotoff)]
        for ok, off, field, value in checks:
            if not ok:
                raise corrupt("invalid EROFS superblock field", sb + off, field, value=hex(value))
        return fields

    @staticmethod
    def _check_ext_flags(flags: int) -> None:
        off = L.V6_EXT_SB_OFFSET
        if flags & ~L.SB_KNOWN_FLAGS:
            raise corrupt("unknown superblock flags", off, "s_flags", value=hex(flags))
        if bin(flags & L.SB_COMPRESSION_BITS).count("1") != 1 or \
                bin(flags & L.SB_HASH_BITS).count("1") != 1:
            raise corrupt("v6 needs exactly one compressor and one digester flag", off, "s_flags",
                          value=hex(flags))
        if flags & L.SB_TARFS_MODE:
            raise Unsupported("image uses unsupported feature TARFS (superblock TARFS_MODE): the "
                              "blobs are raw tars", feature="TARFS", offset=off, field="s_flags",
                              value=hex(flags))

    def _check_range(self, off: int, size: int, sb_off: int, field: str, alignment: int) -> None:
        if off < BS or off % alignment or off + size > len(self._buf):
            raise corrupt("table outside the bootstrap or misaligned", sb_off, field, value=off,
                          size=size)

    def _parse_blob(self, off: int, i: int) -> BlobInfo:
        (raw_id, index, chunk_size, chunk_count, comp, dig, features, csize, usize, toc_size,
         ci_comp, ci_off, ci_csize, ci_usize, toc_digest, meta_digest, meta_size, _iv,
         _cipher) = unpack_at(L.V6_BLOB, self._buf, off, "blob_table")
        try:
            blob_id = raw_id.rstrip(b"\0").decode("ascii")
            compressor = Compressor.from_algo(comp)
            digester = DigestAlgorithm.from_algo(dig)
            ci_compressor = Compressor.from_algo(ci_comp)
        except (UnicodeDecodeError, ValueError) as e:
            raise corrupt(f"invalid blob table entry: {e}", off, "blob_table", index=i) from None
        if not blob_id or "\0" in blob_id:
            raise corrupt("empty or malformed blob id", off, "blob_id", index=i)
        if index != i:
            raise corrupt("blob index differs from its position", off + 64, "blob_index", value=index)
        if chunk_size != self.chunk_size:
            raise corrupt("blob chunk size differs from the superblock", off + 68, "chunk_size",
                          value=chunk_size)
        if chunk_count > L.V6_MAX_CHUNKS_PER_BLOB:
            raise corrupt("too many chunks in blob", off + 72, "chunk_count", value=chunk_count)
        if features & L.BLOB_INCOMPAT_UNKNOWN or features & L.BLOB_V5_NO_EXT:
            raise corrupt("unsupported blob features", off + 84, "features", value=hex(features))
        if not features & L.BLOB_ALIGNED:
            raise corrupt("v6 blobs must have 4 KiB-aligned chunks (ALIGNED)", off + 84, "features",
                          value=hex(features))
        return BlobInfo(blob_id=blob_id, blob_index=i, compressor=compressor, digester=digester,
                        chunk_size=chunk_size, chunk_count=chunk_count, compressed_size=csize,
                        uncompressed_size=usize, features=features, ci_compressor=ci_compressor,
                        ci_offset=ci_off, ci_compressed_size=ci_csize, ci_uncompressed_size=ci_usize,
                        blob_toc_size=toc_size, blob_toc_digest=toc_digest,
                        blob_meta_digest=meta_digest, blob_meta_size=meta_size)

    # ---- inodes ---------------------------------------------------------------------------------
    def get_inode(self, ino: int) -> Inode:
        if not 0 <= ino <= self._max_nid:
            raise NotFound("inode number out of range", ino=ino)
        return self._inode(ino)

    def _decode_inode(self, nid: int) -> Inode:
        buf, off = self._buf, self._meta + 32 * nid
        (fmt,) = struct.unpack_from("<H", buf, off)
        if fmt & 1:
            (fmt, icount, mode, _r, size, i_u, ino, uid, gid, mtime, nsec,
             nlink) = unpack_at(L.V6_EXTENDED_INODE, buf, off, "inode")
            base = 64
        else:
            (fmt, icount, mode, nlink, size, _r, i_u, ino, uid, gid,
             _r2) = unpack_at(L.V6_COMPACT_INODE, buf, off, "inode")
            base, mtime, nsec = 32, 0, 0
        layout = (fmt >> 1) & 7
        if fmt & ~0xF or layout not in (0, 2, 4):
            raise corrupt("unsupported inode format", off, "i_format", value=hex(fmt), nid=nid)
        ftype = stat.S_IFMT(mode)
        if ftype not in _TYPES:
            raise corrupt("unknown file type", off + 4, "i_mode", value=oct(mode), nid=nid)
        xsize = 12 + 4 * (icount - 1) if icount else 0
        isize = base + xsize
        if off + isize > len(buf):
            raise corrupt("inode exceeds the bootstrap", off, "i_xattr_icount", value=icount, nid=nid)
        inode = Inode(ino=nid, mode=mode, uid=uid, gid=gid, size=size, nlink=nlink,
                      rdev=L.decode_dev(i_u) if ftype in (stat.S_IFCHR, stat.S_IFBLK) else 0,
                      mtime=mtime, mtime_nsec=nsec, blocks=(size + 511) // 512,
                      has_xattr=bool(icount), meta_offset=off, layout=layout, raw_u=i_u,
                      inode_size=isize, xattr_offset=off + base if icount else 0,
                      chunk_offset=off + L.align(isize, 8), index=ino)
        self._check_layout(inode, ftype)
        return inode

    def _check_layout(self, inode: Inode, ftype: int) -> None:
        off, size, n = inode.meta_offset, inode.size, len(self._buf)
        if ftype == stat.S_IFREG and inode.layout == L.V6_LAYOUT_CHUNK_BASED:
            nchunks = -(-size // self.chunk_size)
            if inode.chunk_offset + 8 * nchunks > n:
                raise corrupt("chunk indexes exceed the bootstrap", off + 8, "i_size", value=size,
                              nid=inode.ino)
            return
        if inode.layout == L.V6_LAYOUT_CHUNK_BASED or (ftype == stat.S_IFREG and size):
            raise corrupt("data layout does not fit the file type", off, "i_format",
                          value=inode.layout, nid=inode.ino)
        if ftype in (stat.S_IFDIR, stat.S_IFLNK):
            if ftype == stat.S_IFLNK and not 1 <= size <= 4096:
                raise corrupt("bad symlink length", off + 8, "i_size", value=size, nid=inode.ino)
            if ftype == stat.S_IFDIR and size < 12:
                raise corrupt("directory without entries", off + 8, "i_size", value=size, nid=inode.ino)
            nblocks = -(-size // BS)
            plain = nblocks if inode.layout == L.V6_LAYOUT_FLAT_PLAIN else nblocks - 1
            if plain and (inode.raw_u + plain) * BS > n:
                raise corrupt("data blocks outside the bootstrap", off + 16, "i_u",
                              value=inode.raw_u, nid=inode.ino)
            if inode.layout == L.V6_LAYOUT_FLAT_INLINE:
                tail = size - (nblocks - 1) * BS
                if off % BS + inode.inode_size + tail > BS or off + inode.inode_size + tail > n:
                    raise corrupt("inline data crosses its block", off, "i_size", value=size,
                                  nid=inode.ino)

    # ---- attributes without an Inode (listings: one per entry) -------------------------------
    def stat(self, ino: int) -> StatTuple:
        if not 0 <= ino <= self._max_nid:
            raise NotFound("inode number out of range", ino=ino)
        return self._stat(ino)

    def _stat(self, nid: int) -> StatTuple:
        """``StatTuple`` of an in-range ``nid``: the checks of ``_decode_inode`` + ``_check_layout``
        as plain arithmetic on one or two ``unpack_from``; anything they would reject (or that
        this shortcut does not cover) goes to ``_decode_inode`` itself, which raises the error --
        so the fast path never answers differently from the reference decoder."""
        buf, n = self._buf, self._len
        off = self._meta + 32 * nid
        fmt, icount, mode, nlink, size, _r, i_u, _ino, uid, gid, _r2 = _COMPACT.unpack_from(buf, off)
        if fmt & 1:
            if off + 64 > n:
                return self._stat_slow(nid)
            (fmt, icount, mode, _r, size, i_u, _ino, uid, gid, mtime, nsec,
             nlink) = _EXTENDED.unpack_from(buf, off)
            isize = 64
        else:
            isize, mtime, nsec = 32, 0, 0
        if icount:
            isize += 4 * icount + 8
        ftype = mode & 0o170000
        if fmt not in _FORMATS or off + isize > n:
            return self._stat_slow(nid)
        chunked = fmt & 8
        if ftype == _IFREG:
            if chunked:
                if off + ((isize + 7) & ~7) + 8 * -(-size // self.chunk_size) > n:
                    return self._stat_slow(nid)
            elif size:
                return self._stat_slow(nid)
        elif chunked:
            return self._stat_slow(nid)
        elif ftype in (_IFDIR, _IFLNK):
            if (size < 12) if ftype == _IFDIR else not 1 <= size <= BS:
                return self._stat_slow(nid)
            nblocks = -(-size // BS)
            if fmt & 4:  # FLAT_INLINE: the last block follows the inode, inside its block
                tail = size - (nblocks - 1) * BS
                if (nblocks > 1 and (i_u + nblocks - 1) * BS > n) or off % BS + isize + tail > BS \
                        or off + isize + tail > n:
                    return self._stat_slow(nid)
            elif (i_u + nblocks) * BS > n:
                return self._stat_slow(nid)
        elif ftype in _DEVICES:
            return (nid, mode, nlink, uid, gid, L.decode_dev(i_u), size, (size + 511) >> 9, mtime,
                    nsec)
        elif ftype not in _OTHER_TYPES:
            return self._stat_slow(nid)
        return (nid, mode, nlink, uid, gid, 0, size, (size + 511) >> 9, mtime, nsec)

    def _stat_slow(self, nid: int) -> StatTuple:
        i = self._decode_inode(nid)  # raises the reference decoder's error
        return (i.ino, i.mode, i.nlink, i.uid, i.gid, i.rdev, i.size, i.blocks, i.mtime, i.mtime_nsec)

    def dir_stats(self, ino: int) -> list[tuple[bytes, StatTuple]]:
        size = self._dir(ino)[0]
        st = self._stat
        out: list[tuple[bytes, StatTuple]] = []
        for b in range(-(-size // BS)):
            out += [(name, st(nid)) for name, nid, _ft in self._dir_block(ino, b)]
        return out

    def _block(self, geo: tuple[int, int, int, int, int], b: int) -> bytes:
        """Data block ``b`` of a FLAT inode (``geo`` as ``_dir`` gives it), cut to its valid length."""
        size, layout, raw_u, meta_offset, inode_size = geo
        valid = min(BS, size - b * BS)
        if layout == L.V6_LAYOUT_FLAT_INLINE and b == -(-size // BS) - 1:
            start = meta_offset + inode_size
        else:
            start = (raw_u + b) * BS
        return bytes(self._buf[start:start + valid])

    @staticmethod
    def _geo(inode: Inode) -> tuple[int, int, int, int, int]:
        return inode.size, inode.layout, inode.raw_u, inode.meta_offset, inode.inode_size

    # ---- directories --------------------------------------------------------------------------------
    def _decode_dir_block(self, nid: int, b: int) -> tuple[tuple[bytes, int, int], ...]:
        geo = self._dir(nid)
        data = self._block(geo, b)
        size = len(data)
        if size >= 12:
            first = data[8] | data[9] << 8
            if first % 12 == 0 and 0 < first <= size:
                ents = list(_DIRENT.iter_unpack(data[:first]))
                offs = [e[1] for e in ents]
                nul = data.find(b"\0", offs[-1])
                offs.append(nul if nul >= 0 else size)
                # every name ends where the next begins (the last at its NUL or the block's end):
                # strictly increasing offsets, none longer than 255 bytes, no '/' or NUL in them
                # (one scan of the contiguous name area), every nid inside the bootstrap
                ends = offs[1:]
                if all(map(int.__lt__, offs, ends)) and max(map(int.__sub__, ends, offs)) <= 255 \
                        and max(ents)[0] <= self._max_nid:
                    area = data[offs[0]:offs[-1]]
                    if b"/" not in area and b"\0" not in area:
                        return tuple((data[a:z], e[0], e[2])
                                     for a, z, e in zip(offs, ends, ents, strict=False))
        return self._decode_dir_block_checked(geo, data, nid, b)

    def _decode_dir_block_checked(self, geo: tuple[int, int, int, int, int], data: bytes, nid: int,
                                  b: int) -> tuple[tuple[bytes, int, int], ...]:
        """The entry-by-entry decode that names the first bad field (the reference decoder)."""
        _size, layout, raw_u, meta_offset, _isize = geo
        where = meta_offset if layout == L.V6_LAYOUT_FLAT_INLINE else (raw_u + b) * BS
        if len(data) < 12:
            raise corrupt("directory block too short", where, "dirent", nid=nid, block=b)
        first = struct.unpack_from("<H", data, 8)[0]
        count, rem = divmod(first, 12)
        if rem or count == 0 or first > len(data):
            raise corrupt("bad first name offset", where, "e_nameoff", value=first, nid=nid, block=b)
        ents = [L.V6_DIRENT.unpack_from(data, 12 * k) for k in range(count)]
        out = []
        for k, (e_nid, nameoff, ftype, _r) in enumerate(ents):
            end = ents[k + 1][1] if k + 1 < count else len(data)
            if k + 1 == count:
                nul = data.find(b"\0", nameoff)
                end = nul if nul >= 0 else end
            if not nameoff < end <= len(data) or end - nameoff > 255:
                raise corrupt("bad directory entry name", where + 12 * k, "e_nameoff",
                              value=nameoff, nid=nid, block=b)
            if e_nid > self._max_nid:
                raise corrupt("directory entry points outside the bootstrap", where + 12 * k,
                              "e_nid", value=e_nid, nid=nid)
            name = data[nameoff:end]
            if b"/" in name or b"\0" in name:
                raise corrupt("invalid file name", where + nameoff, "name", nid=nid, block=b)
            out.append((name, e_nid, ftype))
        return tuple(out)

    def _dir(self, ino: int) -> tuple[int, int, int, int, int]:
        """The geometry of directory ``ino`` (see ``_dirs``). Raises as ``get_inode``, and
        InvalidArgument for another file type."""
        geo = self._dirs.get(ino)
        if geo is None:
            st = self.stat(ino)  # the inode's checks, fast or through the reference decoder
            if st[1] & 0o170000 != _IFDIR:
                raise InvalidArgument("inode is not a dir", ino=ino)
            off = self._meta + 32 * ino
            fmt, icount = _HH.unpack_from(self._buf, off)
            (i_u,) = _U32.unpack_from(self._buf, off + 16)  # compact and extended alike
            isize = (64 if fmt & 1 else 32) + (4 * icount + 8 if icount else 0)
            geo = (st[6], (fmt >> 1) & 7, i_u, off, isize)
            if len(self._dirs) >= DIR_CACHE_SIZE:
                self._dirs = {}
            self._dirs[ino] = geo
        return geo

    def lookup(self, parent_ino: int, name: bytes) -> Inode:
        return self._entry_inode(self._lookup_nid(parent_ino, name))

    def lookup_stat(self, parent_ino: int, name: bytes) -> StatTuple:
        return self._stat(self._lookup_nid(parent_ino, name))  # the dirent nid is in range

    def _lookup_nid(self, parent_ino: int, name: bytes) -> int:
        lo, hi = 0, -(-self._dir(parent_ino)[0] // BS) - 1
        while lo <= hi:
            mid = (lo + hi) // 2
            ents = self._dir_block(parent_ino, mid)
            if name < ents[0][0]:
                hi = mid - 1
            elif name > ents[-1][0]:
                lo = mid + 1
            else:
                a, z = 0, len(ents) - 1
                while a <= z:
                    m = (a + z) // 2
                    if ents[m][0] == name:
                        return int(ents[m][1])
                    if ents[m][0] < name:
                        a = m + 1
                    else:
                        z = m - 1
                break
        raise self._not_found(parent_ino, name)

    def _entry_inode(self, nid: int) -> Inode:
        # The dirent nid was range-checked, so a failure here is a corrupt inode, never NotFound.
        return self.get_inode(nid)

    def iter_dir(self, ino: int, offset: int = 0) -> Iterator[tuple[bytes, int, int]]:
        size = self._dir(ino)[0]
        pos = 0
        for b in range(-(-size // BS)):
            ents = self._dir_block(ino, b)
            if pos + len(ents) <= offset:
                pos += len(ents)
                continue
            for name, nid, _ft in ents:
                pos += 1
                if pos > offset:
                    yield name, nid, pos

    # ---- symlinks, xattrs, chunks ----------------------------------------------------------------
    def readlink(self, ino: int) -> bytes:
        inode = self.get_inode(ino)
        self._require(inode, "symlink")
        geo = self._geo(inode)
        return b"".join(self._block(geo, b) for b in range(-(-inode.size // BS)))

    def xattrs(self, ino: int) -> dict[bytes, bytes]:
        inode = self.get_inode(ino)
        if not inode.xattr_offset:
            return {}
        buf, start = self._buf, inode.xattr_offset
        end = inode.meta_offset + inode.inode_size
        _r, shared = unpack_at(L.V6_XATTR_HEADER, buf, start, "xattr_header")
        if shared:
            raise corrupt("shared xattrs are not supported", start + 4, "h_shared_count", value=shared)
        out: dict[bytes, bytes] = {}
        pos = start + L.V6_XATTR_HEADER.size
        while pos + L.V6_XATTR_ENTRY.size <= end:
            name_len, index, vsize = L.V6_XATTR_ENTRY.unpack_from(buf, pos)
            prefix = L.V6_XATTR_PREFIXES.get(index)
            total = L.V6_XATTR_ENTRY.size + name_len + vsize
            if prefix is None or pos + total > end:
                raise corrupt("bad inline xattr entry", pos, "e_name_index", value=index, nid=ino)
            body = bytes(buf[pos + 4:pos + total])
            out[prefix + body[:name_len]] = body[name_len:]
            pos += L.align(total, 4)
        return out

    def chunks(self, ino: int) -> list[ChunkInfo]:
        inode = self.get_inode(ino)
        self._require(inode, "reg")
        if inode.layout != L.V6_LAYOUT_CHUNK_BASED:
            return []
        n = -(-inode.size // self.chunk_size)
        out = []
        for i in range(n):
            off = inode.chunk_offset + 8 * i
            lo, hi, blk = L.V6_CHUNK_INDEX.unpack_from(self._buf, off)
            if blk == L.V6_NULL_BLKADDR:
                continue  # a hole: reads as zeros
            blob_index, ci_index = (hi & 0xFF) - 1, lo | (hi >> 8) << 16
            if not 0 <= blob_index < len(self.blobs):
                raise corrupt("chunk index refers to a missing blob", off + 2, "c_blob_addr_hi",
                              value=hi, nid=ino)
            chunk = self._resolve_chunk(blob_index, ci_index, blk, off, i)
            expect = min(self.chunk_size, inode.size - i * self.chunk_size)
            if chunk.uncompressed_size != expect:
                raise corrupt("chunk size does not match the file", off, "uncompressed_size",
                              value=chunk.uncompressed_size, expected=expect, nid=ino)
            out.append(chunk)
        return out

    def _resolve_chunk(self, blob_index: int, ci_index: int, blk: int, off: int, i: int) -> ChunkInfo:
        table = self._chunk_table_index()[blob_index]
        rec_no = table.get(ci_index, _NO_RECORD) if isinstance(table, dict) else (
            table[ci_index] if ci_index < len(table) else _NO_RECORD)
        if rec_no == _NO_RECORD:
            raise corrupt("chunk index not in the chunk table", off, "c_blob_addr_lo",
                          value=ci_index, blob_index=blob_index)
        rec_off = self._ct_off + L.CHUNK.size * rec_no
        digest, _b, flags, csize, usize, coff, uoff, _foff, index, crc = L.CHUNK.unpack_from(
            self._buf, rec_off)
        if uoff // BS != blk or uoff % BS:
            raise corrupt("chunk index block address differs from the chunk table", off + 4,
                          "c_blk_addr", value=blk, chunk_table=uoff)
        if not 0 < usize <= self.chunk_size or csize > 2 * L.MAX_CHUNK_SIZE:
            raise corrupt("bad chunk size in the chunk table", rec_off + 40, "uncompressed_size",
                          value=usize)
        return ChunkInfo(digest=digest, blob_index=blob_index, flags=flags, compressed_size=csize,
                         uncompressed_size=usize, compressed_offset=coff, uncompressed_offset=uoff,
                         file_offset=i * self.chunk_size, index=index, crc32=crc)

    def _chunk_table_index(self) -> list[Any]:
        """Per blob: ci_index -> chunk-table record number (array, or dict when sparse)."""
        with self._lock:
            if self._chunk_index is None:
                self._chunk_index = self._build_chunk_index()
            return self._chunk_index

    def _build_chunk_index(self) -> list[Any]:
        n = self._ct_n
        tables: list[Any] = []
        for blob in self.blobs:
            dense = blob.chunk_count <= 2 * n + 16
            tables.append(array("i", [_NO_RECORD]) * blob.chunk_count if dense else {})
        raw = bytes(self._buf[self._ct_off:self._ct_off + n * L.CHUNK.size])
        for r, rec in enumerate(L.CHUNK.iter_unpack(raw)):
            blob_index, index = rec[1], rec[8]
            if blob_index >= len(tables):
                raise corrupt("chunk table record refers to a missing blob",
                              self._ct_off + r * L.CHUNK.size + 32, "blob_index", value=blob_index)
            table = tables[blob_index]
            if isinstance(table, dict) or index < len(table):
                table[index] = r
            else:
                raise corrupt("chunk table index beyond the blob's chunk count",
                              self._ct_off + r * L.CHUNK.size + 72, "index", value=index)
        return tables

    def prefetch_inodes(self) -> list[int]:
        out = []
        for i in range(self._pf_n):
            (nid,) = unpack_at(_U32, self._buf, self._pf_off + 4 * i, "prefetch_table")
            if nid == 0:
                break
            if nid > self._max_nid:
                raise corrupt("prefetch entry out of range", self._pf_off + 4 * i, "prefetch_table",
                              value=nid)
            out.append(nid)
        return out
