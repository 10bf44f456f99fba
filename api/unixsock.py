"""The API's unix socket: created private (0600) and published without destroying anything but a
stale socket. Standard library only -- the daemon binds it before the API stack (FastAPI, uvicorn,
pydantic: most of the start-up) is imported, see ``api/early.py``.

Owns: ``bind_unix_socket(path)`` and ``probe_socket(path)``.

Socket rules:
- The socket file is created mode 0600 with no window in which it is accessible to others: it is
  bound inside a fresh 0700 directory next to ``path``, chmod-ed and put in listen state before it
  is published at ``path``.
- Publishing never destroys anything but a stale socket. Nothing at ``path``: ``link()`` (fails with
  EEXIST instead of replacing whatever appeared meanwhile; then the path is examined again). A
  socket whose ``connect()`` succeeds belongs to a live daemon: refused (``AlreadyExists``). One
  whose connect is refused is stale (a dead daemon) and is replaced by an atomic ``rename()``.
  Anything else at ``path`` (regular file, directory, symlink, fifo) is refused (``InvalidArgument``)
  and left untouched.
- Examine-and-publish runs under an exclusive ``flock`` on the socket's parent directory, so two
  daemons starting on the same path together cannot both win (the second one finds the first's
  socket already listening, i.e. live). The lock is held only for that step, not for the daemon's
  life: once published, the listening socket itself is the "a daemon serves here" marker. Locking
  the directory rather than a ``<sock>.lock`` file leaves no lock file behind (a lock file can
  never be removed safely). Processes that do not take the lock (other tools) are still kept from
  being overwritten on the link() path; only the stale-socket rename has a narrow window against them.

Must not import: the API stack, fs/storage/rafs. Thread-safety: functions only, no shared state.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
import tempfile
import time
from collections.abc import Iterator

import structlog

from nydusd.errors import AlreadyExists, InvalidArgument

log = structlog.get_logger(__name__)

SOCKET_MODE = 0o600
BACKLOG = 128
LOCK_TIMEOUT = 10.0
_PUBLISH_ATTEMPTS = 5


def probe_socket(path: str) -> bool | None:
    """``None`` if nothing is at ``path``, ``True`` if a process accepts connections on it, ``False``
    if it is a stale socket. Anything that is not a socket raises InvalidArgument."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(st.st_mode):
        raise InvalidArgument("API socket path is a directory", path=path)
    if not stat.S_ISSOCK(st.st_mode):
        raise InvalidArgument("API socket path exists and is not a socket; refusing to replace it",
                              path=path, file_type=stat.filemode(st.st_mode)[0])
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        try:
            s.connect(path)
        except OSError as e:
            # EAGAIN: the listener exists but its backlog is full, i.e. alive
            return e.errno == errno.EAGAIN
    return True


def bind_unix_socket(path: str) -> socket.socket:
    """A listening unix socket at ``path`` with mode 0600 (see the module docstring).

    Raises AlreadyExists if a live process serves ``path`` (or holds the publishing lock too long),
    InvalidArgument if something other than a socket is at ``path`` or its directory is
    missing/unwritable.
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    try:
        parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise InvalidArgument(f"cannot create the API socket: {e.strerror}", path=path) from None
    try:
        probe_socket(path)  # fail early on a non-socket, before creating anything
        return _bind_in_private_dir(path, parent, parent_fd)
    finally:
        os.close(parent_fd)


def _bind_in_private_dir(path: str, parent: str, parent_fd: int) -> socket.socket:
    try:
        tmpdir = tempfile.mkdtemp(prefix=".nydusd-api-", dir=parent)
    except OSError as e:
        raise InvalidArgument(f"cannot create the API socket: {e.strerror}", path=path) from None
    dirfd = os.open(tmpdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # via /proc/self/fd: short, so a long `path` does not hit the 108-byte sun_path limit here
        sock.bind(f"/proc/self/fd/{dirfd}/s")
        os.chmod("s", SOCKET_MODE, dir_fd=dirfd)
        sock.listen(BACKLOG)
        with _dir_lock(parent_fd, path):
            _publish(dirfd, path)
    except OSError as e:
        sock.close()
        raise InvalidArgument(f"cannot create the API socket: {e.strerror or e}", path=path) from None
    except BaseException:
        sock.close()  # refused (live socket, not a socket) or interrupted
        raise
    finally:
        with contextlib.suppress(OSError):
            os.unlink("s", dir_fd=dirfd)  # still there after link() or a failure
        os.close(dirfd)
        os.rmdir(tmpdir)
    return sock


@contextlib.contextmanager
def _dir_lock(parent_fd: int, path: str) -> Iterator[None]:
    """Exclusive flock on the socket's directory, waited for up to ``LOCK_TIMEOUT`` seconds."""
    deadline = time.monotonic() + LOCK_TIMEOUT
    while True:
        try:
            fcntl.flock(parent_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise AlreadyExists("another process holds the lock on the API socket's directory",
                                    path=path) from None
            time.sleep(0.01)
    try:
        yield
    finally:
        fcntl.flock(parent_fd, fcntl.LOCK_UN)


def _publish(dirfd: int, path: str) -> None:
    """Put the listening socket ``s`` in ``dirfd`` at ``path``; the caller holds the directory lock."""
    for _ in range(_PUBLISH_ATTEMPTS):
        live = probe_socket(path)
        if live:
            raise AlreadyExists("API socket is in use by a live process (another nydusd?)", path=path)
        if live is None:
            try:
                os.link("s", path, src_dir_fd=dirfd, follow_symlinks=False)
            except FileExistsError:
                continue  # something appeared meanwhile: examine it
            return
        os.rename("s", path, src_dir_fd=dirfd)  # stale: replaced in one atomic step
        log.info("api_socket_replaced", path=path, reason="stale")
        return
    raise AlreadyExists("API socket path keeps changing under us; giving up", path=path)
