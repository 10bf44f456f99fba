"""Serving the admin API on a unix socket: uvicorn in a thread, started by the daemon CLI.

Owns: ``start_api_server(daemon, path) -> ApiServer`` (the one entry point nydusd.cli.daemon calls,
after the daemon reached RUNNING, or INIT in upgrade mode; spec interfaces.md §1.6), ``ApiServer``
(``.stop()``, ``.path``, ``.running``), ``probe_socket(path)`` and ``bind_unix_socket(path)``.

Socket rules:
- The socket file is created mode 0600 with no window in which it is accessible to others: it is
  bound inside a fresh 0700 directory next to ``path``, chmod-ed, put in listen state, then renamed
  onto ``path`` (rename is atomic and also replaces a stale socket in one step).
- An existing socket whose ``connect()`` succeeds belongs to a live daemon: refused
  (``AlreadyExists``). One whose connect is refused is stale (a dead daemon) and is replaced; so is
  any other non-directory file, as upstream deletes whatever is at the path.
- Idle keep-alive connections are never closed by the server (``KEEP_ALIVE_SECONDS`` is ~3 years):
  nydus-snapshotter holds one idle connection per daemon and treats a hang-up as daemon death.

Must not import: fs/storage/rafs internals. Threading contract: the server runs its own asyncio
loop in the thread ``nydusd-api``; routes run in that loop's worker threads. ``stop()`` is called
from any thread except a request handler (use ``stop(wait=False)`` there). uvicorn installs no
signal handlers outside the main thread, so the daemon keeps its own.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import tempfile
import threading
import time
from typing import Any

import structlog
import uvicorn

from api.app import create_app
from api.deps import DaemonApi
from nydusd.errors import AlreadyExists, InvalidArgument, NydusError

log = structlog.get_logger(__name__)

KEEP_ALIVE_SECONDS = 10**8
SOCKET_MODE = 0o600
BACKLOG = 128


def probe_socket(path: str) -> bool | None:
    """``None`` if nothing is at ``path``, ``True`` if a process accepts connections on it, ``False``
    if it is a stale socket (or not a socket at all)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISSOCK(st.st_mode):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        try:
            s.connect(path)
        except OSError as e:
            # EAGAIN: the listener exists but its backlog is full, i.e. alive
            return e.errno == errno.EAGAIN
    return True


def _check_target(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        raise InvalidArgument("API socket path is a directory", path=path)
    live = probe_socket(path)
    if live:
        raise AlreadyExists("API socket is in use by a live process (another nydusd?)", path=path)
    if live is False:
        log.info("api_socket_replaced", path=path, reason="stale")


def bind_unix_socket(path: str) -> socket.socket:
    """A listening unix socket at ``path`` with mode 0600 (see the module docstring).

    Raises AlreadyExists if a live process serves ``path``, InvalidArgument if ``path`` is a
    directory or its directory is missing/unwritable.
    """
    path = os.path.abspath(path)
    _check_target(path)
    parent = os.path.dirname(path)
    try:
        tmpdir = tempfile.mkdtemp(prefix=".nydusd-api-", dir=parent)
    except OSError as e:
        raise InvalidArgument(f"cannot create the API socket: {e.strerror}", path=path) from None
    dirfd = os.open(tmpdir, os.O_RDONLY | os.O_DIRECTORY)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # via /proc/self/fd: short, so a long `path` does not hit the 108-byte sun_path limit here
        sock.bind(f"/proc/self/fd/{dirfd}/s")
        os.chmod("s", SOCKET_MODE, dir_fd=dirfd)
        sock.listen(BACKLOG)
        os.rename("s", path, src_dir_fd=dirfd)
    except OSError as e:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink("s", dir_fd=dirfd)
        raise InvalidArgument(f"cannot create the API socket: {e.strerror or e}", path=path) from None
    finally:
        os.close(dirfd)
        os.rmdir(tmpdir)
    return sock


class ApiServer:
    """A running API server; ``stop()`` shuts it down and removes its socket file."""

    def __init__(self, server: uvicorn.Server, thread: threading.Thread, path: str,
                 inode: tuple[int, int]) -> None:
        self._server = server
        self._thread = thread
        self.path = path
        self._inode = inode

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, wait: bool = True, timeout: float = 10.0) -> None:
        """Stop serving: close the listener and idle connections, let in-flight requests finish
        (bounded by ``timeout``), then remove the socket file if it is still ours.

        ``wait=False`` only asks the server to stop (safe from inside a request handler).
        """
        self._server.should_exit = True
        if not wait:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout)
        self._remove_socket()
        log.info("api_server_stopped", path=self.path)

    def _remove_socket(self) -> None:
        # only our own file: a successor may already serve a new socket at the same path
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)


def _uvicorn_config(daemon: DaemonApi, **overrides: Any) -> uvicorn.Config:
    options: dict[str, Any] = {
        "lifespan": "off", "log_config": None, "access_log": False, "server_header": False,
        "http": "h11", "loop": "asyncio", "timeout_keep_alive": KEEP_ALIVE_SECONDS,
        "timeout_graceful_shutdown": 5,
    }
    options.update(overrides)
    return uvicorn.Config(create_app(daemon), **options)


def start_api_server(daemon: DaemonApi, path: str, *, startup_timeout: float = 10.0,
                     **uvicorn_options: Any) -> ApiServer:
    """Serve the API of ``daemon`` on the unix socket ``path`` in a background thread.

    Returns once the server accepts requests. Raises AlreadyExists (a live process serves ``path``),
    InvalidArgument (unusable path) or NydusError (the server failed to start).
    """
    sock = bind_unix_socket(path)
    st = os.lstat(os.path.abspath(path))
    server = uvicorn.Server(_uvicorn_config(daemon, **uvicorn_options))
    thread = threading.Thread(target=_serve, args=(server, sock), name="nydusd-api", daemon=True)
    thread.start()
    handle = ApiServer(server, thread, os.path.abspath(path), (st.st_dev, st.st_ino))
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            handle.stop(timeout=1.0)
            raise NydusError("the API server failed to start", path=path)
        time.sleep(0.005)
    log.info("api_server_started", path=handle.path, mode=oct(stat.S_IMODE(st.st_mode)))
    return handle


#: the name nydusd.cli.daemon looks up first
start = start_api_server


def _serve(server: uvicorn.Server, sock: socket.socket) -> None:
    try:
        server.run(sockets=[sock])
    except BaseException as e:  # noqa: BLE001 - a thread must report, not die silently
        log.exception("api_server_crashed", error=str(e))
    finally:
        sock.close()
