"""The in-memory RAFS image model: what the writer consumes and what the reader can produce.

Owns: ``Node`` (one directory entry with its inode attributes, its children for directories and its
chunk list for regular files) and ``Bootstrap`` (the root node plus the image-wide settings: blob
table, chunk size, compressor, digester, flags, prefetch list). Version independent: the same model is
written as RAFS v5 or v6 (``nydusd.rafs.writer.write_bootstrap``) and produced back by
``nydusd.rafs.reader`` (``RafsSuper.to_model()``).

Writer entry points (nydusd/rafs/writer.py)::

    write_bootstrap(bootstrap: Bootstrap, out: str | os.PathLike | BinaryIO, *, version: int = 6) -> None
    bootstrap_bytes(bootstrap: Bootstrap, *, version: int = 6) -> bytes     # raises BuildError
    # v6 only: the blob trailer (blob.meta chunk-info array + 4096-byte header, and with_toc: tar
    # headers, blob.digest and ToC) for one blob whose unique chunk payloads occupy [0, data_size):
    blob_trailer(chunks: Sequence[ChunkInfo], *, data_size: int, compressor: Compressor,
                 digester: DigestAlgorithm | None = None, with_toc: bool = True,
                 data_hasher: hashlib.sha256 object over the chunk data = None) -> BlobTrailer
    BlobTrailer.data       -> bytes to append to the blob
    BlobTrailer.blob_id    -> the blob id (§4.1: sha256 of the blob without the blob.digest payload),
                              when data_hasher was given
    BlobTrailer.apply(blob_info) -> BlobInfo with features / ci_* / blob_toc_* (and id) filled in
    (the builder then sets compressed_size = len(data) + len(trailer.data))

Rules a builder follows when filling the model:

* ``Node.name`` is raw bytes (1..255 bytes, no ``/`` nor NUL); the root's name is ``b"/"``.
* ``mode`` is the full ``st_mode`` (type + permission bits). Directories keep ``children`` (any order;
  the writer sorts them by raw name bytes), other types keep it empty.
* ``size`` is the file size for regular files; for symlinks, directories and special files the writer
  derives the on-disk size itself (symlink: ``len(symlink)``), so leave 0.
* ``symlink`` holds the target bytes of a symlink (1..4096 bytes), else ``None``.
* ``rdev`` is ``st_rdev`` in the host encoding (``os.makedev`` compatible); the writer converts to the
  on-disk 32-bit Linux ``new_encode_dev`` form.
* ``nlink`` is derived by the writer (directories: 2 + subdirectories; hardlink groups: group size)
  and filled in by the reader; builders may leave the default.
* Hard links: regular-file nodes sharing the same non-None ``hardlink`` key (e.g. the source
  ``(st_dev, st_ino)``) form one inode; the writer takes attributes and chunks from the first name
  in numbering order. Keys are only compared for equality.
* ``chunks``: the file's chunks in file order; chunk ``i`` covers file bytes
  ``[i*chunk_size, min(size, (i+1)*chunk_size))``; ``file_offset`` must be ``i*chunk_size``;
  ``blob_index`` indexes ``Bootstrap.blobs``. v6 needs 4 KiB-aligned ``uncompressed_offset`` and
  ``index`` = position in the blob's chunk-info array (0,1,2... in blob order).
* ``xattrs``: name -> value bytes (names with prefix user./security./trusted. or exactly
  system.posix_acl_access / system.posix_acl_default).
* ``Bootstrap.prefetch``: absolute paths (bytes, e.g. ``b"/usr/bin"``) to list in the prefetch table.
* v6 blobs must carry the ALIGNED feature bit (``BlobTrailer.apply`` sets it) and at most 254 blobs
  and 2^24 chunks per blob are addressable; the writer raises BuildError otherwise.

Must not import: anything above ``nydusd.storage.chunk`` and the leaf modules.
Threading: plain mutable containers built by one thread; hand them over, don't share while mutating.
"""

from __future__ import annotations

import stat
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field

from nydusd.compress import Compressor
from nydusd.digest import DigestAlgorithm
from nydusd.storage.chunk import BlobInfo, ChunkInfo

DEFAULT_CHUNK_SIZE = 0x100000

# Superblock flag bits (spec §1.3) the model exposes directly; compressor/digester bits are derived.
FLAG_EXPLICIT_UID_GID = 0x10
FLAG_HAS_XATTR = 0x20
FLAG_INLINED_CHUNK_DIGEST = 0x100
FLAG_ENCRYPTION_NONE = 0x0100_0000


class FileTypeMixin:
    """``is_dir`` / ``is_reg`` / ``is_symlink`` from a ``mode`` attribute (shared by the image
    model, the reader's inodes and the builder's tree)."""

    __slots__ = ()
    mode: int

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)


@dataclass(eq=False)
class Node(FileTypeMixin):
    """One directory entry (and its inode attributes). Identity-compared; see module docstring."""

    name: bytes
    mode: int
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    mtime_nsec: int = 0
    rdev: int = 0
    size: int = 0
    nlink: int = 1
    symlink: bytes | None = None
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    children: list[Node] = field(default_factory=list)
    chunks: list[ChunkInfo] = field(default_factory=list)
    hardlink: Hashable | None = None

    def child(self, name: bytes) -> Node | None:
        """The child named ``name`` (linear; for builders and tests, not hot paths)."""
        for c in self.children:
            if c.name == name:
                return c
        return None

    def walk(self, path: bytes = b"/") -> Iterator[tuple[bytes, Node]]:
        """Yield ``(absolute path, node)`` pre-order, children sorted by name."""
        yield path, self
        base = path if path.endswith(b"/") else path + b"/"
        for c in sorted(self.children, key=lambda n: n.name):
            yield from c.walk(base + c.name)


@dataclass
class Bootstrap:
    """A whole image's metadata: the tree plus image-wide settings (one bootstrap file).

    ``blobs[i].blob_index`` must be ``i``. ``explicit_uid_gid`` maps to flag EXPLICIT_UID_GID;
    ``extra_flags`` is OR-ed into the superblock flags (e.g. FLAG_INLINED_CHUNK_DIGEST for v6 images
    whose blobs all carry blob.digest; the writer sets HAS_XATTR / compressor / digester itself).
    """

    root: Node
    blobs: list[BlobInfo] = field(default_factory=list)
    chunk_size: int = DEFAULT_CHUNK_SIZE
    compressor: Compressor = Compressor.ZSTD
    digester: DigestAlgorithm = DigestAlgorithm.BLAKE3
    explicit_uid_gid: bool = True
    extra_flags: int = 0
    prefetch: list[bytes] = field(default_factory=list)

    def walk(self) -> Iterator[tuple[bytes, Node]]:
        return self.root.walk()


def new_root(mode: int = 0o040755, *, uid: int = 0, gid: int = 0, mtime: int = 0,
             mtime_nsec: int = 0) -> Node:
    """A root directory node (name ``/``)."""
    return Node(name=b"/", mode=mode, uid=uid, gid=gid, mtime=mtime, mtime_nsec=mtime_nsec)
