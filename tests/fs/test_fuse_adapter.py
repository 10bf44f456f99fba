"""Adapter tier: FuseOperations called directly (no kernel) with a Vfs, and with a vfs that raises.

Every handler must answer with FUSEError(errno) and never let another exception escape (design R3)."""

from __future__ import annotations

import errno
import os
import stat

import llfuse
import pytest

from nydusd.errors import BackendError, CorruptMetadata, IntegrityError, NotFound
from nydusd.fs.attrs import ROOT_INO
from nydusd.fs.fuse import FuseOperations, fuse_op
from nydusd.fs.rafs_fs import RafsFs
from nydusd.fs.vfs import Vfs
from nydusd.metrics import FsIoStats
from tests.harness.fakes.image import SAMPLE, FakeDevice, FakeSuper


class RaisingVfs:
    """Every method raises the configured exception (a vfs gone wrong)."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __getattr__(self, name):
        def fail(*args, **kwargs):
            raise self.exc
        return fail


def errno_of(call):
    # handlers run in llfuse workers holding the global lock; read releases it
    with llfuse.lock, pytest.raises(llfuse.FUSEError) as exc:
        result = call()
        if hasattr(result, "__next__"):
            list(result)
    return exc.value.errno


CALLS = [
    ("lookup", lambda ops: ops.lookup(ROOT_INO, b"x", None)),
    ("getattr", lambda ops: ops.getattr(ROOT_INO, None)),
    ("readlink", lambda ops: ops.readlink(5, None)),
    ("opendir", lambda ops: ops.opendir(ROOT_INO, None)),
    ("readdir", lambda ops: ops.readdir(ROOT_INO, 0)),
    ("open", lambda ops: ops.open(5, os.O_RDONLY, None)),
    ("read", lambda ops: ops.read(1, 0, 4096)),
    ("getxattr", lambda ops: ops.getxattr(5, b"user.a", None)),
    ("listxattr", lambda ops: ops.listxattr(5, None)),
    ("statfs", lambda ops: ops.statfs(None)),
    ("access", lambda ops: ops.access(5, os.R_OK, None)),
]


@pytest.mark.parametrize("name,call", CALLS, ids=[c[0] for c in CALLS])
@pytest.mark.parametrize("exc,expected", [
    (NotFound("gone"), errno.ENOENT),
    (BackendError("outage", blob_id="b"), errno.EIO),
    (IntegrityError("digest"), errno.EIO),
    (CorruptMetadata("bad"), errno.EIO),
    (PermissionError(errno.EACCES, "denied"), errno.EACCES),
    (OSError(0, "no errno"), errno.EIO),
    (llfuse.FUSEError(errno.ENOTSUP), errno.ENOTSUP),
])
def test_every_handler_maps_errors(name, call, exc, expected):
    ops = FuseOperations(RaisingVfs(exc))
    assert errno_of(lambda: call(ops)) == expected


@pytest.mark.parametrize("name,call", CALLS, ids=[c[0] for c in CALLS])
def test_unexpected_exception_is_logged_and_eio(name, call, logs):
    ops = FuseOperations(RaisingVfs(ZeroDivisionError("bug")))
    with logs.expect("fuse_handler_crashed", count=1):
        assert errno_of(lambda: call(ops)) == errno.EIO


def test_generator_handler_fails_mid_iteration(logs):
    @fuse_op
    def gen():
        yield 1
        raise KeyError("late")

    it = gen()
    assert next(it) == 1
    with logs.expect("fuse_handler_crashed"), pytest.raises(llfuse.FUSEError) as exc:
        next(it)
    assert exc.value.errno == errno.EIO
    # abandoning a generator early (llfuse does when its buffer is full) is not an error
    it2 = gen()
    next(it2)
    it2.close()


def test_forget_never_raises(logs):
    ops = FuseOperations(RaisingVfs(RuntimeError("boom")))
    with logs.expect("fuse_forget_failed"):
        ops.forget([(5, 1)])


def test_write_operations_answer_erofs():
    ops = FuseOperations(Vfs())
    for call in (lambda: ops.write(1, 0, b"x"), lambda: ops.mkdir(1, b"d", 0o755, None),
                 lambda: ops.unlink(1, b"x", None), lambda: ops.setxattr(1, b"user.a", b"v", None),
                 lambda: ops.create(1, b"f", 0o644, os.O_WRONLY, None)):
        assert errno_of(call) == errno.EROFS


def test_real_vfs_through_adapter():
    sb = FakeSuper(SAMPLE)
    vfs = Vfs()
    vfs.attach("/", RafsFs(sb, FakeDevice(sb), enable_xattr=True), FsIoStats("/"))
    ops = FuseOperations(vfs)
    etc = ops.lookup(ROOT_INO, b"etc", None)
    assert stat.S_ISDIR(etc.st_mode) and etc.entry_timeout > 1
    hosts = ops.lookup(etc.st_ino, b"hosts", None)
    assert hosts.st_size == 20 and hosts.st_nlink == 2 and hosts.st_mtime_ns % 10**9 == 5
    fh = ops.open(hosts.st_ino, os.O_RDONLY, None)
    with llfuse.lock:
        assert ops.read(fh, 0, 9) == b"127.0.0.1"
    ops.release(fh)
    names = [n for n, _a, _o in ops.readdir(ops.opendir(ROOT_INO, None), 0)]
    assert names == [b".", b"..", b"bin", b"etc", b"hard", b"readme"]
    assert ops.getxattr(hosts.st_ino, b"user.name", None) == b"hosts"
    assert errno_of(lambda: ops.getxattr(hosts.st_ino, b"user.zzz", None)) == errno.ENODATA
    assert errno_of(lambda: ops.lookup(ROOT_INO, b"missing", None)) == errno.ENOENT
    assert errno_of(lambda: ops.open(etc.st_ino, os.O_RDONLY, None)) == errno.EISDIR
    assert errno_of(lambda: ops.open(hosts.st_ino, os.O_RDWR, None)) == errno.EROFS
    assert errno_of(lambda: ops.opendir(hosts.st_ino, None)) == errno.ENOTDIR
    assert ops.statfs(None).f_files == sb.inode_count


def test_inflight_lists_running_requests():
    seen = []

    class SlowVfs(RaisingVfs):
        def getattr(self, inode):
            seen.extend(ops.inflight.snapshot())
            raise NotFound("gone")

    ops = FuseOperations(SlowVfs(RuntimeError("unused")))
    assert errno_of(lambda: ops.getattr(42, None)) == errno.ENOENT
    assert len(seen) == 1 and seen[0]["inode"] == 42 and seen[0]["opcode"] == 3
    assert seen[0]["unique"] > 0 and seen[0]["timestamp_secs"] > 1_600_000_000
    assert ops.inflight.snapshot() == []
