"""The v6 bulk decoders against the reference decoders they shortcut.

``stat``/``lookup_stat``/``dir_stats`` and the vectorised directory-block decode (what listings,
LOOKUP and GETATTR use: no ``Inode`` per entry) must answer exactly as ``_decode_inode`` and the
entry-by-entry ``_decode_dir_block_checked``: the same values, or the same error where the
reference raises (bad input -> a clear error, never wrong data). Checked on upstream's real v6
image, on a generated one with every file type, and on mutated copies of both, every 32-byte
inode slot of each (garbage slots included) and every directory."""

from __future__ import annotations

import random
import stat
import struct
from pathlib import Path
from typing import Any

import pytest

from nydusd.errors import CorruptMetadata, NydusError
from nydusd.rafs import load_bootstrap
from nydusd.rafs.v6 import BS, RafsV6Super
from tests.rafs.imagegen import Spec, build_image
from tests.rafs.test_fuzz import _rich_tree

V6_BOOT = "bootstrap/rafs-v6-2.2.boot"


def _outcome(fn: Any, *args: Any) -> tuple[Any, ...]:
    try:
        return ("ok", fn(*args))
    except NydusError as e:
        return ("error", type(e).__name__, str(e))


def _ref_stat(sb: RafsV6Super, nid: int) -> tuple[int, ...]:
    if not 0 <= nid <= sb._max_nid:
        return sb.get_inode(nid)  # type: ignore[return-value] # raises NotFound
    i = sb._decode_inode(nid)
    return (i.ino, i.mode, i.nlink, i.uid, i.gid, i.rdev, i.size, i.blocks, i.mtime, i.mtime_nsec)


def _ref_dir_stats(sb: RafsV6Super, nid: int) -> list[tuple[bytes, tuple[int, ...]]]:
    """The listing through the reference decoders only: inode, then block by block."""
    inode = sb._decode_inode(nid)
    sb._require(inode, "dir")
    geo = sb._geo(inode)
    out = []
    for b in range(-(-inode.size // BS)):
        for name, child, _ft in sb._decode_dir_block_checked(geo, sb._block(geo, b), nid, b):
            out.append((name, _ref_stat(sb, child)))
    return out


def _check(buf: bytes) -> tuple[int, int]:
    """Compare fast and reference decoders on every inode slot of ``buf``: the number of
    directories listed, and of answers that were errors (both decoders raising alike)."""
    try:
        sb = load_bootstrap(buf)
    except CorruptMetadata:
        return 0, 1
    assert isinstance(sb, RafsV6Super)
    listed = errors = 0
    with sb:
        for nid in range(sb._max_nid + 2):  # one past the end: NotFound from both
            ref = _outcome(_ref_stat, sb, nid)
            assert _outcome(sb.stat, nid) == ref, nid
            errors += ref[0] != "ok"
            if ref[0] != "ok" or not stat.S_ISDIR(ref[1][1]):
                continue
            fresh = RafsV6Super(buf)  # cold caches: the listing decodes its blocks itself
            listing = _outcome(_ref_dir_stats, sb, nid)
            assert _outcome(fresh.dir_stats, nid) == listing, nid
            if listing[0] != "ok":
                errors += 1
                continue
            listed += 1
            assert [n for n, _c, _o in sb.iter_dir(nid)] == [n for n, _s in listing[1]]
            for name, st in listing[1]:
                if name not in (b".", b".."):  # the name search is shared; its inode is not
                    ref = _outcome(lambda n, x: _ref_stat(sb, sb.lookup(n, x).ino), nid, name)
                    assert _outcome(sb.lookup_stat, nid, name) == ref, (nid, name)
                    assert ref[0] != "ok" or ref[1] == st  # found: the listing's entry
            missing = _outcome(sb.lookup_stat, nid, b"\xffno such name")
            assert missing[0] == "error", missing
    return listed, errors


def _images(upstream: Path) -> list[tuple[str, bytes]]:
    tree = _rich_tree()
    tree.children[b"old"] = Spec("file", data=b"o", mtime=1, nsec=999_999_999)
    tree.children[b"chr"] = Spec("chr", rdev=0x0103)
    tree.children[b"big"] = Spec("dir", children={b"n%04d" % i: Spec("fifo") for i in range(700)})
    return [("upstream", (upstream / V6_BOOT).read_bytes()),
            ("generated", build_image(tree, version=6).bootstrap)]


def _mutate(rng: random.Random, data: bytes, meta: int) -> bytes:
    """A few bytes changed in the inode/directory area (where the fast paths read)."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(meta, len(b))
        kind = rng.random()
        if kind < 0.5:
            b[pos] = rng.randrange(256)
        elif kind < 0.8:
            b[pos] ^= 1 << rng.randrange(8)
        else:
            b[pos:pos + 4] = rng.choice([b"\xff\xff\xff\xff", b"\0\0\0\0", b"\x01\0\0\0"])
    return bytes(b[:len(data)])


@pytest.mark.parametrize("cases", [{"upstream": 200, "generated": 25}])
def test_fast_decoders_answer_as_the_reference(upstream: Path, cases: dict[str, int]) -> None:
    for label, original in _images(upstream):
        assert _check(original)[0] >= 1, label  # the unmutated image lists cleanly
        with load_bootstrap(original) as sb:
            meta = sb._meta  # type: ignore[attr-defined]
        rng = random.Random(label)
        listed = 0
        for _ in range(cases[label]):
            listed += _check(_mutate(rng, original, meta))[0]
        assert listed  # many mutations leave listable directories


def _small_tree() -> Spec:
    return Spec("dir", children={
        b"a": Spec("file", data=b"x" * 5000), b"e": Spec("file"), b"l": Spec("symlink", target=b"abc"),
        b"f": Spec("fifo"), b"c": Spec("chr", rdev=0x0103), b"o": Spec("file", mtime=5, nsec=7, data=b"q"),
        b"d": Spec("dir", children={b"z": Spec("file", data=b"1", xattrs={b"user.a": b"b"})}),
        b"long": Spec("dir", children={b"%c" % (97 + i) * 200: Spec("file") for i in range(8)})})


def _targeted(original: bytes) -> list[bytes]:
    """Every inode's format, mode, xattr count, size and data address, and every directory
    entry's nid and name offset, set to the boundary values the fast checks decide on."""
    out = []

    def put(fmt: str, off: int, value: int) -> None:
        b = bytearray(original)
        struct.pack_into(fmt, b, off, value)
        out.append(bytes(b))
    with load_bootstrap(original) as sb:
        assert isinstance(sb, RafsV6Super)
        for _path, inode in sb.walk():
            off = inode.meta_offset
            for fmt in range(16):
                put("<H", off, fmt)
            for icount in (1, 2, 30, 0xFFFF):
                put("<H", off + 2, icount)
            for ftype in (0, *range(0o010000, 0o170001, 0o010000)):
                put("<H", off + 4, ftype | 0o644)
            for size in (0, 1, 11, 12, BS - 1, BS, BS + 1, 2 * BS + 1, 1 << 40):
                put("<Q", off + 8, size)
            for i_u in (0, 1, 3, 1000, 0xFFFFFFFF):
                put("<I", off + 16, i_u)
            if inode.is_dir or inode.is_symlink:  # as FLAT_PLAIN, its blocks at the image's end
                nblocks = -(-inode.size // BS)
                for last in (len(original) // BS - 1, len(original) // BS):
                    b = bytearray(original)
                    struct.pack_into("<HHHHQI", b, off, 1, 0, inode.mode, 0, inode.size,
                                     last - nblocks + 1)
                    out.append(bytes(b))
            if inode.is_dir:
                geo = sb._geo(inode)
                start = geo[3] + geo[4] if inode.layout == 2 and inode.size <= BS else geo[2] * BS
                first = struct.unpack_from("<H", original, start + 8)[0]
                for k in range(first // 12):
                    for nid in (sb._max_nid, sb._max_nid + 1, 1 << 40):
                        put("<Q", start + 12 * k, nid)
                    nameoff = struct.unpack_from("<H", original, start + 12 * k + 8)[0]
                    for value in (0, 12, first - 1, first + 1, BS, 0xFFFF, nameoff - 100,
                                  nameoff + 100):
                        put("<H", start + 12 * k + 8, value % 0x10000)
    return out


@pytest.mark.parametrize("which", ["upstream", "small"])
def test_fast_decoders_at_the_boundaries(upstream: Path, which: str) -> None:
    original = ((upstream / V6_BOOT).read_bytes() if which == "upstream"
                else build_image(_small_tree(), version=6).bootstrap)
    variants = _targeted(original)
    assert len(variants) > 100
    base = _check(original)[1]
    refused = sum(1 for v in variants if _check(v)[1] > base)
    assert 0 < refused < len(variants)  # both accepted and refused values were met


def test_listing_fields_match_get_inode_on_upstream_image(upstream: Path) -> None:
    """The values themselves, against the public ``get_inode`` (upstream's real v6 image)."""
    with load_bootstrap(upstream / V6_BOOT) as sb:
        seen = 0
        for _path, inode in sb.walk():
            if not inode.is_dir:
                continue
            for name, st in sb.dir_stats(inode.ino):
                child = sb.lookup(inode.ino, name) if name not in (b".", b"..") else None
                ref = sb.get_inode(st[0])
                assert st == (ref.ino, ref.mode, ref.nlink, ref.uid, ref.gid, ref.rdev, ref.size,
                              ref.blocks, ref.mtime, ref.mtime_nsec)
                assert child is None or child.ino == st[0]
                seen += 1
        assert seen >= 3
