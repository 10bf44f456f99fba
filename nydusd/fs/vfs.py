"""The virtual filesystem a FUSE session serves: a pseudo root with images attached at subpaths.

Owns: ``Vfs`` -- the mount table (image filesystems attached at ``/`` or at ``/a/b/c``, each with its
own inode space: kernel inode = ``(mount index << 56) | image inode``), the pseudo directories that
lead to the mountpoints, the open-file table, and per-mount filesystem statistics (``FsIoStats``).
Every operation takes and returns kernel-visible inode numbers; ``RafsFs`` works in image inodes.

Over 500 lines because every operation is routed through the same two tables: a kernel inode
is resolved to a pseudo directory or a mount's image inode (``_resolve``), and the mount table and
the pseudo directories are replaced together, under one lock, by ``attach``/``detach``/``replace``.
Split, the operations would need the tables' internals and their inode encoding.

Must not import: llfuse (the adapter in ``fs/fuse.py`` does), the daemon, the API. Raises NydusError
subclasses only; the adapter maps them to errnos.

Threading: the mount table and the pseudo directory table are copy-on-write. ``attach``/``detach``/
``replace`` build new dicts under ``_lock`` (a small writer lock) and publish them with one
assignment; FUSE handlers read whatever table is current without locking, so they never wait on a
mount that is parsing a bootstrap. ``read`` is called with llfuse's lock released and touches only
the open-file entry (immutable) and the thread-safe device and stats.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from time import perf_counter_ns
from typing import Any, TypeVar

from nydusd.errors import AlreadyExists, InvalidArgument, NotFound, NydusError, ReadOnly
from nydusd.fs.attrs import (
    MAX_MOUNTS,
    PSEUDO_ATTR_TIMEOUT,
    PSEUDO_TIMEOUT,
    ROOT_INO,
    Attr,
    DirEntry,
    FileHandle,
    Ino,
    StatFs,
    decode_ino,
    encode_ino,
)
from nydusd.fs.rafs_fs import IsADirectory, NotADirectory, NoXattr, RafsFile, RafsFs, RawEntry
from nydusd.log import get_logger
from nydusd.metrics import FsIoStats, StatsFop

log = get_logger(__name__)

T = TypeVar("T")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


class StaleInode(NydusError):
    """An inode of a filesystem that has been unmounted (``ESTALE``)."""

    errno = errno.ESTALE
    http_status = 404
    code = "STALE"


#: bound of the directory listing caches of all mounts together, in entries (~300 bytes each);
#: when exceeded every mount's cache starts over
DIR_CACHE_ENTRIES = 16384


@dataclass(eq=False)
class Mount:
    """One attached image. ``fs`` and ``stats`` are shared with the daemon's instance record.

    ``listings`` caches whole directory listings with kernel inode numbers (image inode -> entries):
    the image is immutable and libfuse2 has no kernel readdir cache, so every ``ls``/``find`` of a
    directory asks again (twice: the second READDIR finds the end). Entries are kept as plain
    tuples (``RafsFs.listing``), which the garbage collector stops scanning once it has seen them,
    and become ``DirEntry``/``Attr`` as they are read. Plain dict operations only
    (atomic under the GIL; a race costs a recomputation, never a wrong entry); dropped with the
    mount, so a remount never sees another image's entries.
    """

    index: int
    path: str
    fs: RafsFs
    stats: FsIoStats
    listings: dict[int, tuple[RawEntry, ...]] = field(default_factory=dict)
    listed: int = 0  # entries held in ``listings``

    def kernel_ino(self, ino: int, is_root_mount: bool) -> Ino:
        if is_root_mount and ino == self.fs.root_ino:
            return ROOT_INO
        return encode_ino(self.index, ino)


@dataclass(frozen=True)
class _PseudoDir:
    """A directory of the pseudo filesystem; ``entries`` maps a name to a pseudo directory inode or
    to the ``Mount`` itself, so a reader holding any version of the table can resolve the entry
    without consulting the (separately published) mount table."""

    ino: int
    parent: int
    entries: dict[bytes, int | Mount] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _OpenFile:
    mount: Mount
    file: RafsFile


#: longest mountpoint component and path (the kernel's NAME_MAX / PATH_MAX): a longer name would be
#: accepted here and then fail every listing of the directory that holds it
NAME_MAX = 255
PATH_MAX = 4096


def split_path(path: str) -> list[bytes]:
    """Components of an absolute mountpoint path. Raises InvalidArgument for a bad path (relative,
    ``.``/``..``, NUL, a component over ``NAME_MAX`` bytes, over ``PATH_MAX`` bytes in all)."""
    shown = path if len(path) <= 200 else path[:200] + "..."
    if not path.startswith("/"):
        raise InvalidArgument("mountpoint must be an absolute path", mountpoint=shown)
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise InvalidArgument("mountpoint must not contain '.' or '..'", mountpoint=shown)
    if "\0" in path:
        raise InvalidArgument("mountpoint must not contain a NUL byte", mountpoint=shown)
    names = [os.fsencode(p) for p in parts]
    if len(os.fsencode(path)) > PATH_MAX:
        raise InvalidArgument(f"mountpoint is longer than {PATH_MAX} bytes", mountpoint=shown)
    if any(len(n) > NAME_MAX for n in names):
        raise InvalidArgument(f"mountpoint has a component longer than {NAME_MAX} bytes",
                              mountpoint=shown)
    return names


def normalize_path(path: str) -> str:
    return "/" + "/".join(os.fsdecode(p) for p in split_path(path))


class Vfs:
    """Pseudo root plus attached image filesystems. See the module docstring for threading."""

    def __init__(self, *, uid: int = 0, gid: int = 0,
                 on_error: Callable[[str], None] | None = None, first_fh: int = 1) -> None:
        self._on_error = on_error
        self._lock = threading.Lock()
        self._created_ns = time.time_ns()
        self._uid, self._gid = uid, gid
        self._mounts: dict[int, Mount] = {}
        self._by_path: dict[str, int] = {}
        self._pseudo: dict[int, _PseudoDir] = {ROOT_INO: _PseudoDir(ROOT_INO, ROOT_INO)}
        self._pseudo_ino = itertools.count(2)
        self._next_index = 1
        self._root_mount: Mount | None = None
        self._handles: dict[int, _OpenFile] = {}
        #: a session that may be handed over starts at a fresh base (fs/devfuse.py), so its
        #: handles never collide with those a predecessor handed the kernel
        self._fh = itertools.count(first_fh)

    # -- mount table (writers, under _lock) ---------------------------------------------------

    def mounts(self) -> dict[str, Mount]:
        table = self._mounts
        return {m.path: m for m in table.values()}

    def get_mount(self, path: str) -> Mount:
        """The mount attached at ``path``. Raises NotFound."""
        index = self._by_path.get(normalize_path(path))
        if index is None:
            raise NotFound("no filesystem mounted here", mountpoint=path)
        return self._mounts[index]

    def _alloc_index(self) -> int:
        # Next-fit over 1..MAX_MOUNTS: a freed index is reused as late as possible, so inode numbers
        # the kernel may still hold for a detached image rarely alias a new one.
        for _ in range(MAX_MOUNTS):
            index = self._next_index
            self._next_index = index % MAX_MOUNTS + 1
            if index not in self._mounts:
                return index
        raise NydusError("too many mounted filesystems", limit=MAX_MOUNTS)

    def attach(self, path: str, fs: RafsFs, stats: FsIoStats, *, index: int | None = None) -> Mount:
        """Attach ``fs`` at ``path`` (``/`` = the root); ``index`` pins the mount index (a takeover
        restores the predecessor's, so the kernel's inode numbers stay valid). Raises
        AlreadyExists, InvalidArgument."""
        path = normalize_path(path)
        parts = split_path(path)
        with self._lock:
            if path in self._by_path:
                raise AlreadyExists("object or filesystem already exists", mountpoint=path)
            if index is not None and (not 1 <= index <= MAX_MOUNTS or index in self._mounts):
                raise InvalidArgument("mount index in use or out of range", index=index)
            mount = Mount(index if index is not None else self._alloc_index(), path, fs, stats)
            if not parts:
                if self._pseudo[ROOT_INO].entries:
                    raise AlreadyExists("pseudo root is not empty", mountpoint=path)
                self._publish_mount(mount)
                self._root_mount = mount
            else:
                if self._root_mount is not None:
                    raise InvalidArgument("an image is mounted at /", mountpoint=path)
                pseudo = self._with_entry(parts, mount, path)
                # the mount must be resolvable before any entry can lead a lookup to it
                self._publish_mount(mount)
                self._pseudo = pseudo
        log.info("vfs_attached", mountpoint=path, index=mount.index)
        return mount

    # -- hand-over (takeover by a successor process, see nydusd/upgrade.py) ---------------------

    def layout(self) -> dict[str, Any]:
        """What a successor needs to give every kernel inode number the same meaning: the mount
        index of each path, the pseudo directory inodes and the next-fit cursor."""
        pseudo = self._pseudo
        paths: dict[int, str] = {int(ROOT_INO): "/"}
        pending = [int(ROOT_INO)]
        while pending:
            ino = pending.pop()
            for name, child in pseudo[ino].entries.items():
                if isinstance(child, int):
                    paths[child] = paths[ino].rstrip("/") + "/" + os.fsdecode(name)
                    pending.append(child)
        return {"mounts": {m.path: m.index for m in self._mounts.values()},
                "pseudo": {path: ino for ino, path in paths.items() if ino != ROOT_INO},
                "next_index": self._next_index}

    def restore_layout(self, pseudo: dict[str, int], next_index: int) -> None:
        """Recreate a predecessor's pseudo directories with their inode numbers (see ``layout``).
        Only on an empty table. Raises InvalidArgument for an inconsistent layout."""
        with self._lock:
            if self._mounts or self._pseudo[ROOT_INO].entries:
                raise InvalidArgument("cannot restore a layout over existing mounts")
            table = {int(ROOT_INO): _PseudoDir(ROOT_INO, ROOT_INO)}
            for path, ino in sorted(pseudo.items(), key=lambda item: item[0].count("/")):
                parts = split_path(path)
                if not parts or ino in table or not 1 < ino < 1 << 56:
                    raise InvalidArgument("bad pseudo directory in layout", path=path, inode=ino)
                parent_ino = int(ROOT_INO)
                for name in parts[:-1]:
                    child = table[parent_ino].entries.get(name)
                    if not isinstance(child, int):
                        raise InvalidArgument("pseudo directory without parent", path=path)
                    parent_ino = child
                parent = table[parent_ino]
                table[parent_ino] = _PseudoDir(parent.ino, parent.parent,
                                               {**parent.entries, parts[-1]: ino})
                table[ino] = _PseudoDir(ino, parent_ino)
            self._pseudo = table
            self._pseudo_ino = itertools.count(max(table) + 1)
            self._next_index = next_index if 1 <= next_index <= MAX_MOUNTS else 1

    def _publish_mount(self, mount: Mount) -> None:
        mounts = dict(self._mounts)
        mounts[mount.index] = mount
        by_path = dict(self._by_path)
        by_path[mount.path] = mount.index
        self._mounts, self._by_path = mounts, by_path

    def _with_entry(self, parts: list[bytes], target: Mount, path: str,
                    replace: bool = False) -> dict[int, _PseudoDir]:
        """A new pseudo table with ``target`` at ``parts`` (intermediate directories created);
        the current table is left untouched. Raises AlreadyExists, InvalidArgument."""
        pseudo = dict(self._pseudo)
        dir_ino = int(ROOT_INO)
        for name in parts[:-1]:
            child = pseudo[dir_ino].entries.get(name)
            if isinstance(child, Mount):
                raise InvalidArgument("a filesystem is mounted on a parent path", mountpoint=path)
            if child is None:
                child = next(self._pseudo_ino)
                pseudo[child] = _PseudoDir(child, dir_ino)
                parent = pseudo[dir_ino]
                pseudo[dir_ino] = _PseudoDir(parent.ino, parent.parent, {**parent.entries, name: child})
            dir_ino = child
        parent = pseudo[dir_ino]
        if (parts[-1] in parent.entries) != replace:
            if replace:
                raise NotFound("no filesystem mounted here", mountpoint=path)
            raise AlreadyExists("object or filesystem already exists", mountpoint=path)
        pseudo[dir_ino] = _PseudoDir(parent.ino, parent.parent, {**parent.entries, parts[-1]: target})
        return pseudo

    def _without_entry(self, parts: list[bytes]) -> tuple[dict[int, _PseudoDir], Ino, bytes]:
        """A new pseudo table without the entry at ``parts`` and without the pseudo directories
        that leaves empty (an umount of ``/a/b`` removes ``/a`` when nothing else is below it),
        plus the parent and name of the topmost entry removed (what the kernel must forget)."""
        pseudo = dict(self._pseudo)
        chain = [int(ROOT_INO)]
        for name in parts[:-1]:
            child = pseudo[chain[-1]].entries[name]
            assert isinstance(child, int)  # mountpoints are never below another mount
            chain.append(child)
        depth = len(parts) - 1
        while True:
            dir_ino = chain[depth]
            parent = pseudo[dir_ino]
            entries = dict(parent.entries)
            del entries[parts[depth]]
            pseudo[dir_ino] = _PseudoDir(parent.ino, parent.parent, entries)
            if entries or depth == 0:
                return pseudo, Ino(dir_ino), parts[depth]
            del pseudo[dir_ino]  # left empty: its inode answers ESTALE from now on
            depth -= 1

    def _drop_mount(self, index: int, path: str | None) -> None:
        mounts = dict(self._mounts)
        del mounts[index]
        by_path = self._by_path
        if path is not None:
            by_path = dict(by_path)
            del by_path[path]
        self._mounts, self._by_path = mounts, by_path

    def detach(self, path: str) -> tuple[Mount, Ino, bytes]:
        """Remove the mount at ``path``.

        Returns the mount plus ``(parent inode, name)`` of the entry the kernel must forget
        (``(ROOT_INO, b"")`` for a root mount). Raises NotFound.
        """
        path = normalize_path(path)
        parts = split_path(path)
        with self._lock:
            index = self._by_path.get(path)
            if index is None:
                raise NotFound("no filesystem mounted here", mountpoint=path)
            mount = self._mounts[index]
            parent_ino, name = ROOT_INO, b""
            # unlink first: no new lookup can reach the mount once it is being dropped
            if parts:
                self._pseudo, parent_ino, name = self._without_entry(parts)
            else:
                self._root_mount = None
            self._drop_mount(index, path)
        log.info("vfs_detached", mountpoint=path, index=index)
        return mount, parent_ino, name

    def entry_of(self, path: str) -> tuple[Ino, bytes]:
        """``(parent pseudo inode, name)`` of the directory entry for ``path``. Raises NotFound."""
        parts = split_path(path)
        if not parts:
            return ROOT_INO, b""
        pseudo = self._pseudo
        dir_ino = int(ROOT_INO)
        for name in parts[:-1]:
            child = pseudo[dir_ino].entries.get(name)
            if not isinstance(child, int):
                raise NotFound("no such pseudo directory", mountpoint=path)
            dir_ino = child
        return Ino(dir_ino), parts[-1]

    def replace(self, path: str, fs: RafsFs, stats: FsIoStats) -> tuple[Mount, Mount]:
        """Swap the image at ``path`` atomically; returns ``(old, new)``. Raises NotFound.

        Lookups see either the old image or the new one, never a missing entry. The new image gets
        a fresh mount index, so no kernel inode of the old one aliases it.
        """
        path = normalize_path(path)
        parts = split_path(path)
        with self._lock:
            index = self._by_path.get(path)
            if index is None:
                raise NotFound("no filesystem mounted here", mountpoint=path)
            old = self._mounts[index]
            new = Mount(self._alloc_index(), path, fs, stats)
            pseudo = self._with_entry(parts, new, path, replace=True) if parts else None
            self._publish_mount(new)
            if pseudo is not None:
                self._pseudo = pseudo
            else:
                self._root_mount = new
            self._drop_mount(index, None)
        log.info("vfs_replaced", mountpoint=path, old_index=old.index, index=new.index)
        return old, new

    # -- inode resolution ---------------------------------------------------------------------

    def _resolve(self, ino: int) -> tuple[Mount | None, int]:
        """``(mount, image inode)`` or ``(None, pseudo inode)``. Raises StaleInode."""
        if ino == ROOT_INO:
            root = self._root_mount
            return (root, root.fs.root_ino) if root is not None else (None, ino)
        index, local = decode_ino(ino)
        if index == 0:
            if local not in self._pseudo:
                raise StaleInode("pseudo directory no longer exists", inode=ino)
            return None, local
        mount = self._mounts.get(index)
        if mount is None:
            raise StaleInode("filesystem no longer mounted", inode=ino)
        return mount, local

    def _expose(self, mount: Mount, attr: Attr) -> Attr:
        return attr.with_ino(mount.kernel_ino(attr.ino, mount is self._root_mount))

    def _pseudo_attr(self, ino: int) -> Attr:
        return Attr(ino=ino, mode=stat.S_IFDIR | 0o755, nlink=2, uid=self._uid, gid=self._gid,
                    atime_ns=self._created_ns, mtime_ns=self._created_ns, ctime_ns=self._created_ns,
                    entry_timeout=PSEUDO_TIMEOUT, attr_timeout=PSEUDO_ATTR_TIMEOUT)

    def _entry_attr(self, entry: int | Mount, *, full: bool = True) -> Attr:
        """Attributes of a pseudo directory entry; ``full=False`` (readdir) needs only ino and type,
        which for a mounted image's root are known without touching the image -- so one broken
        image cannot break the listing of the pseudo directory it is mounted in."""
        if not isinstance(entry, Mount):
            return self._pseudo_attr(entry)
        mount = entry
        if not full:
            return Attr(mount.kernel_ino(mount.fs.root_ino, False), stat.S_IFDIR | 0o755)
        return self._call(mount, StatsFop.GETATTR, None, lambda: self._expose(
            mount, mount.fs.getattr(mount.fs.root_ino)))

    @staticmethod
    def _call(mount: Mount, fop: StatsFop, ino: int | None, fn: Callable[[], T]) -> T:
        start = time.perf_counter_ns()
        try:
            result = fn()
        except NydusError:
            mount.stats.fop_done(fop, ino=ino, success=False,
                                 latency_us=(time.perf_counter_ns() - start) / 1000)
            raise
        mount.stats.fop_done(fop, ino=ino, latency_us=(time.perf_counter_ns() - start) / 1000)
        return result

    # -- metadata operations (llfuse lock held) -------------------------------------------------

    def lookup(self, parent: int, name: bytes) -> Attr:
        """Attributes of ``name`` in ``parent``. Raises NotFound, NotADirectory, StaleInode."""
        mount, local = self._resolve(parent)
        if mount is None:
            entry = self._pseudo[local].entries.get(name)
            if entry is None:
                raise NotFound("no such entry", inode=parent, name=name)
            return self._entry_attr(entry)
        attr = self._call(mount, StatsFop.LOOKUP, local, lambda: mount.fs.lookup(local, name))
        mount.stats.file_opened(attr.ino)
        return self._expose(mount, attr)

    def getattr(self, ino: int) -> Attr:
        mount, local = self._resolve(ino)
        if mount is None:
            return self._pseudo_attr(local)
        return self._expose(mount, self._call(mount, StatsFop.GETATTR, local,
                                              lambda: mount.fs.getattr(local)))

    def readlink(self, ino: int) -> bytes:
        mount, local = self._resolve(ino)
        if mount is None:
            raise InvalidArgument("not a symlink", inode=ino)
        return self._call(mount, StatsFop.READLINK, local, lambda: mount.fs.readlink(local))

    def opendir(self, ino: int) -> FileHandle:
        """Check ``ino`` is a directory; the handle is the inode itself (directories are stateless)."""
        mount, local = self._resolve(ino)
        if mount is not None and not self._call(mount, StatsFop.OPENDIR, local,
                                                lambda: mount.fs.is_dir(local)):
            raise NotADirectory("not a directory", inode=ino)
        return FileHandle(ino)

    def readdir(self, ino: int, offset: int) -> Iterator[DirEntry]:
        """Entries of directory ``ino`` after ``offset``, with kernel inode numbers."""
        mount, local = self._resolve(ino)
        if mount is None:
            pseudo = self._pseudo[local]
            dots: list[tuple[bytes, int | Mount]] = [(b".", local), (b"..", pseudo.parent)]
            entries = dots + sorted(pseudo.entries.items(), key=lambda item: item[0])
            for i, (name, target) in enumerate(entries[offset:], start=offset + 1):
                try:
                    attr = self._entry_attr(target, full=False)
                except StaleInode:
                    continue
                yield DirEntry(name, attr, i)
            return
        start = time.perf_counter_ns()
        listing = mount.listings.get(local) or self._list_dir(mount, local)
        new = tuple.__new__
        # entry i (0-based) carries next_offset i + 1
        for pos, (name, fields) in enumerate(listing[offset:], offset + 1):
            yield new(DirEntry, (name, new(Attr, fields), pos))
        mount.stats.fop_done(StatsFop.READDIR, ino=local,
                             latency_us=(time.perf_counter_ns() - start) / 1000)

    def image_listing(self, ino: int, offset: int) -> tuple[RawEntry, ...] | None:
        """``readdir`` of an image directory as the cached ``(name, attr fields)`` tuples after
        ``offset`` (entry k of the result carries next_offset ``offset + k + 1``): no
        ``DirEntry``/``Attr`` per entry, for the READDIR(PLUS) hot path. None for a pseudo
        directory (use ``readdir``). Raises as ``readdir``."""
        mount, local = self._resolve(ino)
        if mount is None:
            return None
        start = time.perf_counter_ns()
        listing = mount.listings.get(local) or self._list_dir(mount, local)
        mount.stats.fop_done(StatsFop.READDIR, ino=local,
                             latency_us=(time.perf_counter_ns() - start) / 1000)
        return listing[offset:]

    def _list_dir(self, mount: Mount, local: int) -> tuple[RawEntry, ...]:
        """The whole listing of image directory ``local`` (``RafsFs.listing``), cached."""
        # built with kernel inode numbers (``_expose`` of every entry, without a copy per entry)
        root_ino = mount.fs.root_ino if mount is self._root_mount else -1
        listing = tuple(mount.fs.listing(local, encode_ino(mount.index, 0), root_ino))
        if sum(m.listed for m in self._mounts.values()) + len(listing) > DIR_CACHE_ENTRIES:
            for m in self._mounts.values():
                m.listings = {}
                m.listed = 0
        mount.listings[local] = listing
        mount.listed += len(listing)
        return listing

    def listxattr(self, ino: int) -> list[bytes]:
        mount, local = self._resolve(ino)
        if mount is None:
            return []
        return self._call(mount, StatsFop.LISTXATTR, local, lambda: mount.fs.listxattr(local))

    def getxattr(self, ino: int, name: bytes) -> bytes:
        mount, local = self._resolve(ino)
        if mount is None:
            raise NoXattr("pseudo directories carry no xattrs", inode=ino, name=name)
        return self._call(mount, StatsFop.GETXATTR, local, lambda: mount.fs.getxattr(local, name))

    def statfs(self) -> StatFs:
        root = self._root_mount
        if root is not None:
            return root.fs.statfs()
        return StatFs(files=sum(m.fs.statfs().files for m in self._mounts.values()))

    def access(self, ino: int, mode: int) -> bool:
        """Read-only filesystem: any write access is refused (EROFS), everything else allowed."""
        self._resolve(ino)
        if mode & os.W_OK:
            raise ReadOnly("read-only file system", inode=ino)
        return True

    def forget(self, inodes: list[tuple[int, int]]) -> None:
        """The kernel dropped these inodes; drop their per-file counters. Never raises."""
        for ino, _count in inodes:
            index, local = decode_ino(ino)
            mount = self._mounts.get(index) if index else None
            if mount is not None:
                mount.stats.file_forgotten(local)

    # -- files ----------------------------------------------------------------------------------

    def open(self, ino: int, flags: int) -> FileHandle:
        """Open a regular file read-only. Raises ReadOnly for write flags, IsADirectory, NotFound."""
        if flags & _WRITE_FLAGS:
            raise ReadOnly("read-only file system", inode=ino)
        mount, local = self._resolve(ino)
        if mount is None:
            raise IsADirectory("is a directory", inode=ino)
        file = self._call(mount, StatsFop.OPEN, local, lambda: mount.fs.open(local))
        mount.stats.file_opened(local)
        fh = next(self._fh)
        self._handles[fh] = _OpenFile(mount, file)
        return FileHandle(fh)

    def read(self, fh: int, offset: int, size: int) -> bytes | memoryview:
        """File data (bytes-like, see ``RafsFile.read``); runs with llfuse's lock RELEASED. Raises
        BackendError/IntegrityError (EIO); StaleInode (ESTALE) once the file's image was unmounted
        or remounted (a read that raced the umount may still end in BackendError: cache closed)."""
        handle = self._handles.get(fh)
        if handle is None:
            raise InvalidArgument("bad file handle", fh=fh)
        mount = handle.mount
        if self._mounts.get(mount.index) is not mount:
            # umounted or remounted since the open: its device and cache are closed (or closing)
            raise StaleInode("file's filesystem is no longer mounted", fh=fh, inode=handle.file.ino)
        file = handle.file
        start = perf_counter_ns()
        try:
            data = file.read(offset, size)
        except NydusError as e:
            mount.stats.fop_done(StatsFop.READ, ino=file.ino, success=False,
                                 latency_us=(perf_counter_ns() - start) / 1000)
            log.warning("read_failed", mountpoint=mount.path, inode=file.ino, offset=offset,
                        size=size, error=str(e))
            if self._on_error is not None:
                self._on_error(f"read of inode {file.ino} in {mount.path} failed: {e}")
            raise
        mount.stats.read_done(file.ino, len(data), perf_counter_ns() - start)
        return data

    def read_nowait(self, fh: int, offset: int, size: int) -> memoryview | None:
        """``read`` when the bytes can be had at once without blocking (see
        ``RafsFile.read_nowait``: a view of the calling thread's buffer, valid until its next
        call); None otherwise -- also for a bad or stale handle, which ``read`` then reports.
        For the llfuse handler, with llfuse's lock held: no I/O wait, no lock."""
        handle = self._handles.get(fh)
        if handle is None:
            return None
        mount = handle.mount
        if self._mounts.get(mount.index) is not mount:
            return None
        file = handle.file
        start = perf_counter_ns()
        data = file.read_nowait(offset, size)
        if data is not None:
            mount.stats.read_done(file.ino, len(data), perf_counter_ns() - start)
        return data

    def adopt_handle(self, fh: int, ino: int) -> None:
        """Register ``fh`` -- a handle a predecessor process gave the kernel for inode ``ino`` --
        as an open file of ``ino`` (takeover). Raises as ``open``."""
        if fh in self._handles:
            return
        mount, local = self._resolve(ino)
        if mount is None:
            raise IsADirectory("is a directory", inode=ino)
        file = self._call(mount, StatsFop.OPEN, local, lambda: mount.fs.open(local))
        self._handles.setdefault(fh, _OpenFile(mount, file))

    def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is not None:
            handle.mount.stats.fop_done(StatsFop.RELEASE, ino=handle.file.ino)

    def open_handles(self) -> int:
        return len(self._handles)

