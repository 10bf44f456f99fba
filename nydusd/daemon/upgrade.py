"""The supervisor protocol: a daemon's state bytes plus its ``/dev/fuse`` fd, out and back in.

Owns: ``UpgradeState`` (what a successor needs to serve the same FUSE connection: daemon id,
mountpoint, every mount with its source, config, fs type, prefetch list and Vfs mount index, the
pseudo directory inodes, what FUSE INIT negotiated) and its byte encoding; the two client sides
of the wire protocol (both connections are initiated by nydusd to the ``--supervisor`` unix
socket, where the supervisor listens):

* ``send_state`` (``PUT /api/v1/daemon/fuse/sendfd``): connect, write the state bytes, the first
  write carrying exactly one fd as SCM_RIGHTS, close.
* ``fetch_state`` (``PUT /api/v1/daemon/fuse/takeover``): connect, read until EOF (first read
  buffer 32 KiB) collecting the fd the supervisor attaches; no fd is an error.

and ``SupervisorStore``, the supervisor side (listen, receive one state, hand it back), used by
``nydusctl supervise`` and usable by anyone who wants to supervise nydusd without the snapshotter.

The state is JSON with a magic and a version: same-implementation hand-over only (upstream's Rust
daemon writes a versionize blob; the snapshotter treats the bytes as opaque either way).

Must not import: the rest of the daemon, the API, fs. Errors are ``UpgradeError`` (a NydusError) with a text
saying what went wrong; every fd received on a failing path is closed.

Threading: every function is self-contained (own socket); ``SupervisorStore`` methods are called
from one thread at a time.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
from dataclasses import asdict, dataclass, field

from nydusd.errors import NydusError
from nydusd.fdpass import close_fds, recv_with_fds
from nydusd.log import get_logger

log = get_logger(__name__)

MAGIC = "nydus-py-upgrade"
VERSION = 1
#: the first read of a takeover (as upstream)
FIRST_READ = 32 << 10
#: a state bigger than this is not ours (thousands of mounts fit easily)
MAX_STATE = 64 << 20
MAX_FDS = 16
DEFAULT_TIMEOUT = 10.0


class UpgradeError(NydusError):
    """The supervisor is unreachable, sent no fd, or sent a state we cannot use (HTTP 500)."""

    code = "UPGRADE"


@dataclass
class MountState:
    mountpoint: str
    index: int
    source: str
    config: str
    fs_type: str = "rafs"
    prefetch_files: list[str] | None = None


@dataclass
class UpgradeState:
    daemon_id: str | None
    mountpoint: str
    fuse: dict[str, int]
    pseudo: dict[str, int] = field(default_factory=dict)
    next_index: int = 1
    mounts: list[MountState] = field(default_factory=list)

    def encode(self) -> bytes:
        return json.dumps({"magic": MAGIC, "version": VERSION, **asdict(self)},
                          separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> UpgradeState:
        """Parse and check the bytes a supervisor handed back. Raises UpgradeError."""
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise UpgradeError(f"the supervisor's state is not ours (not JSON: {e})",
                               size=len(data)) from None
        if not isinstance(doc, dict) or doc.get("magic") != MAGIC:
            raise UpgradeError("the supervisor's state is not ours (no nydus-py magic)", size=len(data))
        if doc.get("version") != VERSION:
            raise UpgradeError("unsupported state version", version=doc.get("version"))
        try:
            mounts = [MountState(**m) for m in doc["mounts"]]
            state = cls(daemon_id=doc["daemon_id"], mountpoint=doc["mountpoint"],
                        fuse={k: int(v) for k, v in doc["fuse"].items()},
                        pseudo={str(k): int(v) for k, v in doc["pseudo"].items()},
                        next_index=int(doc["next_index"]), mounts=mounts)
            for mount in mounts:
                if not (isinstance(mount.mountpoint, str) and isinstance(mount.source, str)
                        and isinstance(mount.config, str) and isinstance(mount.index, int)):
                    raise TypeError(f"bad mount record {mount!r}")
            if not isinstance(state.mountpoint, str):
                raise TypeError("mountpoint is not a string")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UpgradeError(f"the supervisor's state is incomplete or malformed: {e!r}") from None
        return state


def _connect(path: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as e:
        sock.close()
        raise UpgradeError(f"cannot connect to the supervisor: {e.strerror or e}",
                           supervisor=path) from None
    return sock


def _send_with_fd(sock: socket.socket, data: bytes, fd: int) -> None:
    """``data`` with ``fd`` attached to the first write (at most FIRST_READ bytes, what the other
    side reads first). Raises OSError."""
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
    sent = sock.sendmsg([data[:FIRST_READ]], rights)
    sock.sendall(data[sent:])


def send_state(path: str, data: bytes, fd: int, timeout: float = DEFAULT_TIMEOUT) -> None:
    """sendfd: ``data`` with ``fd`` attached to the first write. Raises UpgradeError."""
    sock = _connect(path, timeout)
    try:
        _send_with_fd(sock, data, fd)
    except OSError as e:
        raise UpgradeError(f"sending the state to the supervisor failed: {e.strerror or e}",
                           supervisor=path) from None
    finally:
        sock.close()
    log.info("upgrade_state_sent", supervisor=path, size=len(data))


def _recv_all(sock: socket.socket, what: str) -> tuple[bytes, list[int]]:
    """Read until EOF, collecting every fd passed along. Raises UpgradeError (fds closed)."""
    chunks: list[bytes] = []
    fds: list[int] = []
    size = 0
    try:
        while True:
            data, received, flags = recv_with_fds(sock, FIRST_READ if not chunks else 1 << 20, MAX_FDS)
            fds.extend(received)
            if flags & socket.MSG_CTRUNC:
                raise UpgradeError(f"{what}: too many file descriptors")
            if not data:
                break
            chunks.append(data)
            size += len(data)
            if size > MAX_STATE:
                raise UpgradeError(f"{what}: state larger than {MAX_STATE} bytes")
    except OSError as e:
        close_fds(fds)
        raise UpgradeError(f"{what}: {e.strerror or e}") from None
    except UpgradeError:
        close_fds(fds)
        raise
    return b"".join(chunks), fds


def fetch_state(path: str, timeout: float = DEFAULT_TIMEOUT) -> tuple[bytes, int]:
    """takeover: the state bytes and the fd the supervisor holds. Raises UpgradeError."""
    sock = _connect(path, timeout)
    try:
        data, fds = _recv_all(sock, "receiving the state from the supervisor failed")
    finally:
        sock.close()
    if not fds:
        raise UpgradeError("received no control file descriptor from the supervisor",
                           supervisor=path, size=len(data))
    close_fds(fds[1:])
    log.info("upgrade_state_received", supervisor=path, size=len(data))
    return data, fds[0]


class SupervisorStore:
    """The supervisor side: listens on ``path``; ``receive`` takes one sendfd, ``serve`` answers
    one takeover with what was received last. Keeps the fd open (that keeps the FUSE connection
    alive while no daemon holds it)."""

    def __init__(self, path: str) -> None:
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.bind(path)
        self.sock.listen(8)
        self.state: bytes | None = None
        self.fd = -1

    def _accept(self, timeout: float, failure: str) -> socket.socket:
        """The next connection within ``timeout`` seconds. Raises UpgradeError(``failure``)."""
        self.sock.settimeout(timeout)
        try:
            conn, _ = self.sock.accept()
        except OSError as e:
            raise UpgradeError(f"{failure}: {e}") from None
        return conn

    def receive(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Accept one sendfd connection. Raises UpgradeError (the previous state is kept)."""
        with self._accept(timeout, "no daemon sent its state") as conn:
            conn.settimeout(timeout)
            data, fds = _recv_all(conn, "receiving a daemon's state failed")
        if not fds:
            raise UpgradeError("received no control file descriptor", size=len(data))
        close_fds(fds[1:])
        if self.fd >= 0:
            os.close(self.fd)
        self.state, self.fd = data, fds[0]

    def serve(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Answer one takeover connection with the stored state and fd. Raises UpgradeError."""
        if self.state is None:
            raise UpgradeError("no state to hand over")
        with self._accept(timeout, "no daemon came for the state") as conn:
            try:
                _send_with_fd(conn, self.state, self.fd)
            except OSError as e:
                raise UpgradeError(f"handing the state over failed: {e.strerror or e}") from None

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

