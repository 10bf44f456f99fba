"""RAFS bootstrap writer entry points: model (``model.Bootstrap``) -> v5 or v6 bootstrap.

Owns: ``write_bootstrap`` / ``bootstrap_bytes`` (dispatch to writer_v5 / writer_v6 after common
checks) and re-exports ``blob_trailer`` / ``BlobTrailer`` (blobmeta.py) for builders.

Must not import fs, daemon, builder. Threading: pure functions; the model is only read.
"""

from __future__ import annotations

import os
from typing import BinaryIO

from nydusd.errors import BuildError
from nydusd.rafs import layout as L
from nydusd.rafs.blobmeta import BlobTrailer, blob_trailer
from nydusd.rafs.model import Bootstrap
from nydusd.rafs.writer_v5 import v5_bytes
from nydusd.rafs.writer_v6 import v6_bytes

__all__ = ["BlobTrailer", "blob_trailer", "bootstrap_bytes", "write_bootstrap"]


# ---- entry points ---------------------------------------------------------------------------------
def bootstrap_bytes(bootstrap: Bootstrap, *, version: int = 6) -> bytes:
    """Serialise ``bootstrap`` as a RAFS v5 or v6 bootstrap. Raises BuildError for an invalid
    model (naming the path) and for more blobs/chunks than the format can address."""
    if not L.is_pow2(bootstrap.chunk_size) or \
            not L.MIN_CHUNK_SIZE <= bootstrap.chunk_size <= L.MAX_CHUNK_SIZE:
        raise BuildError("chunk size must be a power of two in [4 KiB, 16 MiB]",
                         chunk_size=bootstrap.chunk_size)
    for i, b in enumerate(bootstrap.blobs):
        if b.blob_index != i:
            raise BuildError("blob_index must equal the blob's position", blob_id=b.blob_id)
    if version == 5:
        return v5_bytes(bootstrap)
    if version == 6:
        return v6_bytes(bootstrap)
    raise BuildError("unsupported RAFS version", version=version)


def write_bootstrap(bootstrap: Bootstrap, out: str | os.PathLike[str] | BinaryIO, *,
                    version: int = 6) -> None:
    """Write ``bootstrap`` as RAFS ``version`` to a path (atomically: temp file + rename) or to a
    binary file object."""
    data = bootstrap_bytes(bootstrap, version=version)
    if isinstance(out, (str, os.PathLike)):
        tmp = f"{os.fspath(out)}.tmp.{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, out)
    else:
        out.write(data)
