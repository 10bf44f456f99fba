"""Opening bootstraps: version detection and memory mapping.

Owns: ``load_bootstrap(path | bytes) -> RafsSuper`` (v5 or v6, chosen by the magic numbers),
``detect_version``, ``load_from_blob`` / ``load_image`` (a bootstrap inlined in a data blob) and
``check_servable`` (refuses, naming them, the image features whose data this implementation cannot
read: ZRAN, BATCH, ENCRYPTED, SEPARATE, TARFS -- upstream serves them, we would only fail on the
first read). The file is mapped read-only with ``mmap`` (nothing is read eagerly beyond the
superblocks and tables); bytes are used in place.

Must not import fs, daemon, builder. Threading: the returned RafsSuper is shareable (rafs_super.py).
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from typing import Any

from nydusd.errors import CorruptMetadata, InvalidArgument, NotFound, Unsupported
from nydusd.log import get_logger
from nydusd.rafs import layout as L
from nydusd.rafs.rafs_super import RafsSuper
from nydusd.rafs.v5 import RafsV5Super
from nydusd.rafs.v6 import RafsV6Super

log = get_logger(__name__)


#: blob features (spec §1.4) whose data cannot be read here, with what they mean
UNSUPPORTED_BLOB_FEATURES = (
    (L.BLOB_ZRAN, "ZRAN", "chunks live in an external gzip stream (an OCI-ref/targz-ref image)"),
    (L.BLOB_BATCH, "BATCH", "small chunks are packed into compressed batches"),
    (L.BLOB_ENCRYPTED, "ENCRYPTED", "chunk data is encrypted"),
    (L.BLOB_SEPARATE, "SEPARATE", "chunk data and blob meta live in separate objects"),
    (L.BLOB_TARFS, "TARFS", "the blob is a raw tar (tarfs)"),
)


def check_servable(sb: RafsSuper) -> None:
    """Raise Unsupported, naming the feature, when ``sb``'s file data cannot be read here."""
    if sb.flags & L.SB_ENCRYPTION_AES_128_XTS:
        raise Unsupported("image uses unsupported feature ENCRYPTED (superblock "
                          "ENCRYPTION_AES_128_XTS): chunk data is encrypted", feature="ENCRYPTED",
                          source=sb.source)
    for blob in sb.blobs:
        found = [(name, why) for bit, name, why in UNSUPPORTED_BLOB_FEATURES if blob.features & bit]
        if found:
            names = ", ".join(name for name, _ in found)
            raise Unsupported(f"image uses unsupported blob feature {names}: {found[0][1]}",
                              feature=names, blob_id=blob.blob_id, features=hex(blob.features))


def detect_version(buf: Any) -> int:
    """5 or 6 from the magic numbers; raises CorruptMetadata for anything else."""
    if len(buf) >= 8 and struct.unpack_from("<I", buf, 0)[0] == L.V5_MAGIC:
        return 5
    if len(buf) >= L.EROFS_SB_OFFSET + 4 and \
            struct.unpack_from("<I", buf, L.EROFS_SB_OFFSET)[0] == L.EROFS_MAGIC:
        return 6
    raise CorruptMetadata("not a RAFS bootstrap (no v5 or v6 magic)", offset=0, field="magic",
                          size=len(buf))


def open_buffer(buf: Any, source: str = "<bytes>") -> RafsSuper:
    """A RafsSuper over an in-memory buffer (bytes, bytearray or mmap)."""
    version = detect_version(buf)
    cls = RafsV5Super if version == 5 else RafsV6Super
    return cls(buf, source)


def _open_readonly(path: str, what: str) -> int:
    """A read-only descriptor of ``path``. Raises NotFound if missing, InvalidArgument otherwise."""
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise NotFound(f"{what} not found", path=path) from None
    except OSError as e:
        raise InvalidArgument(f"cannot open {what}: {e.strerror}", path=path) from None


def load_bootstrap(src: str | os.PathLike[str] | bytes | bytearray | memoryview) -> RafsSuper:
    """Open a bootstrap file (mapped) or buffer. Raises NotFound for a missing file,
    InvalidArgument for one that cannot be opened or is not a regular file, and CorruptMetadata
    for anything that is not a valid RAFS v5/v6 bootstrap."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return open_buffer(bytes(src))
    path = os.fspath(src)
    fd = _open_readonly(path, "bootstrap")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument("bootstrap is not a regular file", path=path)
        if st.st_size == 0:
            raise CorruptMetadata("empty bootstrap", offset=0, field="file_size", path=path)
        buf = mmap.mmap(fd, st.st_size, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    try:
        sb = open_buffer(buf, path)
    except BaseException:
        buf.close()
        raise
    log.debug("bootstrap_loaded", path=path, version=sb.version, inodes=sb.inode_count,
              blobs=len(sb.blobs))
    return sb


def load_from_blob(path: str | os.PathLike[str]) -> RafsSuper:
    """Open the bootstrap inlined in data blob ``path`` (§4.6). Blob entries with INLINED_FS_META,
    or without CAP_TAR_TOC, get the blob file's own name (extensions stripped) as id.
    Raises NotFound / InvalidArgument / CorruptMetadata."""
    from dataclasses import replace

    from nydusd.rafs.blobmeta import extract_inlined_bootstrap

    path = os.fspath(path)
    fd = _open_readonly(path, "blob")
    try:
        size = os.fstat(fd).st_size
        data = extract_inlined_bootstrap(lambda off, n: os.pread(fd, n, off), size)
    except OSError as e:
        raise InvalidArgument(f"cannot read blob: {e.strerror}", path=path) from None
    finally:
        os.close(fd)
    sb = open_buffer(data, path)
    own_id = os.path.basename(path).split(".")[0]
    sb.blobs = [replace(b, blob_id=own_id)
                if b.features & L.BLOB_INLINED_FS_META or not b.features & L.BLOB_CAP_TAR_TOC else b
                for b in sb.blobs]
    return sb


def load_image(path: str | os.PathLike[str]) -> RafsSuper:
    """``load_bootstrap``, falling back to ``load_from_blob`` for a file without bootstrap magic."""
    try:
        return load_bootstrap(path)
    except CorruptMetadata as e:
        if getattr(e, "field", None) != "magic":
            raise
        try:
            return load_from_blob(path)
        except CorruptMetadata:
            raise e from None
