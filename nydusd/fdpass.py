"""File descriptors over unix sockets (SCM_RIGHTS): the receive side both fd protocols share.

Owns: ``recv_with_fds`` (one ``recvmsg`` with the fds passed along decoded) and ``close_fds``
(close every fd of a list, ignoring ones already gone). Used by the supervisor protocol
(``daemon/upgrade.py``) and the vhost-user protocol (``virtiofs/vhost_user.py``), which must
close every fd they receive on a failing path.

A leaf (standard library only), shorter than a module usually is: it is the one home of this
helper for two layers that may not import each other. Thread-safety: stateless.
"""

from __future__ import annotations

import array
import os
import socket


def recv_with_fds(sock: socket.socket, size: int, max_fds: int) -> tuple[bytes, list[int], int]:
    """One ``recvmsg`` of up to ``size`` bytes: ``(data, fds, msg_flags)``. Every fd received is
    in ``fds`` (the caller owns them), also when ``msg_flags`` has ``MSG_CTRUNC`` (more than
    ``max_fds`` were sent: the kernel closed the rest). Raises OSError (nothing received)."""
    ints = array.array("i")
    data, ancdata, msg_flags, _addr = sock.recvmsg(size, socket.CMSG_SPACE(max_fds * ints.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            ints.frombytes(payload[:len(payload) - len(payload) % ints.itemsize])
    return data, list(ints), msg_flags


def close_fds(fds: list[int]) -> None:
    """Close each fd; one already closed (EBADF) or failing to close is skipped."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
