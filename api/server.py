"""Serving the admin API on a unix socket: uvicorn in a thread, started by the daemon CLI.

Owns: ``start_api_server(daemon, path) -> ApiServer`` (the one entry point nydusd.cli.daemon calls,
after the daemon reached RUNNING, or INIT in upgrade mode; spec interfaces.md §1.6), ``ApiServer``
(``.stop()``, ``.path``, ``.running``), ``probe_socket(path)`` and ``bind_unix_socket(path)``.

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
import fcntl
import os
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import h11
import structlog
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from api.app import create_app
from api.deps import DaemonApi
from nydusd.errors import AlreadyExists, InvalidArgument, NydusError

log = structlog.get_logger(__name__)

KEEP_ALIVE_SECONDS = 10**8
SOCKET_MODE = 0o600
BACKLOG = 128


#: largest request line + headers; beyond it the request is answered 414 (line) or 431 (headers)
MAX_REQUEST_HEAD = 64 << 10
#: after such an answer the rest of the request is read and dropped (at most this much, this long)
#: before the connection closes: closing with unread data would reset the connection, and the
#: client would see ECONNRESET instead of the answer
DRAIN_LIMIT = 64 << 20
DRAIN_SECONDS = 2.0
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


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, except for a request head over ``MAX_REQUEST_HEAD`` bytes: h11
    refuses it, and uvicorn would answer 400 and close at once -- with the rest of a long URL still
    unread, which resets the connection before the client reads anything. Here the answer is 414
    (the request line is incomplete: URI too long) or 431 (headers too large), the write side is
    shut, and what the client still sends is read and dropped (bounded) until it closes."""

    _draining = False
    _drained = 0

    def data_received(self, data: bytes) -> None:
        if self._draining:
            self._drained += len(data)
            if self._drained > DRAIN_LIMIT:
                self.transport.close()
            return
        super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        buffered, _ = self.conn.trailing_data
        if len(buffered) <= MAX_REQUEST_HEAD:
            super().send_400_response(msg)
            return
        line_done = b"\n" in buffered[:MAX_REQUEST_HEAD]
        status = 431 if line_done else 414
        message = ("RequestHeaderFieldsTooLarge" if line_done else "UriTooLong") + (
            f'("request {"headers" if line_done else "line"} longer than {MAX_REQUEST_HEAD} bytes")')
        body = ('{"code":"UNDEFINED","message":' + _json_str(message) + "}").encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close"), (b"server", b"Nydus API")]
        reason = b"Request Header Fields Too Large" if line_done else b"URI Too Long"
        for event in (h11.Response(status_code=status, headers=headers, reason=reason), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        log.info("api_request_refused", status=status, buffered=len(buffered))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._draining = True
        self.loop.call_later(DRAIN_SECONDS, self.transport.close)


def _json_str(text: str) -> str:
    import json

    return json.dumps(text)


def _uvicorn_config(daemon: DaemonApi, **overrides: Any) -> uvicorn.Config:
    options: dict[str, Any] = {
        "lifespan": "off", "ws": "none", "log_config": None, "access_log": False, "server_header": False,
        "http": LimitedH11Protocol, "h11_max_incomplete_event_size": MAX_REQUEST_HEAD,
        "loop": "asyncio", "timeout_keep_alive": KEEP_ALIVE_SECONDS,
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
