"""RAFS metadata: bootstrap bytes <-> objects (v5 and v6). Public API (stable for daemon/builder).

Reading::

    load_bootstrap(path | bytes) -> RafsSuper        # mmap, lazy; raises NotFound / CorruptMetadata
    load_from_blob(path) -> RafsSuper                # bootstrap inlined in a data blob (image.boot)
    load_image(path) -> RafsSuper                    # a bootstrap, else a blob with an inlined one
    check_servable(sb)                               # Unsupported naming a feature we cannot read
    RafsSuper attributes: version (5|6), root_ino, blobs: list[BlobInfo], chunk_size, compressor,
        digester, flags, inode_count, explicit_uid_gid, has_xattr, source
    RafsSuper methods (thread-safe, no shared cursor; every one may raise CorruptMetadata):
        get_inode(ino) -> Inode                       # NotFound if out of range
        lookup(parent_ino, name: bytes) -> Inode      # NotFound; "." and ".." work
        iter_dir(ino, offset=0) -> Iterator[(name, ino, next_offset)]   # includes "." and ".."
        children(ino) -> Iterator[(name, ino)]        # without "." and ".."
        readlink(ino) -> bytes ; xattrs(ino) -> dict[bytes, bytes]
        chunks(ino) -> list[ChunkInfo]                # file order, file_offset = i * chunk_size
        prefetch_inodes() -> list[int]
        resolve(path) -> Inode ; path_of(ino) -> bytes ; walk() -> Iterator[(path, Inode)]
        walk_depth_first() -> Iterator[(path, Inode)]  # each dir followed by its subtree (unpack)
        to_model() -> model.Bootstrap ; close() / context manager
    Inode (frozen): ino, mode, uid, gid, size, nlink, rdev (host dev_t), mtime, mtime_nsec, blocks,
        has_xattr, is_dir / is_reg / is_symlink (other fields are decoder internals)
    Inode numbers: v5 = the record's i_ino (root 1; hardlink names share it); v6 = nid (root 128
    in upstream images; hardlinks share the nid).

File data: ``nydusd.rafs.content`` (LocalBlobs: read chunks/files from local blob files).
Tools: ``nydusd.rafs.stats`` (check_image, image_stats), ``nydusd.rafs.unpack`` (write_tar).
Writing: ``nydusd.rafs.model`` (Node, Bootstrap) + ``nydusd.rafs.writer`` (write_bootstrap,
bootstrap_bytes, blob_trailer). Blob trailers / ToC / inlined bootstrap: ``nydusd.rafs.blobmeta``.

Must not import fs, daemon, builder, cli (rafs sits above storage.chunk and the leaf modules).
"""

from __future__ import annotations

from nydusd.rafs.model import Bootstrap, Node
from nydusd.rafs.rafs_super import Inode, RafsSuper
from nydusd.rafs.reader import (
    check_servable,
    detect_version,
    load_bootstrap,
    load_from_blob,
    load_image,
    open_buffer,
)

__all__ = ["Bootstrap", "Inode", "Node", "RafsSuper", "check_servable", "detect_version", "load_bootstrap",
           "load_from_blob", "load_image", "open_buffer"]
