"""The builder's in-memory filesystem tree, and the overlay (layering / whiteout) rules on it.

Owns: ``Node`` (one name in the tree), ``FileData`` (a regular file's content description, shared by
every name of a hard-link group), ``BlobRef``/``ChunkRef`` (a chunk and the blob it lives in, before
blob indexes are assigned), the whiteout predicates and ``overlay`` (spec §5), ``drop_whiteouts``
and the deterministic walks. Must not import rafs or do I/O: source walkers build trees, the
bootstrap module turns them into the format library's model.
Threading: trees are built and mutated by one thread; nothing here locks.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

from nydusd.builder.options import WhiteoutSpec
from nydusd.errors import BuildError
from nydusd.rafs.model import FileTypeMixin
from nydusd.storage.chunk import BlobInfo, ChunkInfo

OCI_WHITEOUT_PREFIX = b".wh."
OCI_OPAQUE = b".wh..wh..opq"
OVERLAY_OPAQUE_XATTR = b"trusted.overlay.opaque"
MAX_NAME_LEN = 255
XATTR_PREFIXES = (b"user.", b"security.", b"trusted.")
XATTR_NAMES = (b"system.posix_acl_access", b"system.posix_acl_default")
MAX_XATTR_VALUE = 64 * 1024


class BlobRef:
    """Identity of one blob while the blob table is still being assembled.

    ``info`` is the existing blob's table entry (parent image, chunk dictionary) or None for the
    blob this build is writing (filled in once it is finished).
    """

    __slots__ = ("info", "label")

    def __init__(self, info: BlobInfo | None, label: str = "") -> None:
        self.info = info
        self.label = label or (info.blob_id if info else "<new>")

    def __repr__(self) -> str:
        return f"BlobRef({self.label})"


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """A chunk record (its ``blob_index``/``file_offset`` are placeholders) and the blob holding it."""

    blob: BlobRef
    chunk: ChunkInfo


@dataclass(eq=False, slots=True)
class FileData:
    """The content of a regular file; every hard link to the file shares one instance."""

    size: int
    chunks: list[ChunkRef] = field(default_factory=list)


@dataclass(eq=False, slots=True)
class Node(FileTypeMixin):
    """One directory entry. ``children`` is set exactly for directories, ``data`` for regular files,
    ``symlink`` for symbolic links. ``rdev`` is the Linux-encoded device number."""

    name: bytes
    mode: int
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    mtime_nsec: int = 0
    rdev: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    symlink: bytes | None = None
    children: dict[bytes, Node] | None = None
    data: FileData | None = None
    #: a directory a tar layer only implied (a parent of listed entries, never listed itself): its
    #: default attributes must not replace those of the same directory in a lower layer
    implicit: bool = False

    @property
    def size(self) -> int:
        if self.data is not None:
            return self.data.size
        if self.symlink is not None:
            return len(self.symlink)
        return 0

    def sorted_children(self) -> list[Node]:
        """Children sorted by name as raw bytes (spec §2.8)."""
        if not self.children:
            return []
        return [self.children[k] for k in sorted(self.children)]


def new_dir(name: bytes, mode: int = 0o755, uid: int = 0, gid: int = 0, mtime: int = 0) -> Node:
    return Node(name=name, mode=stat.S_IFDIR | (mode & 0o7777), uid=uid, gid=gid, mtime=mtime, children={})


def check_name(name: bytes, path: str) -> None:
    """Raise BuildError for a name the format cannot hold (empty, '/', NUL, > 255 bytes)."""
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise BuildError("invalid file name", path=path)
    if len(name) > MAX_NAME_LEN:
        raise BuildError(f"file name longer than {MAX_NAME_LEN} bytes", path=path, length=len(name))


def keep_xattr(name: bytes) -> bool:
    """Whether RAFS can store an xattr of this name (spec §1.7)."""
    return name.startswith(XATTR_PREFIXES) or name in XATTR_NAMES


def check_xattr(name: bytes, value: bytes, path: str) -> None:
    if len(name) > MAX_NAME_LEN or len(value) > MAX_XATTR_VALUE:
        raise BuildError("xattr too large", path=path, xattr=name.decode(errors="replace"))


# --------------------------------------------------------------------------------------------------
# whiteouts (spec §5)


def is_whiteout(node: Node, spec: WhiteoutSpec) -> bool:
    """Whether ``node`` is a whiteout marker (not a real entry) under ``spec``."""
    if spec is WhiteoutSpec.OCI:
        return node.name.startswith(OCI_WHITEOUT_PREFIX)
    if spec is WhiteoutSpec.OVERLAYFS:
        return stat.S_ISCHR(node.mode) and node.rdev == 0
    return False


def is_overlay_opaque(node: Node) -> bool:
    return node.is_dir and node.xattrs.get(OVERLAY_OPAQUE_XATTR) == b"y"


def drop_whiteouts(root: Node, spec: WhiteoutSpec) -> None:
    """Remove whiteout markers from a tree built without a parent (an overlayfs-opaque directory is
    kept, xattr included, spec §5 rule 4)."""
    if spec is WhiteoutSpec.NONE:
        return
    for node in iter_dirs(root):
        assert node.children is not None
        for name in [n for n, c in node.children.items() if is_whiteout(c, spec)]:
            del node.children[name]


def overlay(lower: Node, upper: Node, spec: WhiteoutSpec) -> None:
    """Apply ``upper`` on top of ``lower`` in place (spec §5 steps 2-3); ``upper`` is consumed.

    Directory attributes come from the upper layer unless it only implied the directory.
    Raises BuildError if either root is not a directory.
    """
    if not (lower.is_dir and upper.is_dir):
        raise BuildError("overlay roots must be directories")
    _copy_attrs(lower, upper)
    _overlay_dir(lower, upper, spec)


def _copy_attrs(dst: Node, src: Node) -> None:
    if src.implicit:
        return
    dst.mode, dst.uid, dst.gid = src.mode, src.uid, src.gid
    dst.mtime, dst.mtime_nsec, dst.xattrs = src.mtime, src.mtime_nsec, dict(src.xattrs)


def _overlay_dir(lower: Node, upper: Node, spec: WhiteoutSpec) -> None:
    assert lower.children is not None and upper.children is not None
    # pass 1: whiteouts, never copied into the result
    rest: list[Node] = []
    for child in upper.sorted_children():
        if spec is WhiteoutSpec.OCI and child.name == OCI_OPAQUE:
            lower.children.clear()
        elif spec is WhiteoutSpec.OCI and child.name.startswith(OCI_WHITEOUT_PREFIX):
            lower.children.pop(child.name[len(OCI_WHITEOUT_PREFIX):], None)
        elif spec is WhiteoutSpec.OVERLAYFS and is_whiteout(child, spec):
            lower.children.pop(child.name, None)
        else:
            if spec is WhiteoutSpec.OVERLAYFS and is_overlay_opaque(child):
                del child.xattrs[OVERLAY_OPAQUE_XATTR]
                old = lower.children.get(child.name)
                if old is not None and old.is_dir:
                    assert old.children is not None
                    old.children.clear()
            rest.append(child)
    # pass 2: replace or insert
    for child in rest:
        old = lower.children.get(child.name)
        if old is not None and old.is_dir and child.is_dir:
            _copy_attrs(old, child)
            _overlay_dir(old, child, spec)
        else:
            if child.is_dir:
                # a new directory may itself carry whiteouts that have nothing below them
                _strip_markers(child, spec)
            lower.children[child.name] = child


def _strip_markers(node: Node, spec: WhiteoutSpec) -> None:
    for d in iter_dirs(node):
        assert d.children is not None
        for name in [n for n, c in d.children.items() if is_whiteout(c, spec)]:
            del d.children[name]
        if spec is WhiteoutSpec.OVERLAYFS:
            d.xattrs.pop(OVERLAY_OPAQUE_XATTR, None)


# --------------------------------------------------------------------------------------------------
# walks


def iter_dirs(root: Node) -> Iterator[Node]:
    """Every directory, depth-first pre-order, children sorted (iterative: deep trees are fine)."""
    stack = [root]
    while stack:
        node = stack.pop()
        if not node.is_dir:
            continue
        yield node
        stack.extend(reversed([c for c in node.sorted_children() if c.is_dir]))


def iter_nodes(root: Node, prefix: bytes = b"") -> Iterator[tuple[bytes, Node]]:
    """``(path, node)`` for every node, depth-first pre-order with sorted children; root is ``/``."""
    stack: list[tuple[bytes, Node]] = [(b"/", root)]
    while stack:
        path, node = stack.pop()
        yield path, node
        if node.is_dir:
            base = path if path.endswith(b"/") else path + b"/"
            stack.extend((base + c.name, c) for c in reversed(node.sorted_children()))


def lookup_path(root: Node, path: bytes) -> Node | None:
    node: Node | None = root
    for part in path.strip(b"/").split(b"/"):
        if not part:
            continue
        if node is None or node.children is None:
            return None
        node = node.children.get(part)
    return node
