"""Fuzz-style robustness: thousands of mutated / truncated bootstraps (upstream fixtures and a richer
generated v5/v6 image) are opened and fully exercised. The only exceptions allowed out of the
format library are CorruptMetadata and Unsupported naming a feature (a flipped TARFS_MODE bit),
and every case finishes within a time bound (no hangs)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from nydusd.errors import CorruptMetadata, Unsupported
from nydusd.rafs import load_bootstrap
from nydusd.rafs.blobmeta import decode_ci_array, parse_meta_header, parse_toc, tar_segments
from nydusd.rafs.stats import check_image
from tests.rafs.imagegen import Spec, build_image

CASE_SECONDS = 3.0  # generous: the machine may be busy; a hang would blow far past it
CASES = {"repeatable/sha256-nocompress-repeatable": 1500, "bootstrap/rafs-v6-2.2.boot": 1500,
         "generated-v5": 350, "generated-v6": 350}


def _rich_tree() -> Spec:
    kids: dict[bytes, Spec] = {b"f%03d" % i: Spec("file", data=b"%d" % i * 50) for i in range(400)}
    kids[b"link"] = Spec("symlink", target=b"t" * 3000)
    kids[b"short"] = Spec("symlink", target=b"x")
    kids[b"dev"] = Spec("blk", rdev=0x0801)
    kids[b"x"] = Spec("file", data=b"y" * 9000, xattrs={b"user.a": b"1", b"trusted.b": b"2" * 40})
    kids[b"hl"] = Spec("link", target=b"/x")
    kids[b"sub"] = Spec("dir", perm=0o755, children={b"deep": Spec("dir", perm=0o700, children={
        b"fifo": Spec("fifo")})})
    return Spec("dir", perm=0o755, children=kids)


def _exercise(buf: bytes) -> None:
    """Everything a daemon or tool could do with a bootstrap."""
    try:
        sb = load_bootstrap(buf)
    except CorruptMetadata:
        return
    with sb:
        for path, inode in sb.walk():
            if inode.is_dir:
                for name, _ino, _next in sb.iter_dir(inode.ino, 1):
                    if name not in (b".", b".."):
                        sb.lookup(inode.ino, name)
            elif inode.is_symlink:
                sb.readlink(inode.ino)
            elif inode.is_reg:
                sb.chunks(inode.ino)
            sb.xattrs(inode.ino)
            sb.path_of(inode.ino)
            assert path
        sb.prefetch_inodes()
        sb.to_model()
        check_image(sb)  # the nydus-image check path (v5: Merkle digests)


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    kind = rng.random()
    if kind < 0.15:
        return bytes(b[:rng.randrange(len(b))])
    # bias mutations towards the metadata-dense start of the file
    hot = min(len(b), rng.choice([2048, 8192, 16384, len(b)]))
    for _ in range(rng.randint(1, 6)):
        pos = rng.randrange(hot)
        if kind < 0.6:
            b[pos] = rng.randrange(256)
        elif kind < 0.8:
            b[pos] ^= 1 << rng.randrange(8)
        else:
            b[pos:pos + 4] = rng.choice([b"\xff\xff\xff\xff", b"\0\0\0\0", b"\x01\0\0\0", b"\0\0\0\x80"])
    return bytes(b)


def _images(upstream: Path) -> list[tuple[str, bytes]]:
    out = [(p, (upstream / p).read_bytes()) for p in (
        "repeatable/sha256-nocompress-repeatable", "bootstrap/rafs-v6-2.2.boot")]
    tree = _rich_tree()
    out += [(f"generated-v{v}", build_image(tree, version=v).bootstrap) for v in (5, 6)]
    return out


def test_mutated_bootstraps_only_raise_corrupt_metadata(upstream: Path) -> None:
    worst = 0.0
    for label, original in _images(upstream):
        _exercise(original)  # the unmutated image is fully valid
        rng = random.Random(label)
        for case in range(CASES[label]):
            mutated = _mutate(rng, original)
            start = time.monotonic()
            try:
                _exercise(mutated)
            except CorruptMetadata:
                pass
            except Unsupported as e:  # a flipped feature bit: refused by name, never a crash
                assert "TARFS" in str(e) or "pre-release" in str(e), e
            except Exception as e:  # pragma: no cover - the failure report
                pytest.fail(f"{label} case {case}: {type(e).__name__}: {e}")
            elapsed = time.monotonic() - start
            worst = max(worst, elapsed)
            assert elapsed < CASE_SECONDS, f"{label} case {case} took {elapsed:.2f}s"
    assert worst < CASE_SECONDS


def _decoders(data: bytes, rng: random.Random) -> list[object]:
    big = data * 30
    return [lambda: decode_ci_array(data, rng.randrange(0, 20), rng.random() < 0.5),
            lambda: parse_meta_header(data.ljust(4096, b"\0") if rng.random() < 0.5 else data),
            lambda: parse_toc(data),
            lambda: tar_segments(lambda o, n: big[o:o + n], len(big))]


def test_blob_meta_decoders_reject_garbage() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        for call in _decoders(rng.randbytes(rng.randrange(0, 200)), rng):
            try:
                call()  # type: ignore[operator]
            except CorruptMetadata:
                pass
