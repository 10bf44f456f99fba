"""Inode attributes at the edges of their on-disk range reach the kernel as sane ``stat`` values.

A bootstrap may carry any u64 in an inode's mtime or blocks (``nydus-image check`` accepts them);
RafsFs must turn them into values llfuse's ``EntryAttributes`` can hold instead of crashing the
handler (review finding: ``OverflowError`` in ``st_atime_ns.__set__``, logged as
``fuse_handler_crashed``). Real bootstraps written by the rafs writer (v5 with patched bytes, v6),
loaded by the real reader, served through Vfs + FuseOperations.
"""

from __future__ import annotations

import stat
import struct

import llfuse
import pytest

from nydusd.fs.attrs import ROOT_INO
from nydusd.fs.fuse import FuseOperations
from nydusd.fs.rafs_fs import RafsFs
from nydusd.fs.vfs import Vfs
from nydusd.metrics import FsIoStats
from nydusd.rafs.model import Bootstrap, Node, new_root
from nydusd.rafs.reader import load_bootstrap
from nydusd.rafs.writer import bootstrap_bytes

U64_MAX = (1 << 64) - 1
I64_MAX = (1 << 63) - 1
I64_MIN = -(1 << 63)
# a marker mtime the v5 test finds in the written bytes to locate the inode record
MARK = 0x1122334455667788


def _ops(boot: bytes) -> FuseOperations:
    vfs = Vfs()
    vfs.attach("/", RafsFs(load_bootstrap(boot), None), FsIoStats("/"))
    return FuseOperations(vfs)


def _model(**times: int) -> Bootstrap:
    root = new_root(mtime=1_700_000_000)
    for name, mtime in times.items():
        root.children.append(Node(name=name.encode(), mode=0o040755, mtime=mtime, mtime_nsec=7))
    return Bootstrap(root=root)


def _lookup(ops: FuseOperations, name: bytes) -> llfuse.EntryAttributes:
    with llfuse.lock:
        attr = ops.lookup(ROOT_INO, name, None)
        again = ops.getattr(attr.st_ino, None)
    assert again.st_mtime_ns == attr.st_mtime_ns
    return attr


@pytest.mark.parametrize("version", [5, 6])
def test_huge_mtime_is_signed_and_clamped(version):
    boot = bootstrap_bytes(_model(max=U64_MAX, neg=U64_MAX - 99, big=1 << 62, ok=1_600_000_000),
                           version=version)
    ops = _ops(boot)
    # u64 max is -1 s, as upstream's i64 cast gives (plus the 7 ns)
    assert _lookup(ops, b"max").st_mtime_ns == -1_000_000_000 + 7
    assert _lookup(ops, b"neg").st_mtime_ns == -100 * 1_000_000_000 + 7
    # 2^62 s does not fit in i64 nanoseconds: clamped, not wrapped, not a float approximation
    big = _lookup(ops, b"big")
    assert big.st_mtime_ns == I64_MAX and big.st_atime_ns == I64_MAX and big.st_ctime_ns == I64_MAX
    assert _lookup(ops, b"ok").st_mtime_ns == 1_600_000_000 * 1_000_000_000 + 7


def test_review_mtime_clamps_to_earliest_time():
    # the value found in the review's corrupt bootstrap: i64 -1097715733313 s, below i64 ns range
    ops = _ops(bootstrap_bytes(_model(d=18446742975993818303), version=6))
    assert _lookup(ops, b"d").st_mtime_ns == I64_MIN


def test_v5_huge_blocks_and_mtime_via_patched_inode():
    root = new_root()
    root.children.append(Node(name=b"f", mode=0o100644, mtime=MARK, size=0))
    boot = bytearray(bootstrap_bytes(Bootstrap(root=root), version=5))
    # v5 inode record: 72 blocks Q | 112 mtime Q; locate the record by its marker mtime
    at = boot.find(struct.pack("<Q", MARK))
    assert at > 0 and boot.find(struct.pack("<Q", MARK), at + 1) == -1
    record = at - 112
    struct.pack_into("<Q", boot, record + 72, U64_MAX)
    struct.pack_into("<Q", boot, record + 112, U64_MAX)
    ops = _ops(bytes(boot))
    attr = _lookup(ops, b"f")
    assert stat.S_ISREG(attr.st_mode)
    assert attr.st_blocks == I64_MAX
    assert attr.st_mtime_ns == -1_000_000_000
    # readdir of the root still works (the entry is listed), nothing was logged as a crash
    with llfuse.lock:
        names = [n for n, _a, _o in ops.readdir(ops.opendir(ROOT_INO, None), 0)]
    assert b"f" in names
