"""The FUSE kernel ABI as bytes: in/out headers, per-opcode argument and reply layouts.

Owns: the opcode numbers, INIT flags, one ``struct.Struct`` per kernel record we decode or encode
(``include/uapi/linux/fuse.h``, protocol 7.31 and newer, little-endian as virtio-fs and x86 use),
and the packers that turn the filesystem layer's neutral ``Attr``/``StatFs`` into ``fuse_attr``,
``fuse_entry_out``, ``fuse_attr_out``, ``fuse_kstatfs`` and directory entries.

Must not import: llfuse, the transports (``/dev/fuse``, virtio-fs), the daemon. Pure functions and
constants: thread-safe.
"""

from __future__ import annotations

import math
import struct
from enum import IntEnum
from typing import Any

from nydusd.fs.attrs import IMAGE_TIMEOUT, Attr, StatFs

KERNEL_MAJOR = 7
#: the newest minor we speak; the reply carries min(kernel's, ours)
KERNEL_MINOR = 31
#: oldest kernel minor accepted (virtio-fs kernels all speak 7.31 or newer)
MIN_KERNEL_MINOR = 31


class Opcode(IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51


#: requests that would modify the filesystem: answered EROFS (the images are immutable)
WRITE_OPCODES = frozenset({Opcode.SETATTR, Opcode.SYMLINK, Opcode.MKNOD, Opcode.MKDIR,
                           Opcode.UNLINK, Opcode.RMDIR, Opcode.RENAME, Opcode.LINK, Opcode.WRITE,
                           Opcode.SETXATTR, Opcode.REMOVEXATTR, Opcode.CREATE, Opcode.FALLOCATE,
                           Opcode.RENAME2, Opcode.COPY_FILE_RANGE, Opcode.TMPFILE})
#: requests the kernel expects no reply to
NO_REPLY_OPCODES = frozenset({Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT})


# INIT flags (fuse_init_in.flags / fuse_init_out.flags)
FUSE_ASYNC_READ = 1 << 0
FUSE_BIG_WRITES = 1 << 5
FUSE_DO_READDIRPLUS = 1 << 13
FUSE_READDIRPLUS_AUTO = 1 << 14
FUSE_PARALLEL_DIROPS = 1 << 18
FUSE_MAX_PAGES = 1 << 22
FUSE_CACHE_SYMLINKS = 1 << 23
FUSE_NO_OPENDIR_SUPPORT = 1 << 24

# fuse_open_out.open_flags
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_CACHE_DIR = 1 << 3

IN_HEADER = struct.Struct("<IIQQIIII")     # len opcode unique nodeid uid gid pid padding
OUT_HEADER = struct.Struct("<IiQ")         # len error unique
INIT_IN = struct.Struct("<IIII")           # major minor max_readahead flags (+ flags2, unused)
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")  # ... max_pages map_alignment flags2 unused[7]
INIT_OUT_COMPAT_22 = 24                    # reply size for kernels older than 7.23
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr (88 bytes)
ENTRY_OUT_HEAD = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid nsecs
ATTR_OUT_HEAD = struct.Struct("<QII")      # attr_valid attr_valid_nsec dummy
GETATTR_IN = struct.Struct("<IIQ")         # getattr_flags dummy fh
FORGET_IN = struct.Struct("<Q")            # nlookup
BATCH_FORGET_IN = struct.Struct("<II")     # count dummy
FORGET_ONE = struct.Struct("<QQ")          # nodeid nlookup
OPEN_IN = struct.Struct("<II")             # flags open_flags
OPEN_OUT = struct.Struct("<QII")           # fh open_flags padding
READ_IN = struct.Struct("<QQIIQII")        # fh offset size read_flags lock_owner flags padding
RELEASE_IN = struct.Struct("<QIIQ")        # fh flags release_flags lock_owner
FLUSH_IN = struct.Struct("<QIIQ")          # fh unused padding lock_owner
KSTATFS = struct.Struct("<QQQQQIIII24x")   # blocks bfree bavail files ffree bsize namelen frsize
GETXATTR_IN = struct.Struct("<II")         # size padding
GETXATTR_OUT = struct.Struct("<II")        # size padding
ACCESS_IN = struct.Struct("<II")           # mask padding
INTERRUPT_IN = struct.Struct("<Q")         # unique
LSEEK_IN = struct.Struct("<QQII")          # fh offset whence padding
LSEEK_OUT = struct.Struct("<Q")            # offset
DIRENT_HEAD = struct.Struct("<QQII")       # ino off namelen type

FUSE_ROOT_ID = 1
#: the largest name a lookup may carry (the kernel's own limit is 1024 for FUSE)
NAME_MAX = 1024


def split_timeout(seconds: float) -> tuple[int, int]:
    """A cache timeout as ``(seconds, nanoseconds)``: negative or NaN -> 0, huge -> clamped."""
    if math.isnan(seconds) or seconds <= 0:
        return 0, 0
    if seconds >= _TIMEOUT_MAX:
        return _TIMEOUT_MAX, 0
    secs = int(seconds)
    return secs, min(int((seconds - secs) * 1e9), 999_999_999)


_TIMEOUT_MAX = 1 << 32


def pack_attr(attr: Attr) -> bytes:
    """``fuse_attr`` of a neutral ``Attr``."""
    a_s, a_ns = divmod(attr.atime_ns, 1_000_000_000)
    m_s, m_ns = divmod(attr.mtime_ns, 1_000_000_000)
    c_s, c_ns = divmod(attr.ctime_ns, 1_000_000_000)
    return ATTR.pack(attr.ino, attr.size, attr.blocks, a_s & _U64, m_s & _U64, c_s & _U64,
                     a_ns, m_ns, c_ns, attr.mode & _U32, attr.nlink & _U32, attr.uid & _U32,
                     attr.gid & _U32, attr.rdev & _U32, attr.blksize & _U32, 0)


_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1


def pack_entry(attr: Attr) -> bytes:
    """``fuse_entry_out`` (128 bytes) for a lookup-style reply."""
    ino, mode, nlink, uid, gid, rdev, size, blocks, blksize, at, mt, ct, entry_t, attr_t = attr
    if entry_t == IMAGE_TIMEOUT and attr_t == IMAGE_TIMEOUT:
        e_s = a_s = _TIMEOUT_MAX  # the common case (one per READDIRPLUS entry): no float split
        e_ns = a_ns = 0
    else:
        e_s, e_ns = split_timeout(entry_t)
        a_s, a_ns = split_timeout(attr_t)
    a_s2, a_ns2 = divmod(at, 1_000_000_000)
    m_s, m_ns = divmod(mt, 1_000_000_000)
    c_s, c_ns = divmod(ct, 1_000_000_000)
    return _ENTRY_OUT.pack(ino, 0, e_s, a_s, e_ns, a_ns,  # one pack: one per READDIRPLUS entry
                           ino, size, blocks, a_s2 & _U64, m_s & _U64, c_s & _U64, a_ns2, m_ns, c_ns,
                           mode & _U32, nlink & _U32, uid & _U32, gid & _U32, rdev & _U32,
                           blksize & _U32, 0)


_ENTRY_OUT = struct.Struct("<QQQQII" + ATTR.format[1:])  # fuse_entry_out: head + fuse_attr


#: a ``fuse_entry_out`` with nodeid 0: "no entry, nothing to remember" (readdirplus . and ..)
EMPTY_ENTRY = bytes(ENTRY_OUT_HEAD.size + ATTR.size)


def pack_attr_out(attr: Attr) -> bytes:
    """``fuse_attr_out`` (104 bytes) for GETATTR."""
    a_s, a_ns = split_timeout(attr.attr_timeout)
    return ATTR_OUT_HEAD.pack(a_s, a_ns, 0) + pack_attr(attr)


def pack_statfs(st: StatFs) -> bytes:
    return KSTATFS.pack(st.blocks, st.bfree, st.bavail, st.files, st.ffree, st.bsize, st.namemax,
                        st.frsize, 0)


def dirent_size(name_len: int, plus: bool = False) -> int:
    """Bytes one entry takes in a READDIR(PLUS) reply, padded to 8."""
    raw = DIRENT_HEAD.size + name_len + (ENTRY_OUT_HEAD.size + ATTR.size if plus else 0)
    return (raw + 7) & ~7


def _direntplus_struct(name_len: int) -> struct.Struct:
    st = _DIRENTPLUS[name_len] = struct.Struct(
        f"{_ENTRY_OUT.format}QQII{(name_len + 7) & ~7}s")  # "s" zero-pads the name to 8
    return st


#: ``fuse_direntplus`` (entry_out + dirent + padded name) per name length: one pack per entry
_DIRENTPLUS: dict[int, struct.Struct] = {}
_NS = 1_000_000_000


def pack_direntplus(attr: Attr | tuple[Any, ...], next_offset: int, name: bytes) -> bytes:
    """One READDIRPLUS entry (``fuse_entry_out`` of ``attr`` + ``fuse_dirent``) in one pack:
    ``pack_entry(attr) + pack_dirent(attr.ino, next_offset, attr.mode, name)``. ``attr`` may be
    the plain tuple of an ``Attr``'s fields (a cached listing entry)."""
    ino, mode, nlink, uid, gid, rdev, size, blocks, blksize, at, mt, ct, entry_t, attr_t = attr
    if entry_t == IMAGE_TIMEOUT and attr_t == IMAGE_TIMEOUT:
        e_s = a_s = _TIMEOUT_MAX
        e_ns = a_ns = 0
    else:
        e_s, e_ns = split_timeout(entry_t)
        a_s, a_ns = split_timeout(attr_t)
    m_s, m_ns = divmod(mt, _NS)
    if at == mt == ct:  # images carry one time for all three
        a_s2 = c_s = m_s
        a_ns2 = c_ns = m_ns
    else:
        a_s2, a_ns2 = divmod(at, _NS)
        c_s, c_ns = divmod(ct, _NS)
    n = len(name)
    st = _DIRENTPLUS.get(n) or _direntplus_struct(n)
    return st.pack(ino, 0, e_s, a_s, e_ns, a_ns,
                   ino, size, blocks, a_s2 & _U64, m_s & _U64, c_s & _U64, a_ns2, m_ns, c_ns,
                   mode & _U32, nlink & _U32, uid & _U32, gid & _U32, rdev & _U32, blksize & _U32, 0,
                   ino, next_offset, n, (mode >> 12) & 0xF, name)


def pack_dirent(ino: int, next_offset: int, mode: int, name: bytes) -> bytes:
    """One ``fuse_dirent`` (type = the S_IFMT bits >> 12, as ``DT_*``), padded to 8 bytes."""
    raw = DIRENT_HEAD.pack(ino, next_offset, len(name), (mode >> 12) & 0xF) + name
    return raw + bytes(-len(raw) % 8)


def pack_out_header(length: int, error: int, unique: int) -> bytes:
    return OUT_HEADER.pack(length, error, unique)
