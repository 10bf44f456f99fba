"""RAFS bootstrap writer (v5 and v6) from the in-memory model (work in progress: signatures fixed).

Owns: ``write_bootstrap`` / ``bootstrap_bytes`` (model -> bootstrap bytes) and ``blob_trailer``
(v6 blob.meta + tar headers + blob.digest + ToC appended to a data blob). Must not import fs, daemon,
builder. Threading: pure functions, no shared state.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import BinaryIO

from nydusd.compress import Compressor
from nydusd.digest import DigestAlgorithm
from nydusd.errors import Unsupported
from nydusd.rafs.model import Bootstrap
from nydusd.storage.device import ChunkInfo


def bootstrap_bytes(bootstrap: Bootstrap, *, version: int = 6) -> bytes:
    """Serialise ``bootstrap`` as a RAFS v5 or v6 bootstrap."""
    raise Unsupported("writer not implemented yet", version=version)


def write_bootstrap(bootstrap: Bootstrap, out: str | os.PathLike[str] | BinaryIO, *,
                    version: int = 6) -> None:
    """Write ``bootstrap`` to a path or a binary file object."""
    data = bootstrap_bytes(bootstrap, version=version)
    if isinstance(out, (str, os.PathLike)):
        with open(out, "wb") as f:
            f.write(data)
    else:
        out.write(data)


def blob_trailer(chunks: Sequence[ChunkInfo], *, data_size: int, compressor: Compressor,
                 digester: DigestAlgorithm, with_toc: bool = True) -> object:
    """The v6 blob trailer for a blob whose chunk payloads occupy ``[0, data_size)``."""
    raise Unsupported("blob trailer not implemented yet")
