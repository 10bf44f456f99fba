"""Mount routes: ``POST|PUT|DELETE /api/v1/mount`` (spec interfaces.md §3.1, §4.3).

Owns: ``router``. ``POST ?mountpoint=`` mounts, ``PUT ?mountpoint=`` remounts (swaps bootstrap and
backend of an existing RAFS mount), ``DELETE ?mountpoint=`` umounts. The seed's form, ``PUT`` with
no query string and ``{"source", "fstype", "mountpoint", "config"}`` in the body, mounts at the body's
mountpoint; its ``config`` may be a path to a config file, which is read here.
Mountpoints are paths inside the pseudo filesystem and ``prefetch_files`` entries paths inside the
image, checked by the daemon's own rules (``nydusd.daemon.mounts``) before the daemon is called.
Must not import: fs/storage/rafs internals. Thread-safety: plain ``def`` routes run in worker threads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Response

from api.deps import DaemonDep
from api.errors import MOUNTPOINT_QUERY_MESSAGE, RequestError, rust_str
from api.responses import EMPTY, ERRORS, no_content
from api.schemas import MountRequest
from nydusd.daemon.mounts import check_prefetch_paths, mountpoint_path
from nydusd.errors import InvalidArgument

router = APIRouter(prefix="/api/v1/mount", tags=["mount"])

FS_TYPES = ("rafs", "passthrough", "passthroughfs", "passthrough_fs")
MountpointQuery = Annotated[str, Query(description="path inside the pseudo fs, e.g. /<snapshotID>")]
SEED_FORM = ("Without ?mountpoint= (the seed's form) the body's `mountpoint` and `fstype` are used, "
             "`config` may be a config file path, and the filesystem is mounted (not remounted).")


def _shown(path: str) -> str:
    return repr(path if len(path) <= 100 else path[:100] + "...")


def check_mountpoint(mountpoint: str, where: str = "QueryString") -> str:
    """Return ``mountpoint`` if the daemon's mount table accepts it (the Vfs's rules: absolute,
    no ``.``/``..`` component or NUL, within NAME_MAX/PATH_MAX); raise RequestError (400) if not."""
    try:
        mountpoint_path(mountpoint)
    except InvalidArgument as e:
        why = f"invalid mountpoint {_shown(mountpoint)}: {e.message}"
        raise RequestError(f"{where}({rust_str(why)})") from None
    return mountpoint


def check_prefetch_files(files: list[str] | None) -> list[str] | None:
    """``prefetch_files`` if the daemon accepts every entry (absolute paths inside the image, no
    ``..`` component, no NUL); raise RequestError (400) naming the first bad entry if not."""
    try:
        check_prefetch_paths(files)
    except InvalidArgument as e:
        why = f"invalid prefetch_files entry {_shown(str(e.context.get('entry', '')))}: {e.message}"
        raise RequestError(f"ParseBody({rust_str(why)})") from None
    return files


def fs_type_of(body: MountRequest) -> str:
    """The requested filesystem type; raises InvalidArgument (upstream text) for an unknown one."""
    fs_type = body.fs_type or body.fstype or ""
    if fs_type not in FS_TYPES:
        raise InvalidArgument(f"only 'rafs' and 'passthrough_fs' are supported, but {fs_type} was specified")
    return fs_type


def seed_config_text(config: str) -> str:
    """The seed form's ``config``: a config document, or the path of a file holding one."""
    if config.lstrip().startswith(("{", "[")) or "\n" in config or not config.strip():
        return config
    path = Path(config)
    if not path.is_file():
        return config
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise RequestError(f"ParseBody({rust_str(f'cannot read config file {config}: {e}')})") from None


@router.post("", name="mount", status_code=204, responses={**EMPTY, **ERRORS})
def mount(mountpoint: MountpointQuery, body: MountRequest, daemon: DaemonDep) -> Response:
    fs_type = fs_type_of(body)
    daemon.mount(check_mountpoint(mountpoint), body.source, body.config, fs_type=fs_type,
                 prefetch_files=check_prefetch_files(body.prefetch_files))
    return no_content()


@router.put("", name="remount", status_code=204, responses={**EMPTY, **ERRORS}, description=SEED_FORM)
def remount(body: MountRequest, daemon: DaemonDep,
            mountpoint: Annotated[str | None, Query(description="mountpoint to remount")] = None) -> Response:
    fs_type = fs_type_of(body)
    if mountpoint is not None:
        daemon.remount(check_mountpoint(mountpoint), body.source, body.config, fs_type=fs_type,
                       prefetch_files=check_prefetch_files(body.prefetch_files))
        return no_content()
    if body.mountpoint is None:
        raise RequestError(f"QueryString({rust_str(MOUNTPOINT_QUERY_MESSAGE)})")
    daemon.mount(check_mountpoint(body.mountpoint, "ParseBody"), body.source,
                 seed_config_text(body.config), fs_type=fs_type,
                 prefetch_files=check_prefetch_files(body.prefetch_files))
    return no_content()


@router.delete("", name="umount", status_code=204, responses={**EMPTY, **ERRORS})
def umount(mountpoint: MountpointQuery, daemon: DaemonDep) -> Response:
    daemon.umount(check_mountpoint(mountpoint))
    return no_content()
