"""Our v6 bootstraps are real EROFS images: fsck.erofs (erofs-utils) accepts them with the blob's
uncompressed data as extra device, and the Linux kernel mounts them (``mount -t erofs -o device=``)
showing exactly the source tree (names, types, modes, ownership, times, devices, symlinks, xattrs,
hard links, file content)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from tests.rafs.imagegen import Image, Spec, _normalise, build_image, expected_dump
from tests.rafs.strategies import roots

pytestmark = pytest.mark.root


def _source_tree() -> Spec:
    kids: dict[bytes, Spec] = {b"f%04d" % i: Spec("file", data=os.urandom(i * 13), mtime=1_600_000_000 + i,
                                                  nsec=i * 1001) for i in range(600)}
    kids.update({
        b"multi": Spec("file", data=os.urandom(5 * 4096 + 123), perm=0o755, uid=1234, gid=4321,
                       xattrs={b"user.a": b"1", b"trusted.t": b"x" * 100, b"security.s": b"sec"}),
        b"dedup": Spec("file", data=b"z" * 3 * 4096),
        b"empty": Spec("file"),
        b"long-link": Spec("symlink", target=b"/".join([b"p" * 200] * 20)[:4000]),
        b"link": Spec("symlink", target=b"multi"),
        b"tty": Spec("chr", rdev=os.makedev(5, 0), perm=0o620),
        b"disk": Spec("blk", rdev=os.makedev(8, 300000), perm=0o660),
        b"pipe": Spec("fifo", perm=0o600),
        b".hidden": Spec("file", data=b"dot"),
        b"hard": Spec("link", target=b"/multi"),
        "ünïcødé-名前".encode(): Spec("file", data=b"unicode"),
        b"n" * 255: Spec("file", data=b"long name"),
        b"sub": Spec("dir", perm=0o750, uid=7, gid=8, mtime=123, nsec=456, xattrs={b"user.dir": b"d"},
                     children={b"deeper": Spec("dir", perm=0o700, children={
                         b"hard2": Spec("link", target=b"/multi"),
                         b"x": Spec("file", data=b"deep")})}),
    })
    return Spec("dir", perm=0o755, mtime=99, children=kids)


def _mounted_dump(mnt: Path) -> dict[bytes, tuple[object, ...]]:
    out: dict[bytes, tuple[object, ...]] = {}
    nlinks: dict[bytes, int] = {}
    root = os.fsencode(mnt)
    for dirpath, dirnames, filenames in os.walk(root):
        entries = [dirpath] if dirpath == root else []
        entries += [os.path.join(dirpath, n) for n in dirnames + filenames]
        for p in entries:
            st = os.lstat(p)
            rel = b"/" + os.path.relpath(p, root) if p != root else b"/"
            md5 = group = None
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    md5 = hashlib.md5(f.read()).hexdigest()
                group = st.st_ino
            xattrs = tuple(sorted((os.fsencode(n), os.getxattr(p, n, follow_symlinks=False))
                                  for n in os.listxattr(p, follow_symlinks=False)))
            out[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns // 10**9, st.st_mtime_ns % 10**9,
                        st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0,
                        st.st_size if stat.S_ISREG(st.st_mode) else 0,
                        os.readlink(p) if stat.S_ISLNK(st.st_mode) else None, xattrs, md5, group)
            nlinks[rel] = st.st_nlink
    norm = _normalise(out)
    for path, t in norm.items():  # the kernel's link counts agree with the structure
        want = t[-1][1] if isinstance(t[-1], tuple) else t[-1]
        assert nlinks[path] == want, (path, nlinks[path], want)
    return norm


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def _require_tools() -> None:
    if shutil.which("fsck.erofs") is None or shutil.which("losetup") is None:
        pytest.skip("erofs-utils / losetup not installed")
    if "erofs" not in Path("/proc/filesystems").read_text():
        pytest.skip("kernel has no EROFS support")


@contextlib.contextmanager
def _mounted(image: Image, work: Path) -> Iterator[Path]:
    """fsck.erofs the image, then mount it (blob data on a loop device); umount in finally."""
    boot, raw, mnt = work / "boot", work / "blob.raw", work / "mnt"
    boot.write_bytes(image.bootstrap)
    raw.write_bytes(image.raw_device)
    mnt.mkdir()
    fsck = _run("fsck.erofs", f"--device={raw}", str(boot))
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    loop = _run("losetup", "-f", "--show", "-r", str(raw))
    if loop.returncode != 0:
        pytest.skip(f"cannot set up a loop device: {loop.stderr.strip()}")
    dev = loop.stdout.strip()
    mounted = False
    try:
        res = _run("mount", "-t", "erofs", "-o", f"ro,device={dev}", str(boot), str(mnt))
        if res.returncode != 0 and ("permission denied" in res.stderr.lower()
                                    or "must be superuser" in res.stderr.lower()):
            pytest.skip(f"mount not permitted: {res.stderr.strip()}")
        assert res.returncode == 0, res.stderr
        mounted = True
        yield mnt
    finally:
        if mounted:
            _run("umount", str(mnt))
        _run("losetup", "-d", dev)


def _assert_same(got: dict[bytes, tuple[object, ...]], want: dict[bytes, tuple[object, ...]]) -> None:
    assert got.keys() == want.keys()
    for path in want:
        assert got[path] == want[path], path


def test_v6_bootstrap_is_a_kernel_mountable_erofs(tmp_path: Path) -> None:
    _require_tools()
    spec = _source_tree()
    with _mounted(build_image(spec, version=6, chunk_size=4096), tmp_path) as mnt:
        _assert_same(_mounted_dump(mnt), expected_dump(spec))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.data_too_large])
@given(spec=roots(kernel=True))
def test_random_trees_mount_identically(spec: Spec) -> None:
    _require_tools()
    with tempfile.TemporaryDirectory() as tmp, \
            _mounted(build_image(spec, version=6, chunk_size=4096), Path(tmp)) as mnt:
        _assert_same(_mounted_dump(mnt), expected_dump(spec))
