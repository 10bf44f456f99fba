"""Digests: the RAFS digesters (BLAKE3, SHA-256) and hex helpers.

Owns: ``DigestAlgorithm`` with its superblock flag and v6 enum value, ``hash_bytes`` and an
incremental ``hasher``. The only importer of ``blake3``. Must not import the project beyond ``errors``.
Thread-safe; hashlib and blake3 release the GIL on large inputs.
"""

from __future__ import annotations

import enum
import hashlib
from typing import NewType, Protocol

import blake3

from nydusd.errors import InvalidArgument

ChunkDigest = NewType("ChunkDigest", bytes)
BlobId = NewType("BlobId", str)
DIGEST_SIZE = 32


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> object: ...
    def digest(self) -> bytes: ...
    def hexdigest(self) -> str: ...


class DigestAlgorithm(enum.Enum):
    BLAKE3 = "blake3"
    SHA256 = "sha256"

    @property
    def sb_flag(self) -> int:
        return 0x04 if self is DigestAlgorithm.BLAKE3 else 0x08

    @property
    def algo(self) -> int:
        """The v6 blob-table ``digest_algo`` enum value."""
        return 0 if self is DigestAlgorithm.BLAKE3 else 1

    @classmethod
    def parse(cls, name: str) -> DigestAlgorithm:
        try:
            return cls(name.lower())
        except ValueError:
            raise InvalidArgument(f"unknown digester {name!r}, expected blake3 or sha256") from None

    @classmethod
    def from_algo(cls, value: int) -> DigestAlgorithm:
        if value == 0:
            return cls.BLAKE3
        if value == 1:
            return cls.SHA256
        raise ValueError(f"unknown digest algorithm {value}")

    @classmethod
    def from_sb_flags(cls, flags: int) -> DigestAlgorithm:
        """BLAKE3 if bit 0x04, else SHA-256 if bit 0x08, else BLAKE3 (spec §1.1)."""
        if flags & 0x04:
            return cls.BLAKE3
        if flags & 0x08:
            return cls.SHA256
        return cls.BLAKE3

    def hasher(self) -> Hasher:
        if self is DigestAlgorithm.BLAKE3:
            return blake3.blake3(max_threads=1)
        return hashlib.sha256()

    def hash(self, data: bytes | memoryview) -> ChunkDigest:
        h = self.hasher()
        h.update(data)
        return ChunkDigest(h.digest())


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()
