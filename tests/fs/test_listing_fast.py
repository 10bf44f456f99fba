"""The listing hot path (issue #17): ``RafsFs.listing`` (bulk decode) equals the per-entry
``RafsFs.readdir`` on real v5/v6 images, the cached listings cost the garbage collector nothing
after its first looks, and a READDIRPLUS entry packed in one struct equals the two reference
packers. (The requests a first ``find`` sends per directory on a real mount are counted in
``tests/fs/test_readdirplus_mount.py``.)"""

from __future__ import annotations

import gc
import stat

import pytest

from nydusd.fs.attrs import IMAGE_TIMEOUT, Attr, decode_ino, encode_ino
from nydusd.fs.proto import messages as m
from nydusd.fs.rafs_fs import RafsFs
from nydusd.fs.vfs import Vfs
from nydusd.metrics import FsIoStats
from nydusd.rafs import load_bootstrap
from tests.harness.images import build_image, make_tree

TREE = {
    **{f"d{d}/": None for d in range(5)},
    **{f"d{d}/f{i:02d}": b"x" * (i * 300 + d) for d in range(5) for i in range(30)},
    **{f"d{d}/link": ("symlink", "f01") for d in range(5)},
    "d0/deep/": None, "d0/deep/g": b"g", "d1/fifo": ("fifo",), "d2/hard": ("hardlink", "d2/f03"),
    "-first": b"sorts before '.'",
}


@pytest.fixture(scope="module", params=[5, 6])
def image(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"v{request.param}")
    src = make_tree(tmp / "src", TREE)
    return src, build_image(src, tmp / "out", fs_version=request.param)


def _dirs(fs: RafsFs) -> list[int]:
    out, stack = [], [fs.root_ino]
    while stack:
        ino = stack.pop()
        out.append(ino)
        stack += [e.attr.ino for e in fs.readdir(ino) if e.name not in (b".", b"..")
                  and stat.S_ISDIR(e.attr.mode)]
    return out


def test_listing_equals_the_per_entry_readdir(image) -> None:
    _src, img = image
    fs = RafsFs(load_bootstrap(img.bootstrap), None)
    try:
        dirs = _dirs(fs)
        assert len(dirs) == 7
        for ino in dirs:
            for base, root in ((0, -1), (encode_ino(3, 0), -1), (encode_ino(4, 0), fs.root_ino)):
                expect = [(e.name, tuple(e.attr.with_ino(1 if e.attr.ino == root else base | e.attr.ino)))
                          for e in fs.readdir(ino)]
                assert fs.listing(ino, base, root) == expect
            assert fs.getattr(ino) == fs._attr(fs.sb.get_inode(ino))
            for e in fs.readdir(ino):
                if e.name not in (b".", b".."):
                    assert fs.lookup(ino, e.name) == fs._attr(fs.sb.lookup(ino, e.name))
    finally:
        fs.close()


def test_cached_listings_are_not_tracked_by_the_collector(image) -> None:
    _src, img = image
    fs = RafsFs(load_bootstrap(img.bootstrap), None)
    vfs = Vfs()
    try:
        mount = vfs.attach("/img", fs, FsIoStats("/img"))
        root = vfs.lookup(1, b"img").ino
        listed = list(vfs.readdir(root, 0))
        assert [e.next_offset for e in listed] == list(range(1, len(listed) + 1))
        assert all(decode_ino(e.attr.ino)[0] == mount.index for e in listed)
        gc.collect()
        gc.collect()  # the outer pairs are untracked once their inner tuples are
        cached = mount.listings[decode_ino(root)[1]]
        assert len(cached) == len(listed)
        # plain tuples of bytes/ints/floats: after its first looks the collector never visits
        # them again (DirEntry/Attr objects stayed tracked: every full collection walked them)
        assert not any(gc.is_tracked(entry) or gc.is_tracked(entry[1]) for entry in cached)
        assert list(vfs.readdir(root, 0)) == listed  # and read back as the same entries
        assert list(vfs.readdir(root, 3)) == listed[3:]
    finally:
        fs.close()


@pytest.mark.parametrize("name_len", [1, 2, 7, 8, 9, 100, 255])
def test_direntplus_equals_entry_plus_dirent(name_len: int) -> None:
    name = b"n" * name_len
    attrs = [Attr((5 << 56) | 77, stat.S_IFREG | 0o644, 1, 1000, 1000, 0, 12345, 25, 4096,
                  1_700_000_000_123_456_789, 1_700_000_000_123_456_789, 1_700_000_000_123_456_789),
             Attr(9, stat.S_IFDIR | 0o755, 2, 0, 0, 0, 0, 0, 4096, -5_500_000_000, 7, 1 << 62,
                  1.5, 0.25),
             Attr(1, stat.S_IFLNK | 0o777, 0, 1 << 31, 0, 0, 1 << 62, 1 << 54, 4096, 0, 0, 0,
                  IMAGE_TIMEOUT, 0.0)]
    for attr in attrs:
        for offset in (1, 2, 1 << 40):
            packed = m.pack_direntplus(attr, offset, name)
            assert packed == m.pack_entry(attr) + m.pack_dirent(attr.ino, offset, attr.mode, name)
            assert len(packed) == m.dirent_size(name_len, True)
