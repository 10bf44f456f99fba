"""A supervisor written from the wire protocol description (interfaces.md §1.6), not from nydusd's
code: it listens on a unix socket; for sendfd it accepts one connection and reads until EOF,
keeping the bytes and the (one or more) fds passed along; for takeover it accepts one connection,
writes the stored bytes with the fd attached to the first write, and closes. ``misbehave`` makes
the takeover side disappear, send no fd, or send garbage, for the protocol error tests."""

from __future__ import annotations

import array
import os
import socket
import threading


class SpecSupervisor:
    def __init__(self, path: str) -> None:
        self.path = path
        if os.path.exists(path):
            os.unlink(path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(4)
        self.state: bytes | None = None
        self.fd = -1
        self.received = 0
        self.error: BaseException | None = None

    # like the snapshotter: start waiting, then call the API, then collect
    def expect_sendfd(self, timeout: float = 10.0) -> threading.Thread:
        t = threading.Thread(target=self._guard, args=(self._receive, timeout), daemon=True)
        t.start()
        return t

    def expect_takeover(self, misbehave: str | None = None, timeout: float = 10.0) -> threading.Thread:
        t = threading.Thread(target=self._guard, args=(lambda to: self._send(to, misbehave), timeout),
                             daemon=True)
        t.start()
        return t

    def _guard(self, fn, timeout: float) -> None:
        try:
            fn(timeout)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            self.error = e

    def _receive(self, timeout: float) -> None:
        self.listener.settimeout(timeout)
        conn, _ = self.listener.accept()
        data, fds = b"", []
        with conn:
            while True:
                chunk, anc, _flags, _ = conn.recvmsg(32 << 10, socket.CMSG_SPACE(4 * 8))
                for level, kind, payload in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds += array.array("i", payload[:len(payload) // 4 * 4]).tolist()
                if not chunk:
                    break
                data += chunk
        if not fds:
            raise AssertionError("received no control file descriptor")
        for extra in fds[1:]:
            os.close(extra)
        if self.fd >= 0:
            os.close(self.fd)
        self.state, self.fd = data, fds[0]
        self.received += 1

    def _send(self, timeout: float, misbehave: str | None) -> None:
        self.listener.settimeout(timeout)
        conn, _ = self.listener.accept()
        with conn:
            if misbehave == "disappear":
                return
            if misbehave == "no-fd":
                conn.sendall(self.state or b"{}")
                return
            payload = os.urandom(5000) if misbehave == "garbage" else (self.state or b"")
            if misbehave == "truncated":
                payload = payload[:len(payload) // 2]
            fd = self.fd if self.fd >= 0 else os.open("/dev/null", os.O_RDONLY)
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
            sent = conn.sendmsg([payload[:1000]], rights)
            conn.sendall(payload[sent:])
            if fd != self.fd:
                os.close(fd)

    def close(self) -> None:
        self.listener.close()
        if os.path.exists(self.path):
            os.unlink(self.path)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
