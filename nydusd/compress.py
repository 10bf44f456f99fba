"""Chunk compression: the algorithms of RAFS and their three on-disk encodings.

Owns: ``Compressor`` (none, lz4_block, gzip, zstd) with its superblock flag bit, its v6 blob-table /
blob-meta enum value and its ToC flag; ``compress`` (store-raw rule), ``decompress`` (exact size
check) and ``decompress_into`` (the same into a caller's buffer: bulk readers reuse one buffer
instead of faulting in fresh memory for every chunk; lz4 goes through the system liblz4 via
``ctypes`` when present, because the ``lz4`` package cannot write into a buffer). The only
importer of ``lz4`` and ``zstandard``. Must not import the project beyond ``errors``.
Thread-safe: codecs are created per call (zstd contexts are not shareable across threads) and all
release the GIL while working (``ctypes`` calls too).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import gzip
import threading
import zlib
from typing import Any

import lz4.block
import zstandard

from nydusd.errors import IntegrityError, InvalidArgument

ZSTD_LEVEL = 3  # upstream's level


class Compressor(enum.Enum):
    """A chunk compressor. ``value`` is the upstream name (CLI/JSON spelling)."""

    NONE = "none"
    LZ4_BLOCK = "lz4_block"
    GZIP = "gzip"
    ZSTD = "zstd"

    @property
    def sb_flag(self) -> int:
        return _SB_FLAG[self]

    @property
    def algo(self) -> int:
        """The enum value of the v6 blob table ``compression_algo`` and blob-meta ``ci_compressor``."""
        return _ALGO[self]

    @property
    def toc_flag(self) -> int:
        return _TOC_FLAG[self]

    @classmethod
    def parse(cls, name: str) -> Compressor:
        """From a CLI/config spelling. Raises InvalidArgument for an unknown name."""
        try:
            return cls(name.lower())
        except ValueError:
            raise InvalidArgument(f"unknown compressor {name!r}, expected one of "
                                  + ", ".join(c.value for c in cls)) from None

    @classmethod
    def from_algo(cls, value: int) -> Compressor:
        """From the v6 enum value; raises ValueError for an unknown one (callers add context)."""
        for c, v in _ALGO.items():
            if v == value:
                return c
        raise ValueError(f"unknown compression algorithm {value}")

    @classmethod
    def from_sb_flags(cls, flags: int) -> Compressor:
        """Superblock flags -> compressor: the first of NONE, LZ4, GZIP, ZSTD set wins; default lz4."""
        for c in (cls.NONE, cls.LZ4_BLOCK, cls.GZIP, cls.ZSTD):
            if flags & c.sb_flag:
                return c
        return cls.LZ4_BLOCK


_SB_FLAG = {Compressor.NONE: 0x01, Compressor.LZ4_BLOCK: 0x02, Compressor.GZIP: 0x40,
            Compressor.ZSTD: 0x80}
_ALGO = {Compressor.NONE: 0, Compressor.LZ4_BLOCK: 1, Compressor.GZIP: 2, Compressor.ZSTD: 3}
_TOC_FLAG = {Compressor.NONE: 0x1, Compressor.ZSTD: 0x2, Compressor.LZ4_BLOCK: 0x4, Compressor.GZIP: 0}


def compress(data: bytes | memoryview, algo: Compressor) -> tuple[bytes, bool]:
    """Compress one chunk. Returns ``(payload, compressed)``.

    Store-raw rule: when compression does not make the data strictly smaller (or the input is
    empty, or ``algo`` is NONE) the raw bytes come back with ``compressed=False``.
    """
    raw = bytes(data)
    if algo is Compressor.NONE or not raw:
        return raw, False
    if algo is Compressor.LZ4_BLOCK:
        out = lz4.block.compress(raw, store_size=False)
    elif algo is Compressor.ZSTD:
        out = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(raw)
    else:
        out = gzip.compress(raw, mtime=0)
    if len(out) >= len(raw):
        return raw, False
    return out, True


def whole_bytes(data: bytes | memoryview) -> bytes:
    """``bytes(data)`` without the copy when ``data`` is a view of a whole bytes object (a
    single-chunk backend response)."""
    if isinstance(data, memoryview) and isinstance(data.obj, bytes) and data.nbytes == len(data.obj):
        return data.obj
    return bytes(data)


def decompress(data: bytes | memoryview, algo: Compressor, size: int) -> bytes:
    """Decompress one chunk payload to exactly ``size`` bytes.

    Raises IntegrityError when the payload is not valid for ``algo`` or yields another size.
    """
    out: bytes
    try:
        # the decoders take any buffer: no copy of the payload first
        if algo is Compressor.LZ4_BLOCK:
            out = lz4.block.decompress(data, uncompressed_size=size)
        elif algo is Compressor.ZSTD:
            out = zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
        elif algo is Compressor.GZIP:
            out = zlib.decompress(data, wbits=31)
        else:
            out = whole_bytes(data)
    except (lz4.block.LZ4BlockError, zstandard.ZstdError, zlib.error, ValueError) as e:
        raise IntegrityError(f"chunk does not decompress with {algo.value}: {e}") from None
    if len(out) != size:
        raise IntegrityError(f"chunk decompressed to {len(out)} bytes, expected {size}",
                             compressor=algo.value)
    return out


def _load_liblz4() -> Any:
    """``LZ4_decompress_safe`` of the system liblz4, or None (then ``decompress_into`` copies)."""
    name = ctypes.util.find_library("lz4")
    if not name:
        return None
    try:
        fn = ctypes.CDLL(name).LZ4_decompress_safe
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int)
    return fn


_LZ4_DECOMPRESS_SAFE = _load_liblz4()


def _load_libzstd() -> Any:
    """The system libzstd with the prototypes ``decompress_into`` uses, or None. Used because
    ``zstandard`` decodes chunks of concurrent prefetch streams one at a time (and allocates a
    fresh context per call); ``ctypes`` calls release the GIL and each thread keeps one context."""
    name = ctypes.util.find_library("zstd")
    if not name:
        return None
    try:
        lib = ctypes.CDLL(name)
        lib.ZSTD_createDCtx.restype = ctypes.c_void_p
        lib.ZSTD_createDCtx.argtypes = ()
        lib.ZSTD_freeDCtx.restype = ctypes.c_size_t
        lib.ZSTD_freeDCtx.argtypes = (ctypes.c_void_p,)
        lib.ZSTD_decompressDCtx.restype = ctypes.c_size_t
        lib.ZSTD_decompressDCtx.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                            ctypes.c_void_p, ctypes.c_size_t)
        lib.ZSTD_isError.restype = ctypes.c_uint
        lib.ZSTD_isError.argtypes = (ctypes.c_size_t,)
    except (OSError, AttributeError):
        return None
    return lib


_ZSTD = _load_libzstd()
_tls = threading.local()


class _ZstdContext:
    """One thread's libzstd decompression context, freed with the thread's locals."""

    def __init__(self) -> None:
        self.ptr = _ZSTD.ZSTD_createDCtx()
        if not self.ptr:
            raise MemoryError("ZSTD_createDCtx failed")

    def __del__(self) -> None:
        if self.ptr and _ZSTD is not None:
            _ZSTD.ZSTD_freeDCtx(self.ptr)
            self.ptr = None


def _zstd_context() -> Any:
    ctx = getattr(_tls, "zstd", None)
    if ctx is None:
        ctx = _tls.zstd = _ZstdContext()
    return ctx.ptr


def _address(buf: bytes | memoryview | bytearray, writable: bool) -> tuple[Any, int]:
    """A ctypes object over ``buf`` (kept alive by the caller) and its address."""
    if isinstance(buf, bytes):
        holder: Any = ctypes.c_char_p(buf)
        return holder, ctypes.cast(holder, ctypes.c_void_p).value or 0
    if not writable and isinstance(buf, memoryview) and buf.readonly:
        raw = bytes(buf)
        return _address(raw, False)
    holder = (ctypes.c_char * len(buf)).from_buffer(buf)
    return holder, ctypes.addressof(holder)


def decompress_into(data: bytes | memoryview, algo: Compressor, out: memoryview) -> None:
    """Decompress one chunk payload into ``out``, which must come out exactly full (its length is
    the chunk's uncompressed size). ``out`` must be writable and contiguous.

    Raises IntegrityError when the payload is not valid for ``algo`` or yields another size.
    """
    size = len(out)
    if algo is Compressor.LZ4_BLOCK and _LZ4_DECOMPRESS_SAFE is not None and 0 < size < 1 << 31:
        src_ref, src = _address(data, False)
        dst_ref, dst = _address(out, True)
        # capacity ``size``: a payload yielding more fails (negative result) instead of overflowing
        got = _LZ4_DECOMPRESS_SAFE(src, dst, len(data), size)
        del src_ref, dst_ref
        if got != size:
            raise IntegrityError(f"chunk does not decompress with lz4_block to {size} bytes (got {got})",
                                 compressor=algo.value)
        return
    if algo is Compressor.ZSTD and _ZSTD is not None and size > 0:
        src_ref, src = _address(data, False)
        dst_ref, dst = _address(out, True)
        got = _ZSTD.ZSTD_decompressDCtx(_zstd_context(), dst, size, src, len(data))
        del src_ref, dst_ref
        if _ZSTD.ZSTD_isError(got) or got != size:
            raise IntegrityError(f"chunk does not decompress with zstd to {size} bytes",
                                 compressor=algo.value)
        return
    if algo is Compressor.ZSTD:
        try:
            reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=False)
            pos = 0
            while pos < size:
                n = reader.readinto(out[pos:])
                if not n:
                    break
                pos += n
            extra = reader.read(1) if pos == size else b""
        except (zstandard.ZstdError, ValueError) as e:
            raise IntegrityError(f"chunk does not decompress with zstd: {e}") from None
        if pos != size or extra:
            raise IntegrityError(f"chunk decompressed to {'more than ' if extra else ''}{pos} bytes, "
                                 f"expected {size}", compressor=algo.value)
        return
    out[:] = decompress(data, algo, size)


def stream_decompressor(name: str):  # type: ignore[no-untyped-def]
    """A zstandard stream reader factory for whole tar layers (``zstd``); gzip callers use gzip."""
    if name != "zstd":
        raise InvalidArgument(f"no stream decompressor for {name!r}")
    return zstandard.ZstdDecompressor()
