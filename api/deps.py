"""Request dependencies of the HTTP API: the daemon the routes talk to.

Owns: ``DaemonApi`` (the structural type of what api/ calls on ``nydusd.daemon.service.Daemon``, the
contract in notes/contracts.md), ``get_daemon`` and the ``DaemonDep`` annotation routes use.
Must not import: fs/storage/rafs internals; the real ``Daemon`` class is only named structurally,
so tests can pass any object with these methods (``tests/harness/fakes/daemon.py``).
Thread-safety: every method of the daemon is blocking and thread-safe; routes are plain ``def`` and
run in the server's worker threads.
"""

from __future__ import annotations

from typing import Annotated, Any, Protocol

from fastapi import Depends, Request


class DaemonApi(Protocol):
    """What the API needs from the daemon (blocking, thread-safe, raises NydusError subclasses)."""

    @property
    def state(self) -> str: ...

    def info(self) -> dict[str, Any]: ...

    def events(self) -> Any: ...

    def backend_info(self, mountpoint: str | None) -> dict[str, Any]: ...

    def mount(self, mountpoint: str, source: str, config: str, *, fs_type: str = "rafs",
              prefetch_files: list[str] | None = None) -> None: ...

    def remount(self, mountpoint: str, source: str, config: str, *, fs_type: str = "rafs",
                prefetch_files: list[str] | None = None) -> None: ...

    def umount(self, mountpoint: str) -> None: ...

    def mounts(self) -> dict[str, dict[str, Any]]: ...

    def start(self) -> None: ...

    def exit(self) -> None: ...

    def set_config(self, conf: dict[str, Any]) -> None: ...

    def metrics_fs(self, id: str | None) -> dict[str, Any]: ...

    def metrics_files(self, id: str | None, latest: bool = False) -> Any: ...

    def metrics_pattern(self, id: str | None) -> list[dict[str, Any]]: ...

    def metrics_backend(self, id: str | None) -> dict[str, Any]: ...

    def metrics_blobcache(self, id: str | None) -> dict[str, Any]: ...

    def metrics_inflight(self) -> list[dict[str, Any]]: ...

    def get_config(self, id: str | None) -> dict[str, str]: ...

    def update_config(self, id: str, values: dict[str, Any]) -> None: ...

    def sendfd(self) -> None: ...

    def takeover(self) -> None: ...


def get_daemon(request: Request) -> DaemonApi:
    """The daemon object the app was created with (``create_app(daemon)``)."""
    daemon: DaemonApi = request.app.state.daemon
    return daemon


DaemonDep = Annotated[DaemonApi, Depends(get_daemon)]
