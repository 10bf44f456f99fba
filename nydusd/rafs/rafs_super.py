"""The read-side object model shared by RAFS v5 and v6: ``Inode`` and the ``RafsSuper`` base class.

Owns: the version-independent API the daemon and the tools use (``get_inode``, ``lookup``,
``iter_dir``, ``readlink``, ``xattrs``, ``chunks``, ``prefetch_inodes``, ``path_of``, ``resolve``,
``walk``, ``to_model``) and the bounded-cycle tree walk. The on-disk decoding lives in v5.py / v6.py,
which subclass ``RafsSuper``.

Must not import fs, daemon, builder or anything with I/O beyond the mapped image.
Threading: a ``RafsSuper`` is safe to share between threads. The mapped image is only read with
``struct.unpack_from``/slicing at explicit offsets (no shared cursor); decoded inodes live in
``functools.lru_cache`` caches (internally locked); lazily built indexes are published under
``self._lock`` and never mutated afterwards.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeAlias

from nydusd.compress import Compressor
from nydusd.digest import DigestAlgorithm
from nydusd.errors import CorruptMetadata, InvalidArgument, NotFound
from nydusd.rafs.layout import SB_EXPLICIT_UID_GID, SB_HAS_XATTR, SB_INLINED_CHUNK_DIGEST
from nydusd.rafs.model import Bootstrap, FileTypeMixin, Node
from nydusd.storage.chunk import BlobInfo, ChunkInfo

#: what ``stat``/``dir_stats`` return per inode, as a plain tuple (cheap to build on the listing hot
#: path): ``(ino, mode, nlink, uid, gid, rdev, size, blocks, mtime, mtime_nsec)`` -- the same values
#: as the ``Inode`` fields of those names
StatTuple: TypeAlias = tuple[int, int, int, int, int, int, int, int, int, int]

MAX_PATH_DEPTH = 1 << 16  # longer parent chains are treated as corrupt (cyclic)

#: the superblock summary fields of ``GET /api/v1/daemon/backend`` (upstream's RafsSuperMeta)
SUMMARY_KEYS = ("magic", "version", "sb_size", "root_inode", "chunk_size", "batch_size",
                "inodes_count", "flags", "inode_table_entries", "inode_table_offset",
                "blob_table_size", "blob_table_offset", "extended_blob_table_offset",
                "extended_blob_table_entries", "blob_device_table_count",
                "blob_device_table_offset", "prefetch_table_offset", "prefetch_table_entries",
                "attr_timeout", "entry_timeout", "is_chunk_dict", "meta_blkaddr", "root_nid",
                "chunk_table_offset", "chunk_table_size")


@dataclass(frozen=True, slots=True)
class Inode(FileTypeMixin):
    """One decoded inode. ``ino`` is the number the RafsSuper API uses (v5: i_ino, v6: nid).

    ``rdev`` is a host ``dev_t`` (``os.major``/``os.minor`` work on it). The trailing fields are
    format internals the decoders need (v5: record offsets; v6: data layout, ``i_u`` and the size
    of inode + xattr area); callers should not rely on them.
    """

    ino: int
    mode: int
    uid: int
    gid: int
    size: int
    nlink: int
    rdev: int
    mtime: int
    mtime_nsec: int
    blocks: int
    has_xattr: bool
    meta_offset: int = 0
    child_index: int = 0
    child_count: int = 0
    layout: int = 0
    raw_u: int = 0
    inode_size: int = 0
    name: bytes = b""
    symlink_offset: int = 0
    xattr_offset: int = 0
    chunk_offset: int = 0
    index: int = 0
    parent: int = 0
    has_hole: bool = False  # v5 ``RAFS_V5_INODE_HAS_HOLE``: the chunk list may leave gaps


class RafsSuper(ABC):
    """A loaded bootstrap. Build it with ``nydusd.rafs.load_bootstrap``; close it when done.

    Public attributes: ``version`` (5|6), ``root_ino``, ``blobs`` (list[BlobInfo]), ``chunk_size``,
    ``compressor``, ``digester``, ``flags`` (superblock flags), ``inode_count`` (entries incl.
    root, hardlink names counted individually), ``explicit_uid_gid``, ``has_xattr``.
    Every method raises CorruptMetadata when the metadata it touches is malformed.
    """

    version: int
    root_ino: int
    blobs: list[BlobInfo]
    chunk_size: int
    compressor: Compressor
    digester: DigestAlgorithm
    flags: int
    inode_count: int
    #: the superblock's inode count as recorded (v5 ``s_inodes_count``, whose meaning varies by
    #: builder vintage; v6 ``s_inos``): what upstream's ``inspect`` reports
    inodes_count_field: int

    def __init__(self, buf: Any, source: str) -> None:
        self._buf = buf
        self.source = source
        self._lock = threading.Lock()
        self._parents: dict[int, tuple[int, bytes]] | None = None
        self._sorted_dirs: set[int] = set()  # directories whose name order was verified

    # ---- lifecycle ------------------------------------------------------------------------------
    def close(self) -> None:
        """Unmap the image. Later calls on this object fail."""
        close = getattr(self._buf, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> RafsSuper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def explicit_uid_gid(self) -> bool:
        return bool(self.flags & SB_EXPLICIT_UID_GID)

    @property
    def has_xattr(self) -> bool:
        return bool(self.flags & SB_HAS_XATTR)

    # ---- per-version primitives -----------------------------------------------------------------
    @abstractmethod
    def get_inode(self, ino: int) -> Inode:
        """The inode numbered ``ino``. Raises NotFound for a number outside the image."""

    @abstractmethod
    def lookup(self, parent_ino: int, name: bytes) -> Inode:
        """The child ``name`` of directory ``parent_ino`` (``.``/``..`` resolved). Raises NotFound."""

    @abstractmethod
    def iter_dir(self, ino: int, offset: int = 0) -> Iterator[tuple[bytes, int, int]]:
        """Entries of directory ``ino`` from position ``offset``: ``(name, ino, next_offset)``.

        Includes ``.`` and ``..`` (the root's ``..`` is itself). ``next_offset`` resumes after the
        entry. Raises InvalidArgument if ``ino`` is not a directory.
        """

    @abstractmethod
    def readlink(self, ino: int) -> bytes:
        """Target of symlink ``ino``. Raises InvalidArgument if it is not a symlink."""

    @abstractmethod
    def xattrs(self, ino: int) -> dict[bytes, bytes]:
        """Extended attributes of ``ino`` (full names, e.g. ``b"user.k"``)."""

    @abstractmethod
    def chunks(self, ino: int) -> list[ChunkInfo]:
        """Chunks of regular file ``ino`` in file order, ``file_offset`` = i * chunk_size."""

    @abstractmethod
    def prefetch_inodes(self) -> list[int]:
        """Inode numbers listed in the prefetch table (directories mean "everything below")."""

    # ---- attributes in bulk (overridden by v6 with a decoder that builds no Inode) ---------------
    def stat(self, ino: int) -> StatTuple:
        """The attribute fields of inode ``ino`` (see ``StatTuple``). Raises as ``get_inode``."""
        i = self.get_inode(ino)
        return (i.ino, i.mode, i.nlink, i.uid, i.gid, i.rdev, i.size, i.blocks, i.mtime, i.mtime_nsec)

    def lookup_stat(self, parent_ino: int, name: bytes) -> StatTuple:
        """``lookup`` as attribute fields (see ``StatTuple``). Raises as ``lookup``."""
        i = self.lookup(parent_ino, name)
        return (i.ino, i.mode, i.nlink, i.uid, i.gid, i.rdev, i.size, i.blocks, i.mtime, i.mtime_nsec)

    def dir_stats(self, ino: int) -> list[tuple[bytes, StatTuple]]:
        """Every entry of directory ``ino`` (``iter_dir`` from 0: entry k has ``next_offset``
        k + 1) with the attribute fields of its inode, as ``get_inode`` decodes them. Raises as
        ``iter_dir`` and ``get_inode`` (a corrupt child inode fails the whole listing)."""
        stat = self.stat
        return [(bytes(name), stat(child)) for name, child, _ in self.iter_dir(ino)]

    # ---- derived ------------------------------------------------------------------------------------
    def summary(self, *, batch_size: int, timeout: float) -> dict[str, Any]:
        """The superblock summary ``GET /api/v1/daemon/backend`` reports (upstream's
        RafsSuperMeta): every ``SUMMARY_KEYS`` field, 0 where this reader keeps no value.
        ``batch_size`` and ``timeout`` (attr/entry, seconds) are the mount's, as upstream."""
        version = int(self.version)
        secs = {"secs": int(timeout), "nanos": 0}
        info: dict[str, Any] = dict.fromkeys(SUMMARY_KEYS, 0)
        info.update({
            "magic": 0x52414653 if version == 5 else 0xE0F5E1E2, "version": version << 8,
            "sb_size": 8192 if version == 5 else 128, "root_inode": int(self.root_ino),
            "chunk_size": int(self.chunk_size), "batch_size": int(batch_size),
            "inodes_count": int(self.inode_count), "flags": int(self.flags),
            "blob_table_size": len(self.blobs), "attr_timeout": secs, "entry_timeout": secs,
            "is_chunk_dict": False, "root_nid": int(self.root_ino) if version == 6 else 0})
        return info

    def children(self, ino: int) -> Iterator[tuple[bytes, int]]:
        """``(name, ino)`` of the entries of directory ``ino`` without ``.`` and ``..``."""
        for name, child, _ in self.iter_dir(ino):
            if name not in (b".", b".."):
                yield name, child

    def resolve(self, path: str | bytes) -> Inode:
        """The inode at absolute ``path`` (symlinks are not followed). Raises NotFound."""
        raw = path.encode() if isinstance(path, str) else path
        inode = self.get_inode(self.root_ino)
        for part in raw.split(b"/"):
            if part in (b"", b"."):
                continue
            if not inode.is_dir:
                raise NotFound("not a directory", path=raw.decode(errors="replace"))
            inode = self.lookup(inode.ino, part)
        return inode

    def path_of(self, ino: int) -> bytes:
        """An absolute path of ``ino`` (for hardlinks: one of its names). Raises NotFound."""
        if ino == self.root_ino:
            return b"/"
        parents = self._parent_map()
        if ino not in parents:
            raise NotFound("inode not reachable from the root", ino=ino)
        parts: list[bytes] = []
        cur = ino
        while cur != self.root_ino:
            if cur not in parents or len(parts) > min(MAX_PATH_DEPTH, self.inode_count):
                raise CorruptMetadata("broken parent chain", field="i_parent", ino=ino, at=cur)
            cur, name = parents[cur][0], parents[cur][1]
            parts.append(name)
        return b"/" + b"/".join(reversed(parts))

    def _parent_map(self) -> dict[int, tuple[int, bytes]]:
        with self._lock:
            if self._parents is None:
                parents: dict[int, tuple[int, bytes]] = {}
                for path, inode, parent in self._walk_entries():
                    parents.setdefault(inode.ino, (parent, path.rsplit(b"/", 1)[1]))
                self._parents = parents
            return self._parents

    def walk(self) -> Iterator[tuple[bytes, Inode]]:
        """Every entry as ``(absolute path, inode)``, pre-order, children in name order.

        Raises CorruptMetadata when a directory is reachable twice (a cycle or shared directory).
        """
        for path, inode, _ in self._walk_entries():
            yield path, inode

    def walk_depth_first(self) -> Iterator[tuple[bytes, Inode]]:
        """Every entry as ``(absolute path, inode)``, each directory followed at once by its whole
        subtree, children in name order (upstream's unpack order: a tar extracted in this order
        keeps every directory's mtime, as tar restores it when it leaves the directory).

        Raises CorruptMetadata when a directory is reachable twice (a cycle or shared directory).
        """
        root = self.get_inode(self.root_ino)
        if not root.is_dir:
            raise CorruptMetadata("root inode is not a directory", field="root", ino=self.root_ino)
        seen_dirs = {root.ino}
        yield b"/", root
        stack: list[tuple[bytes, Iterator[tuple[bytes, int]]]] = [(b"", self.children(root.ino))]
        while stack:
            prefix, children = stack[-1]
            entry = next(children, None)
            if entry is None:
                stack.pop()
                continue
            path = prefix + b"/" + entry[0]
            child = self.get_inode(entry[1])
            yield path, child
            if child.is_dir:
                if child.ino in seen_dirs:
                    raise CorruptMetadata("directory reachable twice (cycle)", field="dirent",
                                          ino=child.ino, path=path.decode(errors="replace"))
                seen_dirs.add(child.ino)
                stack.append((path, self.children(child.ino)))

    def _walk_entries(self) -> Iterator[tuple[bytes, Inode, int]]:
        root = self.get_inode(self.root_ino)
        if not root.is_dir:
            raise CorruptMetadata("root inode is not a directory", field="root", ino=self.root_ino)
        seen_dirs = {root.ino}
        yield b"/", root, root.ino
        stack: list[tuple[bytes, int]] = [(b"", root.ino)]
        while stack:
            prefix, dir_ino = stack.pop()
            subdirs: list[tuple[bytes, int]] = []
            for name, child_ino in self.children(dir_ino):
                path = prefix + b"/" + name
                child = self.get_inode(child_ino)
                yield path, child, dir_ino
                if child.is_dir:
                    if child.ino in seen_dirs:
                        raise CorruptMetadata("directory reachable twice (cycle)", field="dirent",
                                              ino=child.ino, path=path.decode(errors="replace"))
                    seen_dirs.add(child.ino)
                    subdirs.append((path, child.ino))
            stack.extend(reversed(subdirs))

    def to_model(self) -> Bootstrap:
        """The whole image as a ``model.Bootstrap`` (chunks included; regular files get
        ``hardlink = ino`` so names of one inode stay grouped)."""
        nodes: dict[bytes, Node] = {}
        for path, inode in self.walk():
            node = self._node_of(path, inode)
            if path == b"/":
                nodes[b""] = node
                continue
            parent, _, _ = path.rpartition(b"/")
            nodes[parent].children.append(node)
            if inode.is_dir:
                nodes[path] = node
        root = nodes[b""]
        return Bootstrap(root=root, blobs=list(self.blobs), chunk_size=self.chunk_size,
                         compressor=self.compressor, digester=self.digester,
                         explicit_uid_gid=self.explicit_uid_gid,
                         extra_flags=self.flags & SB_INLINED_CHUNK_DIGEST,
                         prefetch=[self.path_of(i) for i in self.prefetch_inodes()])

    def _node_of(self, path: bytes, inode: Inode) -> Node:
        name = b"/" if path == b"/" else path.rsplit(b"/", 1)[1]
        node = Node(name=name, mode=inode.mode, uid=inode.uid, gid=inode.gid, mtime=inode.mtime,
                    mtime_nsec=inode.mtime_nsec, rdev=inode.rdev, nlink=inode.nlink,
                    size=inode.size if inode.is_reg else 0,
                    xattrs=self.xattrs(inode.ino) if inode.has_xattr else {})
        if inode.is_symlink:
            node.symlink = self.readlink(inode.ino)
        elif inode.is_reg:
            node.chunks = self.chunks(inode.ino)
            node.hardlink = inode.ino
        return node

    def _not_found(self, parent_ino: int, name: bytes) -> NotFound:
        """NotFound for a failed binary search -- after checking once per directory that its
        names really are sorted (else the search proves nothing: CorruptMetadata)."""
        if parent_ino not in self._sorted_dirs:
            prev = None
            # v5 keeps "." / ".." out of its sorted children; v6 sorts them in with the rest
            names = (n for n, _i, _o in self.iter_dir(parent_ino, 2 if self.version == 5 else 0))
            for child in names:
                if prev is not None and child <= prev:
                    raise CorruptMetadata("directory entries are not sorted", field="name",
                                          ino=parent_ino, entry=child.decode(errors="replace"))
                prev = child
            self._sorted_dirs.add(parent_ino)
        return NotFound("no such entry", ino=parent_ino, name=name.decode(errors="replace"))

    def _require(self, inode: Inode, kind: str) -> None:
        ok = {"dir": inode.is_dir, "symlink": inode.is_symlink, "reg": inode.is_reg}[kind]
        if not ok:
            raise InvalidArgument(f"inode is not a {kind}", ino=inode.ino)
