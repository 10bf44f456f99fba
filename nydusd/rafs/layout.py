"""On-disk records of RAFS v5/v6 bootstraps and v6 blob trailers: one ``struct.Struct`` per record.

Owns: every magic, version, flag and feature constant of the format and the ``Struct`` of every
record (field list with offsets beside each), plus the tiny checked-decoding helpers every parser uses
(``unpack_at`` raises CorruptMetadata naming offset and field instead of ``struct.error``) and the
Linux device-number encoding. Nothing else: parsing logic lives in v5.py / v6.py / blobmeta.py.
Spec: shared/spec/rafs-format.md (section numbers in comments).

Must not import anything but ``nydusd.errors``. Threading: constants and immutable Structs only.
"""

from __future__ import annotations

import os
import struct
from typing import Any

from nydusd.errors import CorruptMetadata

# ---- shared (§1) -------------------------------------------------------------------------------
DIGEST_SIZE = 32
MIN_CHUNK_SIZE = 0x1000
MAX_CHUNK_SIZE = 0x100_0000

# superblock flags (§1.3)
SB_COMPRESSION_NONE = 0x01
SB_COMPRESSION_LZ4 = 0x02
SB_HASH_BLAKE3 = 0x04
SB_HASH_SHA256 = 0x08
SB_EXPLICIT_UID_GID = 0x10
SB_HAS_XATTR = 0x20
SB_COMPRESSION_GZIP = 0x40
SB_COMPRESSION_ZSTD = 0x80
SB_INLINED_CHUNK_DIGEST = 0x100
SB_TARFS_MODE = 0x200
SB_ENCRYPTION_NONE = 0x0100_0000
SB_ENCRYPTION_AES_128_XTS = 0x0200_0000
SB_KNOWN_FLAGS = (0x3FF | SB_ENCRYPTION_NONE | SB_ENCRYPTION_AES_128_XTS | 0xFC00_0000)
SB_COMPRESSION_BITS = (SB_COMPRESSION_NONE | SB_COMPRESSION_LZ4 | SB_COMPRESSION_GZIP
                       | SB_COMPRESSION_ZSTD)
SB_HASH_BITS = SB_HASH_BLAKE3 | SB_HASH_SHA256

# blob features (§1.4)
BLOB_ALIGNED = 0x0000_0001
BLOB_INLINED_FS_META = 0x0000_0002
BLOB_CHUNK_INFO_V2 = 0x0000_0004
BLOB_ZRAN = 0x0000_0008
BLOB_SEPARATE = 0x0000_0010
BLOB_INLINED_CHUNK_DIGEST = 0x0000_0020
BLOB_TARFS = 0x0000_0040
BLOB_BATCH = 0x0000_0080
BLOB_ENCRYPTED = 0x0000_0100
BLOB_HAS_TAR_HEADER = 0x1000_0000
BLOB_HAS_TOC = 0x2000_0000
BLOB_CAP_TAR_TOC = 0x4000_0000
BLOB_V5_NO_EXT = 0x8000_0000
BLOB_INCOMPAT_UNKNOWN = 0x0000_F000

# The 80-byte chunk record (§1.6), v5 inodes and the v6 chunk table:
#   0 block_id 32s | 32 blob_index I | 36 flags I | 40 compressed_size I | 44 uncompressed_size I
#   48 compressed_offset Q | 56 uncompressed_offset Q | 64 file_offset Q | 72 index I | 76 crc32 I
CHUNK = struct.Struct("<32sIIIIQQQII")

# ---- RAFS v5 (§2) --------------------------------------------------------------------------------
V5_MAGIC = 0x5241_4653
V5_VERSION = 0x500
V5_SB_SIZE = 8192
# 0 magic I | 4 fs_version I | 8 sb_size I | 12 block_size(chunk size) I | 16 flags Q
# 24 inodes_count Q | 32 inode_table_offset Q | 40 prefetch_table_offset Q | 48 blob_table_offset Q
# 56 inode_table_entries I | 60 prefetch_table_entries I | 64 blob_table_size I
# 68 extended_blob_table_entries I | 72 extended_blob_table_offset Q | 80.. reserved (8112 bytes)
V5_SUPER = struct.Struct("<IIIIQQQQQIIIIQ")
# blob table entry head (§2.5): 0 readahead_offset I | 4 readahead_size I | 8 id bytes up to NUL
V5_BLOB_HEAD = struct.Struct("<II")
# extended blob table entry (§2.6): 0 chunk_count I | 4 features I | 8 uncompressed_size Q
# 16 compressed_size Q | 24.. reserved 40
V5_EXT_BLOB = struct.Struct("<IIQQ40x")
# inode record (§2.7): 0 digest 32s | 32 parent Q | 40 ino Q | 48 uid I | 52 gid I | 56 projid I
# 60 mode I | 64 size Q | 72 blocks Q | 80 flags Q | 88 nlink I | 92 child_index I | 96 child_count I
# 100 name_size H | 102 symlink_size H | 104 rdev I | 108 mtime_nsec I | 112 mtime Q | 120 reserved 8
V5_INODE = struct.Struct("<32sQQIIIIQQQIIIHHIIQ8x")
V5_INODE_SYMLINK = 0x1
V5_INODE_HARDLINK = 0x2
V5_INODE_XATTR = 0x4
V5_INODE_HAS_HOLE = 0x8
V5_INODE_KNOWN = 0xF
V5_XATTR_SIZE = struct.Struct("<Q")  # payload size; then pairs {u32 len; name; NUL; value}; pad 8
V5_XATTR_PAIR = struct.Struct("<I")
V5_MAX_INODES = (1 << 29) - 1

# ---- RAFS v6 / EROFS (§3) -------------------------------------------------------------------------
EROFS_MAGIC = 0xE0F5_E1E2
EROFS_SB_OFFSET = 1024
V6_EXT_SB_OFFSET = 1152
V6_DEVT_SLOTOFF = 11
V6_DEVT_OFFSET = V6_DEVT_SLOTOFF * 128
V6_BLOCK_SIZE = 4096
V6_BLOCK_BITS = 12
EROFS_COMPAT_RAFS_V6 = 0x4000_0000
EROFS_INCOMPAT_CHUNKED_FILE = 0x4
EROFS_INCOMPAT_DEVICE_TABLE = 0x8
EROFS_INCOMPAT_RAFS_V6 = EROFS_INCOMPAT_CHUNKED_FILE | EROFS_INCOMPAT_DEVICE_TABLE
V6_ROOT_NID = 128
# EROFS superblock (§3.2) at 1024: 0 magic I | 4 checksum I | 8 feature_compat I | 12 blkszbits B
# 13 extslots B | 14 root_nid H | 16 inos Q | 24 build_time Q | 32 build_time_nsec I | 36 blocks I
# 40 meta_blkaddr I | 44 xattr_blkaddr I | 48 uuid 16s | 64 volume_name 16s | 80 feature_incompat I
# 84 u H | 86 extra_devices H | 88 devt_slotoff H | 90 reserved 38
EROFS_SUPER = struct.Struct("<IIIBBHQQIIII16s16sIHHH38x")
# RAFS extended superblock (§3.3) at 1152: 0 flags Q | 8 blob_table_offset Q | 16 blob_table_size I
# 20 chunk_size I | 24 chunk_table_offset Q | 32 chunk_table_size Q | 40 prefetch_table_offset Q
# 48 prefetch_table_size I | 52 padding I | 56 reserved 200
V6_EXT_SUPER = struct.Struct("<QQIIQQQII200x")
# device slot (§3.4): 0 tag 64s | 64 blocks I | 68 mapped_blkaddr I | 72 reserved 56
V6_DEVSLOT = struct.Struct("<64sII56x")
# blob table entry (§3.5): 0 blob_id 64s | 64 blob_index I | 68 chunk_size I | 72 chunk_count I
# 76 compression_algo I | 80 digest_algo I | 84 features I | 88 compressed_size Q
# 96 uncompressed_size Q | 104 blob_toc_size I | 108 ci_compressor I | 112 ci_offset Q
# 120 ci_compressed_size Q | 128 ci_uncompressed_size Q | 136 blob_toc_digest 32s
# 168 blob_meta_digest 32s | 200 blob_meta_size Q | 208 cipher_iv Q | 216 cipher_algo I | 220 rsvd 36
V6_BLOB = struct.Struct("<64sIIIIIIQQIIQQQ32s32sQQI36x")
V6_MAX_BLOBS = 254
V6_MAX_CHUNKS_PER_BLOB = 1 << 24
# compact inode (§3.8): 0 format H | 2 xattr_icount H | 4 mode H | 6 nlink H | 8 size I
# 12 reserved I | 16 i_u I | 20 ino I | 24 uid H | 26 gid H | 28 reserved I
V6_COMPACT_INODE = struct.Struct("<HHHHIIIIHHI")
# extended inode (§3.8): 0 format H | 2 xattr_icount H | 4 mode H | 6 reserved H | 8 size Q
# 16 i_u I | 20 ino I | 24 uid I | 28 gid I | 32 mtime Q | 40 mtime_nsec I | 44 nlink I | 48 rsvd 16
V6_EXTENDED_INODE = struct.Struct("<HHHHQIIIIQII16x")
V6_LAYOUT_FLAT_PLAIN = 0
V6_LAYOUT_FLAT_INLINE = 2
V6_LAYOUT_CHUNK_BASED = 4
V6_CHUNK_FORMAT_INDEXES = 0x20
V6_CHUNK_FORMAT_BLKBITS_MASK = 0x1F
# dirent (§3.10): 0 nid Q | 8 nameoff H | 10 file_type B | 11 reserved B
V6_DIRENT = struct.Struct("<QHBB")
# chunk index (§3.11): 0 blob_addr_lo H | 2 blob_addr_hi H | 4 blk_addr I
V6_CHUNK_INDEX = struct.Struct("<HHI")
V6_NULL_BLKADDR = 0xFFFF_FFFF
# inline xattr header (§3.9): 0 reserved I | 4 shared_count B | 5 reserved 7; entry: len B, index B, vsize H
V6_XATTR_HEADER = struct.Struct("<IB7x")
V6_XATTR_ENTRY = struct.Struct("<BBH")
V6_XATTR_PREFIXES = {1: b"user.", 2: b"system.posix_acl_access", 3: b"system.posix_acl_default",
                     4: b"trusted.", 6: b"security."}
EROFS_FT = {0o010000: 5, 0o020000: 3, 0o040000: 2, 0o060000: 4, 0o100000: 1, 0o120000: 7,
            0o140000: 6}  # S_IFMT type -> EROFS dirent file type

# ---- v6 blob trailer (§4.3, §4.4) -----------------------------------------------------------------
BLOB_META_MAGIC = 0xB10B_B10B
# blob-meta header (4096 bytes): 0 magic I | 4 features I | 8 ci_compressor I | 12 ci_entries I
# 16 ci_offset Q | 24 ci_compressed_size Q | 32 ci_uncompressed_size Q | 40 zran_offset Q
# 48 zran_size Q | 56 zran_count I | 60 reserved 4032 | 4092 magic2 I
BLOB_META_HEADER = struct.Struct("<IIIIQQQQQI4032xI")
CI_V1 = struct.Struct("<QQ")  # uncomp_info, comp_info
CI_V2 = struct.Struct("<QQQ")  # uncomp_info, comp_info, data
# ToC entry (128 bytes): 0 flags I | 4 reserved I | 8 name 16s | 24 uncompressed sha256 32s
# 56 compressed_offset Q | 64 compressed_size Q | 72 uncompressed_size Q | 80 reserved 48
TOC_ENTRY = struct.Struct("<II16s32sQQQ48x")
TAR_BLOCK = 512
TOC_NAME = b"rafs.blob.toc"


def corrupt(message: str, offset: int | None = None, field: str | None = None,
            **context: Any) -> CorruptMetadata:
    """A CorruptMetadata naming where (absolute offset) and what (field) is wrong."""
    return CorruptMetadata(message, offset=offset, field=field, **context)


def unpack_at(st: struct.Struct, buf: Any, offset: int, field: str) -> tuple[Any, ...]:
    """``st.unpack_from(buf, offset)`` that raises CorruptMetadata (never struct.error)."""
    if offset < 0 or offset + st.size > len(buf):
        raise corrupt(f"{field} record of {st.size} bytes lies outside the {len(buf)}-byte image",
                      offset=offset, field=field)
    return st.unpack_from(buf, offset)


def decode_dev(raw: int) -> int:
    """Linux ``new_encode_dev`` 32-bit form -> host ``dev_t`` (``os.makedev``)."""
    major = (raw & 0xFFF00) >> 8
    minor = (raw & 0xFF) | ((raw >> 12) & 0xFFF00)
    return os.makedev(major, minor)


def encode_dev(dev: int) -> int:
    """Host ``dev_t`` -> Linux ``new_encode_dev`` 32-bit form (major < 4096, minor < 2^20)."""
    major, minor = os.major(dev), os.minor(dev)
    return ((minor & 0xFF) | ((major & 0xFFF) << 8) | ((minor & ~0xFF) << 12)) & 0xFFFF_FFFF


def align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0
