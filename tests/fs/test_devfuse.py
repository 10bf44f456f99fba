"""DevFuseSession pieces that need no kernel mount (the real-mount suites run over it too)."""

from __future__ import annotations

import os

import pytest

from nydusd.errors import NydusError
from nydusd.fs.devfuse import DevFuseSession
from nydusd.fs.vfs import Vfs


def test_stop_after_close_writes_nothing(tmp_path):
    session = DevFuseSession(Vfs(), str(tmp_path))
    session.close(unmount=False)
    # the stop pipe's descriptor may already belong to another file: a late stop (a signal during
    # shutdown) must not write into it
    other = os.open(tmp_path / "reused", os.O_CREAT | os.O_WRONLY)
    try:
        session.stop("late signal")
        assert os.fstat(other).st_size == 0
    finally:
        os.close(other)


def test_adopt_refuses_a_fd_that_is_not_dev_fuse(tmp_path):
    session = DevFuseSession(Vfs(), str(tmp_path))
    fd = os.open("/dev/null", os.O_RDWR)
    try:
        with pytest.raises(NydusError, match="not /dev/fuse"):
            session.adopt(fd, {"minor": 31, "max_read": 1 << 20, "initialized": 1})
        with pytest.raises(NydusError, match="unusable FUSE connection state"):
            DevFuseSession(Vfs(), str(tmp_path)).adopt(fd, {"minor": 1})
    finally:
        os.close(fd)
        session.close(unmount=False)


def test_unknown_failover_policy_is_refused(tmp_path):
    with pytest.raises(NydusError, match="failover policy"):
        DevFuseSession(Vfs(), str(tmp_path), failover_policy="retry")
