"""The FUSE mountpoint before nydusd mounts on it: what is there, and clearing a dead FUSE mount.

Owns: ``inspect(path) -> Mountpoint`` (missing / not a directory / free directory / live mount /
dead FUSE mount) and ``detach(path)`` (lazy unmount: ``umount2(MNT_DETACH)``, falling back to
``fusermount -u -z`` when we may not unmount ourselves), plus ``check_mountable(path)``: the
start-up policy for the no-takeover case.

Why: a nydusd killed with SIGKILL leaves its FUSE mount behind; every access to it answers
``ENOTCONN`` ("Transport endpoint is not connected"). nydus-snapshotter's ``recover_policy =
"restart"`` starts a plain nydusd (no ``--supervisor``, no ``--upgrade``) on that same mountpoint,
after its own unmount of it failed. With no supervisor to hand the old FUSE connection over, the
dead mount can only be detached and mounted afresh. With a supervisor, the caller keeps spec
§1.6's crash detection instead (stay INIT, wait for a takeover) and must not call ``detach``.

Must not import: the daemon, the API, llfuse. Called from the main thread at start-up only.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass

from nydusd.errors import InvalidArgument, NydusError
from nydusd.log import get_logger

log = get_logger(__name__)

MNT_DETACH = 2  # <sys/mount.h>
UMOUNT_NOFOLLOW = 8


class State(enum.Enum):
    MISSING = "missing"
    NOT_DIR = "not a directory"
    FREE = "free"            # a directory with nothing mounted on it
    LIVE_MOUNT = "mounted"   # something answers there already (another nydusd, any file system)
    DEAD_FUSE = "dead FUSE mount"  # ENOTCONN: the FUSE daemon behind the mount is gone


@dataclass(frozen=True)
class Mountpoint:
    path: str
    state: State
    fstype: str | None = None  # of the mount at ``path`` (from /proc/self/mountinfo), if any
    error: str | None = None   # strerror of the failed stat, if any


def mount_type(path: str) -> str | None:
    """File system type of the topmost mount exactly at ``path`` (None: not a mount point)."""
    found = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) > 4 and _unescape(fields[4]) == path and right:
                    found = right.split()[0]
    except OSError:
        return None
    return found


def _unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (space, tab, newline, backslash)."""
    for code, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, ch)
    return field


def inspect(path: str) -> Mountpoint:
    """Classify ``path`` (an absolute, canonical path). Never raises for the path's state."""
    fstype = mount_type(path)
    if fstype is not None:
        # statfs is never answered from the kernel's caches (a stat of the mount's root may be, for
        # as long as its attributes stay valid): on a FUSE mount whose daemon is gone it is ENOTCONN.
        try:
            os.statvfs(path)
        except OSError as e:
            if e.errno == errno.ENOTCONN:
                return Mountpoint(path, State.DEAD_FUSE, fstype, e.strerror)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if fstype is not None:  # a mount whose root vanished: treat like a dead mount
            return Mountpoint(path, State.DEAD_FUSE if fstype.startswith("fuse") else State.LIVE_MOUNT,
                              fstype, "No such file or directory")
        return Mountpoint(path, State.MISSING)
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            return Mountpoint(path, State.DEAD_FUSE, fstype, e.strerror)
        if e.errno == errno.ENOTDIR:
            return Mountpoint(path, State.MISSING, fstype, e.strerror)  # a parent is not a directory
        # anything else (EACCES, EIO from a sick daemon ...): something is mounted or in the way
        return Mountpoint(path, State.LIVE_MOUNT if fstype else State.NOT_DIR, fstype, e.strerror)
    if fstype is not None:
        return Mountpoint(path, State.LIVE_MOUNT, fstype)
    if not stat.S_ISDIR(st.st_mode):
        return Mountpoint(path, State.NOT_DIR)
    return Mountpoint(path, State.FREE)


def detach(path: str) -> str:
    """Lazily unmount ``path`` (the kernel drops it once no one uses it). Returns how it was done
    (``umount2`` or ``fusermount``). Raises NydusError when neither works."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(path), MNT_DETACH | UMOUNT_NOFOLLOW) == 0:
        return "umount2"
    err = ctypes.get_errno()
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is not None:
        res = subprocess.run([tool, "-u", "-z", path], capture_output=True, text=True, check=False)
        if res.returncode == 0:
            return os.path.basename(tool)
        detail = res.stderr.strip()
    else:
        detail = "no fusermount"
    raise NydusError(f"cannot unmount the dead FUSE mount at {path}: {os.strerror(err)}; {detail}",
                     mountpoint=path)


def check_mountable(path: str) -> None:
    """Make ``path`` ready for a fresh FUSE mount when no takeover is possible (no supervisor).

    A dead FUSE mount is detached lazily (logged as ``stale_fuse_mount_detached``) -- more than one
    when a crashed daemon's mount was stacked on another. Raises InvalidArgument with a message
    naming ``path`` when it is missing, not a directory, or already a live FUSE mount point (another
    file system mounted there, a tmpfs or a bind mount, is a legitimate place to mount on).
    """
    for _ in range(8):  # stacked dead mounts: one detach each
        mp = inspect(path)
        if mp.state is State.FREE:
            return
        if mp.state is State.MISSING:
            raise InvalidArgument(f"mountpoint {path} does not exist (create the directory first)",
                                  mountpoint=path)
        if mp.state is State.NOT_DIR:
            raise InvalidArgument(f"mountpoint {path} is not a directory"
                                  + (f": {mp.error}" if mp.error else ""), mountpoint=path)
        if mp.state is State.LIVE_MOUNT and not (mp.fstype or "").startswith("fuse"):
            return  # e.g. an empty tmpfs or a bind mount: a legitimate place to mount on
        if mp.state is State.LIVE_MOUNT:
            raise InvalidArgument(f"{path} is already a mount point ({mp.fstype}); "
                                  "is another nydusd serving it?", mountpoint=path)
        how = detach(path)
        log.warning("stale_fuse_mount_detached", mountpoint=path, fstype=mp.fstype, error=mp.error,
                    via=how)
    raise InvalidArgument(f"{path}: too many dead FUSE mounts stacked on it", mountpoint=path)
