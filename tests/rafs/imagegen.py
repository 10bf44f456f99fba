"""Test helper: turn a small file-tree description into a real image with the project's writer.

``Spec`` describes a tree with file contents; ``build_image`` chunks, deduplicates and compresses
the content into one data blob (4 KiB-aligned uncompressed offsets, v6 trailer with ToC), fills a
``model.Bootstrap`` and serialises it as v5 or v6. ``expected_dump`` / ``dump_image`` give the
comparable {path: attributes} views of a spec and of a loaded image.
"""

from __future__ import annotations

import hashlib
import stat
from dataclasses import dataclass, field, replace

from nydusd.compress import Compressor, compress
from nydusd.digest import DigestAlgorithm
from nydusd.rafs import RafsSuper
from nydusd.rafs.blobmeta import blob_trailer
from nydusd.rafs.content import read_file
from nydusd.rafs.model import Bootstrap, Node
from nydusd.rafs.writer import bootstrap_bytes
from nydusd.storage.chunk import CHUNK_FLAG_COMPRESSED, BlobInfo, ChunkInfo


@dataclass
class Spec:
    """kind: dir | file | symlink | chr | blk | fifo | link (hard link to ``target`` path)."""

    kind: str
    perm: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = 1_700_000_000
    nsec: int = 0
    data: bytes = b""
    target: bytes = b""
    rdev: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    children: dict[bytes, Spec] = field(default_factory=dict)

    @property
    def mode(self) -> int:
        fmt = {"dir": stat.S_IFDIR, "file": stat.S_IFREG, "symlink": stat.S_IFLNK, "chr": stat.S_IFCHR,
               "blk": stat.S_IFBLK, "fifo": stat.S_IFIFO}[self.kind]
        return fmt | (0o777 if self.kind == "symlink" else self.perm)


@dataclass
class Image:
    bootstrap: bytes
    blob: bytes
    blob_id: str
    raw_device: bytes  # uncompressed chunk data at uncompressed offsets (EROFS device view)
    model: Bootstrap


class _Blob:
    def __init__(self, compressor: Compressor, digester: DigestAlgorithm) -> None:
        self.data = bytearray()
        self.raw = bytearray()
        self.chunks: dict[bytes, ChunkInfo] = {}
        self.compressor, self.digester = compressor, digester

    def add(self, piece: bytes, file_offset: int) -> ChunkInfo:
        digest = self.digester.hash(piece)
        c = self.chunks.get(digest)
        if c is None:
            payload, compressed = compress(piece, self.compressor)
            uoff = -(-len(self.raw) // 4096) * 4096
            self.raw += bytes(uoff - len(self.raw)) + piece
            c = ChunkInfo(digest=digest, blob_index=0, flags=CHUNK_FLAG_COMPRESSED if compressed else 0,
                          compressed_size=len(payload), uncompressed_size=len(piece),
                          compressed_offset=len(self.data), uncompressed_offset=uoff, file_offset=0,
                          index=len(self.chunks))
            self.chunks[digest] = c
            self.data += payload
        return replace(c, file_offset=file_offset)


def _to_nodes(spec: Spec, name: bytes, blob: _Blob, chunk_size: int, path: bytes,
              links: dict[bytes, Node], pending: list[tuple[Node, bytes, bytes]]) -> Node:
    node = Node(name=name, mode=spec.mode, uid=spec.uid, gid=spec.gid, mtime=spec.mtime,
                mtime_nsec=spec.nsec, rdev=spec.rdev, xattrs=dict(spec.xattrs))
    if spec.kind == "dir":
        for cname in sorted(spec.children):
            child = spec.children[cname]
            cpath = path.rstrip(b"/") + b"/" + cname
            if child.kind == "link":
                pending.append((node, cname, child.target))
            else:
                node.children.append(_to_nodes(child, cname, blob, chunk_size, cpath, links, pending))
    elif spec.kind == "file":
        node.size = len(spec.data)
        node.chunks = [blob.add(spec.data[i:i + chunk_size], i) for i in range(0, len(spec.data), chunk_size)]
        node.hardlink = path
        links[path] = node
    elif spec.kind == "symlink":
        node.symlink = spec.target
    return node


def _tree(root: Spec, blob: _Blob, chunk_size: int) -> Node:
    links: dict[bytes, Node] = {}
    pending: list[tuple[Node, bytes, bytes]] = []
    tree = _to_nodes(root, b"/", blob, chunk_size, b"/", links, pending)
    for parent, name, target in pending:
        first = links[target]
        parent.children.append(Node(name=name, mode=first.mode, uid=first.uid, gid=first.gid,
                                    mtime=first.mtime, mtime_nsec=first.mtime_nsec, size=first.size,
                                    xattrs=first.xattrs, chunks=first.chunks, hardlink=first.hardlink))
    return tree


def build_image(root: Spec, *, version: int = 6, compressor: Compressor = Compressor.ZSTD,
                digester: DigestAlgorithm = DigestAlgorithm.BLAKE3, chunk_size: int = 0x1000,
                with_toc: bool = True) -> Image:
    """Build ``root`` into a bootstrap + one data blob ("link" specs name their target's path)."""
    blob = _Blob(compressor, digester)
    tree = _tree(root, blob, chunk_size)
    chunks = sorted(blob.chunks.values(), key=lambda c: c.index)
    data = bytes(blob.data)
    h = hashlib.sha256(data)
    info = BlobInfo(blob_id=h.hexdigest(), blob_index=0, compressor=compressor, digester=digester,
                    chunk_size=chunk_size, chunk_count=len(chunks), compressed_size=len(data),
                    uncompressed_size=-(-len(blob.raw) // 4096) * 4096)
    if version == 6:
        trailer = blob_trailer(chunks, data_size=len(data), compressor=compressor, digester=digester,
                               with_toc=with_toc, data_hasher=h)
        data += trailer.data
        info = trailer.apply(info)
        info = replace(info, compressed_size=len(data))
    blob_id = info.blob_id
    model = Bootstrap(root=tree, blobs=[info], chunk_size=chunk_size, compressor=compressor,
                      digester=digester)
    raw = bytes(blob.raw).ljust(info.uncompressed_size, b"\0") or bytes(4096)
    return Image(bootstrap_bytes(model, version=version), data, blob_id, raw, model)


def _normalise(d: dict[bytes, tuple[object, ...]]) -> dict[bytes, tuple[object, ...]]:
    """Replace each entry's link-group key by (smallest path of the group, nlink)."""
    members: dict[object, list[bytes]] = {}
    for path, t in d.items():
        if t[-1] is not None:
            members.setdefault(t[-1], []).append(path)
    subdirs: dict[bytes, int] = {}
    for path, t in d.items():
        if stat.S_ISDIR(t[0]) and path != b"/":  # type: ignore[arg-type]
            parent = path.rsplit(b"/", 1)[0] or b"/"
            subdirs[parent] = subdirs.get(parent, 0) + 1
    out = {}
    for path, t in d.items():
        if t[-1] is not None:
            group = members[t[-1]]
            key: object = (min(group), len(group))
        elif stat.S_ISDIR(t[0]):  # type: ignore[arg-type]
            key = 2 + subdirs.get(path, 0)
        else:
            key = 1
        out[path] = t[:-1] + (key,)
    return out


def expected_dump(root: Spec, *, with_mtime: bool = True) -> dict[bytes, tuple[object, ...]]:
    """{path: (mode, uid, gid, mtime, nsec, rdev, size, target, xattrs, md5, (group, nlink))}."""
    out: dict[bytes, tuple[object, ...]] = {}

    links: list[tuple[bytes, bytes]] = []

    def visit(spec: Spec, path: bytes) -> None:
        if spec.kind == "link":
            links.append((path, spec.target))
            return
        md5 = hashlib.md5(spec.data).hexdigest() if spec.kind == "file" else None
        size = len(spec.data) if spec.kind == "file" else 0
        rdev = spec.rdev if spec.kind in ("chr", "blk") else 0
        out[path] = (spec.mode, spec.uid, spec.gid, spec.mtime if with_mtime else 0,
                     spec.nsec if with_mtime else 0, rdev, size, spec.target or None,
                     tuple(sorted(spec.xattrs.items())), md5, path if spec.kind == "file" else None)
        for name in sorted(spec.children):
            visit(spec.children[name], path.rstrip(b"/") + b"/" + name)

    visit(root, b"/")
    for path, target in links:
        out[path] = out[target]
    return _normalise(out)


def dump_image(sb: RafsSuper, source: object, *, with_mtime: bool = True) -> dict[bytes, tuple[object, ...]]:
    """The same view of a loaded image; file content read (and verified) through ``source``."""
    out: dict[bytes, tuple[object, ...]] = {}
    nlinks: dict[bytes, int] = {}
    first: dict[int, bytes] = {}
    for path, inode in sb.walk():
        md5 = group = None
        if inode.is_reg:
            group = first.setdefault(inode.ino, path)
            md5 = hashlib.md5(read_file(sb, inode.ino, source)).hexdigest()  # type: ignore[arg-type]
        out[path] = (inode.mode, inode.uid, inode.gid, inode.mtime if with_mtime else 0,
                     inode.mtime_nsec if with_mtime else 0, inode.rdev,
                     inode.size if inode.is_reg else 0,
                     sb.readlink(inode.ino) if inode.is_symlink else None,
                     tuple(sorted(sb.xattrs(inode.ino).items())), md5, group)
        nlinks[path] = inode.nlink
    norm = _normalise(out)
    for path, t in norm.items():  # the image's own nlink must agree with the structure
        want = t[-1][1] if isinstance(t[-1], tuple) else t[-1]
        assert nlinks[path] == want, (path, nlinks[path], want)
    return norm
