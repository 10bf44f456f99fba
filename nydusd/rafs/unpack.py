"""Unpacking an image into a tar stream (``nydus-image unpack``).

Owns: ``write_tar(sb, source, fileobj)`` -- every entry below the root as a PAX tar member, depth
first in name order (``RafsSuper.walk_depth_first``, as upstream: ``tar -xp`` then keeps directory
mtimes): regular
files with their content (read chunk by chunk through a ``BlobSource``, digest-verified), directories,
symlinks, hard links (later names of an inode become LNKTYPE members pointing at the first name),
char/block devices, fifos; modes, uid/gid, mtime (nanoseconds in the PAX ``mtime``) and xattrs as
``SCHILY.xattr.<name>`` records. Sockets cannot be represented in tar and are skipped (logged).

Must not import fs, daemon, builder. Threading: single-threaded streaming writer.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

from nydusd.log import get_logger
from nydusd.rafs.content import BlobSource, file_chunks, iter_file
from nydusd.rafs.rafs_super import Inode, RafsSuper

log = get_logger(__name__)


class _IterReader:
    """A read-only file object over an iterator of byte pieces (for ``TarFile.addfile``, which
    treats a short ``read(n)`` as end of data, so every read is filled completely)."""

    def __init__(self, pieces: Iterator[bytes | memoryview]) -> None:
        self._pieces = pieces
        self._buf = bytearray()

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buf) < n:
            piece = next(self._pieces, None)
            if piece is None:
                break
            self._buf += piece
        if n < 0:
            n = len(self._buf)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out


def _tarinfo(sb: RafsSuper, name: str, inode: Inode) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.mode = stat.S_IMODE(inode.mode)
    ti.uid, ti.gid = inode.uid, inode.gid
    ti.mtime = inode.mtime
    pax: dict[str, str] = {}
    if inode.mtime_nsec:
        pax["mtime"] = f"{inode.mtime}.{inode.mtime_nsec:09d}"
    if inode.has_xattr:
        for key, value in sorted(sb.xattrs(inode.ino).items()):
            pax["SCHILY.xattr." + os.fsdecode(key)] = value.decode("utf-8", "surrogateescape")
    ti.pax_headers = pax
    return ti


def write_tar(sb: RafsSuper, source: BlobSource, fileobj: BinaryIO, verify: bool = True) -> int:
    """Stream the whole tree of ``sb`` into ``fileobj`` as a PAX tar; returns the member count.

    Raises CorruptMetadata for bad metadata, IntegrityError/BackendError for bad or missing data.
    """
    first_name: dict[int, str] = {}
    count = 0
    with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT,
                      encoding="utf-8", errors="surrogateescape") as tar:
        for path, inode in sb.walk_depth_first():
            if path == b"/":
                continue
            name = os.fsdecode(path[1:])
            ti = _tarinfo(sb, name, inode)
            fmt = stat.S_IFMT(inode.mode)
            content = None
            if fmt == stat.S_IFREG:
                if inode.ino in first_name:
                    ti.type, ti.linkname = tarfile.LNKTYPE, first_name[inode.ino]
                else:
                    first_name[inode.ino] = name
                    ti.size = inode.size
                    chunks = file_chunks(sb, inode)  # refused before its header is written
                    content = _IterReader(iter_file(sb, inode.ino, source, verify, chunks))
            elif fmt == stat.S_IFDIR:
                ti.type = tarfile.DIRTYPE
            elif fmt == stat.S_IFLNK:
                ti.type, ti.linkname = tarfile.SYMTYPE, os.fsdecode(sb.readlink(inode.ino))
            elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
                ti.type = tarfile.CHRTYPE if fmt == stat.S_IFCHR else tarfile.BLKTYPE
                ti.devmajor, ti.devminor = os.major(inode.rdev), os.minor(inode.rdev)
            elif fmt == stat.S_IFIFO:
                ti.type = tarfile.FIFOTYPE
            else:
                log.info("socket_skipped", path=name)
                continue
            tar.addfile(ti, content)
            count += 1
    return count
