"""Pure tier: RafsFs and Vfs over the in-process fake image (no llfuse, no kernel)."""

from __future__ import annotations

import errno
import os
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nydusd.errors import AlreadyExists, BackendError, InvalidArgument, NotFound, NydusError, ReadOnly
from nydusd.fs.attrs import INO_BITS, ROOT_INO, decode_ino, encode_ino
from nydusd.fs.rafs_fs import NoXattr, RafsFs
from nydusd.fs.vfs import StaleInode, Vfs, normalize_path
from nydusd.metrics import FsIoStats, StatsFop
from tests.harness.fakes.image import SAMPLE, FakeDevice, FakeSuper


def make_fs(tree=SAMPLE, xattr=False, root_ino=1):
    sb = FakeSuper(tree, root_ino=root_ino)
    return RafsFs(sb, FakeDevice(sb), enable_xattr=xattr)


def attach(vfs, path, tree=SAMPLE, **kw):
    fs = make_fs(tree, **kw)
    return vfs.attach(path, fs, FsIoStats(path, files_account=True, access_pattern=True))


def walk(vfs, ino, path):
    for name in path.strip("/").split("/"):
        ino = vfs.lookup(ino, name.encode()).ino
    return ino


def names(vfs, ino):
    return [e.name for e in vfs.readdir(ino, 0) if e.name not in (b".", b"..")]


def read_all(vfs, ino):
    fh = vfs.open(ino, os.O_RDONLY)
    try:
        return vfs.read(fh, 0, 1 << 30)
    finally:
        vfs.release(fh)


def test_inode_encoding_roundtrip():
    ino = encode_ino(7, 12345)
    assert decode_ino(ino) == (7, 12345)
    with pytest.raises(OverflowError):
        encode_ino(1, 1 << INO_BITS)


def test_rafs_fs_attributes_and_reads():
    fs = make_fs(xattr=True)
    hosts = fs.lookup(fs.lookup(1, b"etc").ino, b"hosts")
    assert stat.S_ISREG(hosts.mode) and hosts.size == 20 and hosts.nlink == 2
    assert hosts.mtime_ns == 1_700_000_000 * 10**9 + 5 and hosts.uid == 1000
    file = fs.open(hosts.ino)
    assert file.attr == hosts
    assert file.read(3, 100) == b".0.0.1 localhost\n"
    assert file.read(20, 100) == b""
    assert fs.getxattr(hosts.ino, b"user.name") == b"hosts"
    assert fs.listxattr(hosts.ino) == [b"user.name"]
    with pytest.raises(NoXattr):
        fs.getxattr(hosts.ino, b"user.other")
    assert [e.name for e in fs.readdir(1)] == [b".", b"..", b"bin", b"etc", b"hard", b"readme"]
    assert [e.name for e in fs.readdir(1, 4)] == [b"hard", b"readme"]
    with pytest.raises(NotFound):
        fs.lookup(1, b"nope")


def test_xattrs_disabled_answer_enodata():
    fs = make_fs(xattr=False)
    readme = fs.lookup(1, b"readme")
    assert fs.listxattr(readme.ino) == []
    with pytest.raises(NoXattr) as exc:
        fs.getxattr(readme.ino, b"user.name")
    assert exc.value.errno == errno.ENODATA


def test_root_mount_serves_image_at_root():
    vfs = Vfs()
    attach(vfs, "/")
    assert vfs.getattr(ROOT_INO).is_dir
    readme = vfs.lookup(ROOT_INO, b"readme")
    assert decode_ino(readme.ino)[0] == 1
    assert read_all(vfs, readme.ino) == b"hello nydus\n"
    hosts = walk(vfs, ROOT_INO, "etc/hosts")
    assert vfs.lookup(ROOT_INO, b"hard").ino == hosts  # hard links share st_ino
    assert vfs.readlink(walk(vfs, ROOT_INO, "bin/link")) == b"sh"
    assert [e.name for e in vfs.readdir(ROOT_INO, 0)] == [b".", b"..", b"bin", b"etc", b"hard", b"readme"]


def test_pseudo_root_nested_mounts_have_separate_inode_spaces():
    vfs = Vfs()
    assert [e.name for e in vfs.readdir(ROOT_INO, 0)] == [b".", b".."]
    a = attach(vfs, "/pseudo_1")
    b = attach(vfs, "/x/y/z", tree={"only": b"b"})
    assert a.index != b.index
    names = [e.name for e in vfs.readdir(ROOT_INO, 0)]
    assert names == [b".", b"..", b"pseudo_1", b"x"]
    assert [e.name for e in vfs.readdir(ROOT_INO, 3)] == [b"x"]
    z = walk(vfs, ROOT_INO, "x/y/z")
    assert vfs.getattr(z).is_dir and decode_ino(z)[0] == b.index
    assert read_all(vfs, walk(vfs, z, "only")) == b"b"
    readme = walk(vfs, ROOT_INO, "pseudo_1/readme")
    assert read_all(vfs, readme) == b"hello nydus\n"
    assert walk(vfs, ROOT_INO, "pseudo_1") != z
    with pytest.raises(AlreadyExists):
        attach(vfs, "/pseudo_1")
    with pytest.raises(InvalidArgument):
        attach(vfs, "/pseudo_1/inner")
    with pytest.raises(InvalidArgument):
        attach(vfs, "relative")


def test_detach_invalidates_and_stales_old_inodes():
    vfs = Vfs()
    attach(vfs, "/a/m")
    readme = walk(vfs, ROOT_INO, "a/m/readme")
    a = walk(vfs, ROOT_INO, "a")
    mount, parent, name = vfs.detach("/a/m")
    # /a held nothing else: it goes too, and its entry in the root is what the kernel must forget
    assert (parent, name) == (ROOT_INO, b"a")
    with pytest.raises(NotFound):
        vfs.lookup(ROOT_INO, b"a")
    with pytest.raises(StaleInode):
        vfs.lookup(a, b"m")
    with pytest.raises(StaleInode) as exc:
        vfs.getattr(readme)
    assert exc.value.errno == errno.ESTALE
    with pytest.raises(NotFound):
        vfs.detach("/a/m")


def test_replace_swaps_image_with_fresh_index():
    vfs = Vfs()
    old = attach(vfs, "/m")
    new_fs = make_fs({"new": b"new data"})
    old2, new = vfs.replace("/m", new_fs, FsIoStats("/m"))
    assert old2 is old and new.index != old.index
    assert read_all(vfs, walk(vfs, ROOT_INO, "m/new")) == b"new data"
    with pytest.raises(NotFound):
        walk(vfs, ROOT_INO, "m/readme")


def test_slot_reuse_over_many_cycles():
    vfs = Vfs()
    for i in range(600):
        attach(vfs, f"/c{i % 3}")
        assert read_all(vfs, walk(vfs, ROOT_INO, f"c{i % 3}/readme")) == b"hello nydus\n"
        vfs.detach(f"/c{i % 3}")
    assert vfs.mounts() == {} and vfs.open_handles() == 0


def test_backend_failure_is_eio_on_data_only(logs):
    vfs = Vfs()
    mount = attach(vfs, "/m")
    other = attach(vfs, "/n")
    readme = walk(vfs, ROOT_INO, "m/readme")
    mount.fs.device.broken.add(decode_ino(readme)[1])
    fh = vfs.open(readme, os.O_RDONLY)
    with logs.expect("read_failed", count=1), pytest.raises(BackendError) as exc:
        vfs.read(fh, 0, 100)
    assert exc.value.errno == errno.EIO
    vfs.release(fh)
    assert vfs.getattr(readme).size == 12  # metadata still fine
    assert read_all(vfs, walk(vfs, ROOT_INO, "n/readme")) == b"hello nydus\n"  # other mount fine
    snap = mount.stats.snapshot()
    assert snap["fop_errors"][StatsFop.READ] == 1
    assert other.stats.snapshot()["fop_hits"][StatsFop.READ] == 1


def test_write_access_is_refused():
    vfs = Vfs()
    attach(vfs, "/")
    readme = vfs.lookup(ROOT_INO, b"readme").ino
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        with pytest.raises(ReadOnly):
            vfs.open(readme, flags)
    with pytest.raises(ReadOnly):
        vfs.access(readme, os.W_OK)
    assert vfs.access(readme, os.R_OK)


def test_stats_account_per_mount_and_per_file():
    vfs = Vfs()
    mount = attach(vfs, "/m")
    readme = walk(vfs, ROOT_INO, "m/readme")
    assert read_all(vfs, readme) == b"hello nydus\n"
    snap = mount.stats.snapshot()
    assert snap["data_read"] == 12 and snap["fop_hits"][StatsFop.OPEN] == 1
    assert snap["fop_hits"][StatsFop.LOOKUP] == 1 and snap["nr_opens"] == 0
    files = mount.stats.files_snapshot()
    assert files[str(decode_ino(readme)[1])]["data_read"] == 12


def test_broken_image_does_not_break_the_pseudo_listing():
    vfs = Vfs()
    good = attach(vfs, "/good")
    bad = attach(vfs, "/bad")

    def corrupt(ino):
        from nydusd.errors import CorruptMetadata
        raise CorruptMetadata("bad inode table", inode=ino)

    bad.fs.sb.get_inode = corrupt
    names = {e.name: e.attr for e in vfs.readdir(ROOT_INO, 0)}
    assert set(names) == {b".", b"..", b"bad", b"good"}
    assert stat.S_ISDIR(names[b"bad"].mode) and decode_ino(names[b"bad"].ino)[0] == bad.index
    assert read_all(vfs, walk(vfs, ROOT_INO, "good/readme")) == b"hello nydus\n"
    with pytest.raises(NydusError) as exc:
        vfs.lookup(ROOT_INO, b"bad")
    assert exc.value.errno == errno.EIO
    assert good.stats.snapshot()["fop_errors"][StatsFop.GETATTR] == 0


def test_replace_never_shows_a_missing_entry_to_concurrent_lookups():
    import threading

    vfs = Vfs()
    attach(vfs, "/a/m")
    parent = walk(vfs, ROOT_INO, "a")
    stop = threading.Event()
    failures = []

    def looker():
        while not stop.is_set():
            try:
                vfs.lookup(parent, b"m")
            except Exception as e:  # noqa: BLE001 - collected for the assertion
                failures.append(repr(e))

    import sys

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible to expose any window
    t = threading.Thread(target=looker)
    t.start()
    try:
        for _ in range(1000):
            vfs.replace("/a/m", make_fs(), FsIoStats("/a/m"))
            attach(vfs, "/a/other")
            vfs.detach("/a/other")
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(interval)
    assert failures == []


def test_directory_listings_are_cached_per_mount_and_sliced_by_offset(monkeypatch):
    import nydusd.fs.vfs as vfs_mod

    vfs = Vfs()
    mount = attach(vfs, "/m", tree={f"f{i:02d}": b"x" for i in range(30)} | {"d": {"a": b""}})
    calls = []
    real = mount.fs.readdir
    monkeypatch.setattr(mount.fs, "readdir", lambda ino, off=0: calls.append(ino) or real(ino, off))
    d = walk(vfs, ROOT_INO, "m")
    full = list(vfs.readdir(d, 0))
    assert [e.name for e in full[:3]] == [b".", b"..", b"d"] and len(full) == 33
    assert [e.next_offset for e in full] == list(range(1, 34))
    for off in (0, 1, 5, 32, 33, 40):  # resuming anywhere gives the same entries as one pass
        assert list(vfs.readdir(d, off)) == full[off:]
    assert len(calls) == 1  # the image was asked once
    assert all(e.attr.ino == vfs.lookup(d, e.name).ino for e in full[2:])  # kernel inode numbers
    # a remount serves the new image's listing, not the cached one
    vfs.replace("/m", make_fs({"new": b"n"}), FsIoStats("/m"))
    assert [e.name for e in vfs.readdir(walk(vfs, ROOT_INO, "m"), 0)] == [b".", b"..", b"new"]
    # the cache is bounded: past DIR_CACHE_ENTRIES it starts over
    monkeypatch.setattr(vfs_mod, "DIR_CACHE_ENTRIES", 40)
    attach(vfs, "/o", tree={"x": {f"f{i}": b"" for i in range(30)}, "y": {"g": b""}})
    root = walk(vfs, ROOT_INO, "o")
    list(vfs.readdir(root, 0))
    list(vfs.readdir(walk(vfs, root, "x"), 0))
    assert sum(m.listed for m in vfs.mounts().values()) <= 40
    assert [e.name for e in vfs.readdir(walk(vfs, root, "y"), 0)] == [b".", b"..", b"g"]


def test_umount_removes_the_pseudo_directories_it_leaves_empty():
    vfs = Vfs()
    attach(vfs, "/a/b/c/m1")
    attach(vfs, "/a/x")
    attach(vfs, "/top")
    assert vfs.detach("/a//b/c/m1")[1:] == (walk(vfs, ROOT_INO, "a"), b"b")  # /a/b/c, /a/b go
    assert names(vfs, ROOT_INO) == [b"a", b"top"]
    assert names(vfs, walk(vfs, ROOT_INO, "a")) == [b"x"]
    assert vfs.detach("/a/x")[1:] == (ROOT_INO, b"a")
    assert vfs.detach("/top")[1:] == (ROOT_INO, b"top")
    assert names(vfs, ROOT_INO) == []
    attach(vfs, "/a/b/c/m1")  # the same path again: fresh directories
    assert read_all(vfs, walk(vfs, ROOT_INO, "a/b/c/m1/readme"))


@pytest.mark.parametrize("path", ["/" + "x" * 256, "/a/" + "y" * 256 + "/m", "/d" * 2049, "/a\0b"])
def test_mountpoint_over_kernel_limits_is_refused_and_changes_nothing(path):
    vfs = Vfs()
    attach(vfs, "/ok")
    with pytest.raises(InvalidArgument):
        attach(vfs, path)
    assert names(vfs, ROOT_INO) == [b"ok"]
    attach(vfs, "/" + "z" * 255)  # the limits themselves are fine
    attach(vfs, "/p" + "/q" * 2046)  # 4096 bytes


_COMPONENT = st.one_of(st.text(st.characters(codec="utf-8", exclude_characters="/"), max_size=300),
                       st.sampled_from([".", "..", "", "x" * 255, "x" * 256, "é" * 128]))


@settings(max_examples=150, deadline=None)
@given(paths=st.lists(st.lists(_COMPONENT, min_size=0, max_size=4).map(lambda c: "/" + "/".join(c)),
                      min_size=1, max_size=6),
       drop=st.data())
def test_fuzzed_mountpoints_never_break_the_pseudo_tree(paths, drop):
    """Fuzz: any mountpoint is either attached or refused with InvalidArgument/AlreadyExists
    (nothing changed); the pseudo tree can always be listed, every name in it fits NAME_MAX, and
    detaching everything (in any order) leaves an empty root."""
    vfs = Vfs()
    attached = []
    for path in paths:
        before = vfs.mounts().keys()
        try:
            vfs.attach(path, make_fs(), FsIoStats(path))
        except (InvalidArgument, AlreadyExists):
            assert vfs.mounts().keys() == before
            continue
        attached.append(normalize_path(path))

    def check(ino, depth=0):
        for entry in vfs.readdir(ino, 0):
            if entry.name in (b".", b".."):
                continue
            assert 0 < len(entry.name) <= 255 and b"/" not in entry.name and b"\0" not in entry.name
            if decode_ino(entry.attr.ino)[0] == 0 and depth < 8:
                check(entry.attr.ino, depth + 1)
    check(ROOT_INO)
    for path in drop.draw(st.permutations(attached)):
        vfs.detach(path)
        check(ROOT_INO)
    assert names(vfs, ROOT_INO) == []
