"""Numbering and validation of a model tree before serialisation (spec §2.8, shared by v5 and v6).

Owns: ``Entry`` (one numbered directory entry), ``number_tree`` (sorted children get consecutive
indexes, then recurse into subdirectories; hardlink groups share the first name's number), model
validation (names, types, symlinks, xattrs, chunk lists) raising BuildError with the path, the
superblock flag computation and prefetch-path resolution.

Must not import fs, daemon, builder. Threading: pure functions over a model that is only read.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field

from nydusd.errors import BuildError
from nydusd.rafs import layout as L
from nydusd.rafs.model import Bootstrap, Node

XATTR_PREFIXES = (b"user.", b"security.", b"trusted.")
XATTR_EXACT = (b"system.posix_acl_access", b"system.posix_acl_default")


@dataclass(eq=False)
class Entry:
    """One numbered directory entry. ``inode`` is the entry whose attributes/chunks it shares
    (itself unless it is a later name of a hardlink group)."""

    node: Node
    index: int
    parent: Entry | None
    ino: int = 0
    children: list[Entry] = field(default_factory=list)
    child_index: int = 0
    nlink: int = 1
    inode: Entry | None = None

    @property
    def primary(self) -> Entry:
        return self.inode or self


def number_tree(bootstrap: Bootstrap) -> list[Entry]:
    """Validate the model and number it (§2.8). Returns entries in index order (index 1 = root).

    Raises BuildError naming the offending path for an invalid model.
    """
    root = bootstrap.root
    if not root.is_dir:
        raise BuildError("root node is not a directory")
    entries = [Entry(root, 1, None, 1)]
    stack = [entries[0]]
    groups: dict[object, Entry] = {}
    while stack:
        d = stack.pop()
        kids = sorted(d.node.children, key=lambda n: n.name)
        d.child_index = len(entries) + 1
        for i, child in enumerate(kids):
            if i and kids[i - 1].name == child.name:
                raise BuildError("duplicate name in directory", name=child.name.decode(errors="replace"))
            e = Entry(child, len(entries) + 1, d)
            e.ino = e.index
            if child.is_reg and child.hardlink is not None:
                first = groups.setdefault(child.hardlink, e)
                if first is not e:
                    e.inode, e.ino = first, first.ino
            d.children.append(e)
            entries.append(e)
        stack.extend(reversed([c for c in d.children if c.node.is_dir]))
    for e in entries:
        _validate(e, bootstrap)
    counts: dict[int, int] = {}
    for e in entries:
        counts[e.ino] = counts.get(e.ino, 0) + 1
    for e in entries:
        if e.node.is_dir:
            e.nlink = 2 + sum(1 for c in e.children if c.node.is_dir)
        else:
            e.nlink = counts[e.ino]
    return entries


def entry_path(e: Entry) -> bytes:
    parts = []
    while e.parent is not None:
        parts.append(e.node.name)
        e = e.parent
    return b"/" + b"/".join(reversed(parts))


def _validate(e: Entry, bootstrap: Bootstrap) -> None:
    n = e.node

    def fail(msg: str) -> BuildError:
        return BuildError(msg, path=entry_path(e).decode(errors="replace"))

    if e.parent is not None and (not 1 <= len(n.name) <= 255 or b"/" in n.name or b"\0" in n.name
                                 or n.name in (b".", b"..")):
        raise fail("invalid file name")
    ftype = stat.S_IFMT(n.mode)
    if ftype not in (stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK,
                     stat.S_IFIFO, stat.S_IFSOCK):
        raise fail("unknown file type")
    if ftype != stat.S_IFDIR and n.children:
        raise fail("only directories have children")
    if ftype == stat.S_IFLNK and (n.symlink is None or not 1 <= len(n.symlink) <= 4096):
        raise fail("symlink target must be 1..4096 bytes")
    for name, value in n.xattrs.items():
        if not (name.startswith(XATTR_PREFIXES) or name in XATTR_EXACT) or len(name) > 255 \
                or len(value) > 65536:
            raise fail(f"unsupported xattr {name!r}")
    if ftype == stat.S_IFREG and e.inode is None:
        _validate_chunks(n, bootstrap, fail)
    elif ftype != stat.S_IFREG and n.chunks:
        raise fail("only regular files have chunks")


def _validate_chunks(n: Node, bootstrap: Bootstrap, fail: object) -> None:
    cs = bootstrap.chunk_size
    if len(n.chunks) != -(-n.size // cs):
        raise fail(f"file of {n.size} bytes needs {-(-n.size // cs)} chunks, has {len(n.chunks)}")  # type: ignore[operator]
    for i, c in enumerate(n.chunks):
        want = min(cs, n.size - i * cs)
        if c.blob_index >= len(bootstrap.blobs) or c.uncompressed_size != want or c.file_offset != i * cs:
            raise fail(f"chunk {i} does not fit the file (blob, size or file offset)")  # type: ignore[operator]


def sb_flags(bootstrap: Bootstrap, has_xattr: bool, version: int) -> int:
    flags = bootstrap.compressor.sb_flag | bootstrap.digester.sb_flag | bootstrap.extra_flags
    if bootstrap.explicit_uid_gid:
        flags |= L.SB_EXPLICIT_UID_GID
    if has_xattr:
        flags |= L.SB_HAS_XATTR
    if version == 5:
        flags &= ~(L.SB_INLINED_CHUNK_DIGEST | L.SB_TARFS_MODE | L.SB_ENCRYPTION_NONE)
    return flags


def data_size(e: Entry, bootstrap: Bootstrap) -> int:
    n = e.primary.node
    if n.is_reg:
        return n.size
    if n.is_symlink:
        return len(n.symlink or b"")
    return 0


def prefetch_entries(bootstrap: Bootstrap, entries: list[Entry]) -> list[Entry]:
    if not bootstrap.prefetch:
        return []
    by_path = {entry_path(e): e for e in entries}
    out = []
    for p in bootstrap.prefetch:
        e = by_path.get(b"/" + p.strip(b"/") if p.strip(b"/") else b"/")
        if e is None:
            raise BuildError("prefetch path not in the tree", path=p.decode(errors="replace"))
        out.append(e)
    return out


