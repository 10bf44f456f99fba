"""Neutral value objects of the filesystem layer: inode attributes, directory entries, statfs data.

Owns: ``Attr`` (the ``st_*`` fields of one inode plus the kernel cache timeouts), ``DirEntry``,
``StatFs``, the ``Ino``/``FileHandle`` NewTypes and the inode-number encoding shared by ``vfs`` and
``rafs_fs``. The FUSE adapter (``fs/fuse.py``) converts these into llfuse's ``EntryAttributes``;
nothing here knows llfuse.

Must not import: llfuse, the daemon, the API. Everything is immutable and thread-safe.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import NamedTuple, NewType

#: an inode number as the kernel sees it (vfs-encoded: mount index in the top byte)
Ino = NewType("Ino", int)
#: a FUSE file handle returned by open/opendir
FileHandle = NewType("FileHandle", int)

#: the FUSE root inode (llfuse.ROOT_INODE)
ROOT_INO = Ino(1)
#: bits of an encoded inode number given to the image's own inode number
INO_BITS = 56
INO_MASK = (1 << INO_BITS) - 1
#: mount indexes fit the remaining byte; index 0 is the pseudo filesystem
MAX_MOUNTS = (1 << (64 - INO_BITS)) - 1

#: default kernel cache timeouts (seconds) for immutable image content: for good, as upstream's 2^32 s.
#: attr/entry caching is what makes metadata fast (timeouts 0 are ~75x slower on a second `find`),
#: and a cached root keeps ``stat(mountpoint)`` off a session no daemon serves (failover: see below)
IMAGE_TIMEOUT = float(1 << 32)
#: pseudo directories change with mount/umount (which invalidate explicitly); keep them short anyway
PSEUDO_TIMEOUT = 1.0
#: a pseudo directory's own attributes never change, so the kernel may keep them for good (as
#: upstream). A short timeout makes ``stat(mountpoint)`` a FUSE request, and while no daemon serves
#: the session (failover: the supervisor holds the fd) that request blocks: nydus-snapshotter v0.6.1
#: stats the mountpoint before it starts the successor and would hang there for ever.
PSEUDO_ATTR_TIMEOUT = float(1 << 32)

BLOCK_SIZE = 4096


class Attr(NamedTuple):
    """The attributes of one inode, in ``stat`` terms (times in nanoseconds since the epoch).

    A NamedTuple rather than a dataclass: one is built per lookup/getattr/readdir entry on the hot
    metadata path, and tuple construction is several times cheaper than a frozen dataclass.
    """

    ino: int
    mode: int
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    size: int = 0
    blocks: int = 0
    blksize: int = BLOCK_SIZE
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    entry_timeout: float = IMAGE_TIMEOUT
    attr_timeout: float = IMAGE_TIMEOUT

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    def with_ino(self, ino: int) -> Attr:
        """A copy carrying another inode number (the vfs re-encodes per mount)."""
        return tuple.__new__(Attr, (ino, *self[1:]))

    def with_timeouts(self, timeout: float) -> Attr:
        return self._replace(entry_timeout=timeout, attr_timeout=timeout)


class DirEntry(NamedTuple):
    """One ``readdir`` result: entry name, its attributes and the offset of the next entry."""

    name: bytes
    attr: Attr
    next_offset: int


@dataclass(frozen=True, slots=True)
class StatFs:
    """``statvfs`` data of a mount (read-only image: nothing free)."""

    blocks: int = 0
    files: int = 0
    bsize: int = BLOCK_SIZE
    frsize: int = BLOCK_SIZE
    bfree: int = 0
    bavail: int = 0
    ffree: int = 0
    favail: int = 0
    namemax: int = 255


def blocks_of(size: int) -> int:
    """``st_blocks`` (512-byte units) for a file of ``size`` bytes stored in 4 KiB blocks."""
    return ((size + BLOCK_SIZE - 1) // BLOCK_SIZE) * (BLOCK_SIZE // 512)


def encode_ino(index: int, ino: int) -> Ino:
    """The kernel-visible inode number of image inode ``ino`` in mount ``index``.

    Raises OverflowError if ``ino`` does not fit the 56 bits left beside the index.
    """
    if ino > INO_MASK or ino < 0:
        raise OverflowError(f"inode number {ino} does not fit {INO_BITS} bits")
    return Ino((index << INO_BITS) | ino)


def decode_ino(ino: int) -> tuple[int, int]:
    """``(mount index, image inode number)`` of a kernel-visible inode number."""
    return ino >> INO_BITS, ino & INO_MASK
