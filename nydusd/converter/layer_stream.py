"""Layer streams: turn a registry blob (gzip / zstd / plain tar) into an uncompressed tar stream
without touching the disk, verifying both digests on the way.

Owns: ``HashingReader`` (sha256 + byte count of whatever passes through), ``LayerStream`` (compressed
digest -> decompressor -> uncompressed digest (diff_id); ``finish()`` drains the tail and raises
IntegrityError on a digest mismatch), ``sniff_compression`` and ``safe_member_name`` (the path rules a
layer entry must obey). Must not import requests (the raw stream is any file-like object) nor the
builder. Threading: one stream per thread; nothing is shared.
"""

from __future__ import annotations

import gzip
import hashlib
import posixpath
import zlib
from typing import IO, Any

from nydusd.compress import stream_decompressor
from nydusd.errors import BuildError, IntegrityError, Unsupported

READ_SIZE = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class HashingReader:
    """A read-only file object that hashes (sha256) and counts every byte read through it."""

    def __init__(self, raw: IO[bytes] | Any, *, prefix: bytes = b"") -> None:
        self._raw = raw
        self._prefix = prefix
        self.sha256 = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        if self._prefix:
            if n is None or n < 0:
                data = self._prefix + self._raw.read()
                self._prefix = b""
            else:
                data, self._prefix = self._prefix[:n], self._prefix[n:]
        else:
            data = self._raw.read() if n is None or n < 0 else self._raw.read(n)
        self.sha256.update(data)
        self.size += len(data)
        return data

    def readinto(self, buf: bytearray | memoryview) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def drain(self) -> None:
        while self.read(READ_SIZE):
            pass

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha256.hexdigest()


def sniff_compression(head: bytes) -> str:
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "none"


class _GzipReader:
    """Streaming multi-member gzip decoder over a file object (GzipFile would seek for the trailer)."""

    def __init__(self, raw: HashingReader) -> None:
        self._raw = raw
        self._z = zlib.decompressobj(wbits=31)
        self._buf = b""
        self._eof = False

    def read(self, n: int = -1) -> bytes:
        want = READ_SIZE if n is None or n < 0 else n
        try:
            while len(self._buf) < want and not self._eof:
                data = self._z.unconsumed_tail or self._raw.read(READ_SIZE)
                if not data and not self._z.unused_data:
                    if not self._z.eof:
                        raise IntegrityError("gzip layer stream is truncated")
                    self._eof = True
                    break
                if self._z.eof:  # next gzip member (concatenated streams are legal)
                    rest = self._z.unused_data + data
                    self._z = zlib.decompressobj(wbits=31)
                    if not rest.strip(b"\0"):
                        continue
                    data = rest
                self._buf += self._z.decompress(data, READ_SIZE)
        except zlib.error as e:
            raise IntegrityError(f"layer is not valid gzip: {e}") from None
        out, self._buf = self._buf[:want], self._buf[want:]
        return out

    def readable(self) -> bool:
        return True


class LayerStream:
    """The uncompressed tar of one layer, read from ``raw`` (the registry blob stream).

    ``expected_digest``/``expected_diff_id`` (``sha256:...``) are checked by ``finish()``, which must
    be called once the consumer is done with the tar: it reads the rest of the stream (tar end
    padding, compression trailer) so that both digests cover every byte. Raises IntegrityError on a
    mismatch or a corrupt compression stream, Unsupported for an unknown compression name.
    """

    def __init__(self, raw: IO[bytes] | Any, compression: str | None = None, *,
                 expected_digest: str | None = None, expected_diff_id: str | None = None) -> None:
        head = raw.read(4)
        self.compressed = HashingReader(raw, prefix=head)
        # A media type may lie (a "tar+gzip" that is plain, a "tar" that is gzip): the magic bytes
        # decide; the media type only matters for an empty stream. Digests catch real corruption.
        comp = sniff_compression(head) if head else (compression or "none")
        self.compression = comp
        self.expected_digest = expected_digest
        self.expected_diff_id = expected_diff_id
        if comp == "gzip":
            inner: Any = _GzipReader(self.compressed)
        elif comp == "zstd":
            inner = stream_decompressor("zstd").stream_reader(self.compressed, read_size=READ_SIZE)
        elif comp == "none":
            inner = self.compressed
        else:
            raise Unsupported(f"unsupported layer compression {comp!r}")
        self._inner = inner
        self.uncompressed = HashingReader(inner) if comp != "none" else self.compressed

    def read(self, n: int = -1) -> bytes:
        try:
            return self.uncompressed.read(n)
        except IntegrityError:
            raise
        except (zlib.error, OSError, EOFError, gzip.BadGzipFile) as e:
            raise IntegrityError(f"layer stream is corrupt: {e}", digest=self.expected_digest) from None
        except Exception as e:  # zstandard.ZstdError lives in compress.py's library only
            if type(e).__name__ == "ZstdError":
                raise IntegrityError(f"layer is not valid zstd: {e}",
                                     digest=self.expected_digest) from None
            raise

    def readable(self) -> bool:
        return True

    def finish(self) -> tuple[str, str]:
        """Drain, verify and return ``(compressed digest, diff_id)``."""
        while self.read(READ_SIZE):
            pass
        self.compressed.drain()
        digest = self.compressed.digest
        diff_id = self.uncompressed.digest
        if self.expected_digest and digest != self.expected_digest:
            raise IntegrityError("layer digest mismatch", expected=self.expected_digest, actual=digest)
        if self.expected_diff_id and diff_id != self.expected_diff_id:
            raise IntegrityError("layer diff_id mismatch", expected=self.expected_diff_id, actual=diff_id)
        return digest, diff_id

    @property
    def bytes_in(self) -> int:
        return self.compressed.size

    @property
    def bytes_out(self) -> int:
        return self.uncompressed.size


def safe_member_name(name: str) -> str:
    """Normalise a tar entry name to a path relative to the root ('' for the root itself).

    Raises BuildError for a name that leaves the root (``..`` components after normalisation)."""
    out: list[str] = []
    for p in name.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            if not out:
                raise BuildError("layer entry escapes the image root", path=name)
            out.pop()
        else:
            out.append(p)
    return posixpath.join(*out) if out else ""


def safe_link_target(member: str, target: str, *, hard: bool) -> str:
    """Check a link target. Hard links name another entry of the image and must stay inside the
    root; symlinks may point anywhere (they are resolved inside the container at run time), but an
    absolute path or a ``..`` chain is fine only as a symlink. Returns the normalised target."""
    if hard:
        return safe_member_name(target)
    if "\0" in target:
        raise BuildError("symlink target contains NUL", path=member)
    return target
