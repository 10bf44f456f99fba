"""Builder tree <-> format-library model: blob table assembly and bootstrap bytes.

Owns: ``tree_from_model`` (a parent / chunk-dict / per-layer bootstrap loaded by the format library
becomes a builder tree whose chunks keep pointing at their blobs), ``assemble_blobs`` (which blobs
the image's blob table lists, in which order, spec §5), ``to_model`` (builder tree -> model with
final ``blob_index``/``file_offset``) and ``load_image`` (bootstrap file -> tree + blob refs).
Must not import fs/daemon/storage beyond ``storage.chunk``. Threading: pure functions, one caller.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Iterable
from dataclasses import replace

from nydusd.builder.tree import BlobRef, ChunkRef, FileData, Node, iter_nodes
from nydusd.errors import BuildError, CorruptMetadata, NydusError
from nydusd.rafs import model as M
from nydusd.storage.chunk import BlobInfo, ChunkInfo


class LoadedImage:
    """A bootstrap read back as a builder tree, with its settings and one BlobRef per blob."""

    def __init__(self, root: Node, blobs: list[BlobRef], bootstrap: M.Bootstrap, version: int) -> None:
        self.root = root
        self.blobs = blobs
        self.model = bootstrap
        self.version = version

    def chunk_refs(self) -> Iterable[ChunkRef]:
        for _, node in iter_nodes(self.root):
            if node.data is not None:
                yield from node.data.chunks


def tree_from_model(mroot: M.Node, blobs: list[BlobRef]) -> Node:
    """Convert a model tree; regular files with the same ``hardlink`` key share one FileData."""
    shared: dict[Hashable, FileData] = {}

    def convert(m: M.Node) -> Node:
        node = Node(name=m.name, mode=m.mode, uid=m.uid, gid=m.gid, mtime=m.mtime,
                    mtime_nsec=m.mtime_nsec, rdev=m.rdev, xattrs=dict(m.xattrs), symlink=m.symlink)
        if m.is_dir:
            node.children = {}
        elif m.is_reg:
            data = shared.get(m.hardlink) if m.hardlink is not None else None
            if data is None:
                try:
                    data = FileData(size=m.size, chunks=[ChunkRef(blobs[c.blob_index], c) for c in m.chunks])
                except IndexError:
                    raise CorruptMetadata("chunk refers to a blob missing from the blob table",
                                          path=m.name.decode(errors="replace")) from None
                if m.hardlink is not None:
                    shared[m.hardlink] = data
            node.data = data
        return node

    root = convert(mroot)
    stack = [(mroot, root)]
    while stack:
        m, node = stack.pop()
        assert node.children is not None
        for mc in m.children:
            child = convert(mc)
            node.children[mc.name] = child
            if mc.is_dir:
                stack.append((mc, child))
    return root


def load_image(path: str | os.PathLike[str], what: str) -> LoadedImage:
    """Read a bootstrap file through the format library.

    Raises BuildError (naming ``what``, e.g. "parent bootstrap") when it is missing or invalid.
    """
    from nydusd.rafs import load_bootstrap  # the reader; imported lazily, it lands after the model

    try:
        sup = load_bootstrap(os.fspath(path))
        model: M.Bootstrap = sup.to_model()
    except OSError as e:
        raise BuildError(f"cannot read {what}: {e.strerror}", path=os.fspath(path)) from None
    except NydusError as e:
        raise BuildError(f"invalid {what}: {e}", path=os.fspath(path)) from None
    blobs = [BlobRef(b) for b in model.blobs]
    return LoadedImage(tree_from_model(model.root, blobs), blobs, model, int(sup.version))


def referenced_blobs(root: Node) -> list[BlobRef]:
    """Blobs referenced by chunks, in order of first reference in §2.8 numbering order
    (a directory's sorted children, then its subdirectories recursively)."""
    seen: dict[int, BlobRef] = {}
    queue = [root]
    while queue:
        d = queue.pop()
        subdirs = []
        for c in d.sorted_children():
            if c.data is not None:
                for ref in c.data.chunks:
                    seen.setdefault(id(ref.blob), ref.blob)
            elif c.is_dir:
                subdirs.append(c)
        queue.extend(reversed(subdirs))
    return list(seen.values())


def assemble_blobs(root: Node, fixed: list[BlobRef]) -> list[BlobRef]:
    """The blob table: ``fixed`` blobs first (a parent's whole table), then every other referenced
    blob in first-reference order."""
    ids = {id(b) for b in fixed}
    return list(fixed) + [b for b in referenced_blobs(root) if id(b) not in ids]


def blob_infos(table: list[BlobRef]) -> list[BlobInfo]:
    """Final BlobInfo list with ``blob_index == position``; every ref must have ``info`` set."""
    out = []
    for i, ref in enumerate(table):
        if ref.info is None:
            raise BuildError("internal: blob table entry without blob info", blob=ref.label)
        out.append(replace(ref.info, blob_index=i))
    return out


def to_model(root: Node, table: list[BlobRef], chunk_size: int, explicit_uidgid: bool = True) -> M.Node:
    """Convert the builder tree into a model tree with final chunk records (uid/gid written as 0
    unless ``explicit_uidgid``, as upstream's ``--repeatable``).

    Raises BuildError if a chunk refers to a blob missing from ``table``.
    """
    index = {id(b): i for i, b in enumerate(table)}
    uses: dict[int, int] = {}
    for _, n in iter_nodes(root):
        if n.data is not None:
            uses[id(n.data)] = uses.get(id(n.data), 0) + 1
    converted: dict[int, list[ChunkInfo]] = {}

    def chunks_of(data: FileData) -> list[ChunkInfo]:
        got = converted.get(id(data))
        if got is None:
            try:
                got = [replace(r.chunk, blob_index=index[id(r.blob)], file_offset=k * chunk_size)
                       for k, r in enumerate(data.chunks)]
            except KeyError:
                raise BuildError("internal: chunk refers to a blob outside the blob table") from None
            converted[id(data)] = got
        return got

    def convert(n: Node) -> M.Node:
        uid, gid = (n.uid, n.gid) if explicit_uidgid else (0, 0)
        m = M.Node(name=n.name, mode=n.mode, uid=uid, gid=gid, mtime=n.mtime,
                   mtime_nsec=n.mtime_nsec, rdev=n.rdev, symlink=n.symlink, xattrs=dict(n.xattrs))
        if n.data is not None:
            m.size = n.data.size
            m.chunks = chunks_of(n.data)
            if uses[id(n.data)] > 1:
                m.hardlink = id(n.data)
        return m

    mroot = convert(root)
    mroot.name = b"/"
    stack = [(root, mroot)]
    while stack:
        n, m = stack.pop()
        for c in n.sorted_children():
            mc = convert(c)
            m.children.append(mc)
            if c.is_dir:
                stack.append((c, mc))
    return mroot
