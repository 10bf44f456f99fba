"""Hot upgrade and failover glue: the daemon's side of ``sendfd`` and ``takeover``.

Owns: ``send_to_supervisor`` (collect the mount table, the Vfs layout and what FUSE INIT negotiated
into an ``UpgradeState`` and push it with the ``/dev/fuse`` fd to the supervisor) and
``restore_from_supervisor`` (fetch them back, re-create every mount at its old Vfs index and adopt
the FUSE connection in a new ``DevFuseSession``). The wire protocol is ``daemon/upgrade.py``; the
state machine around both calls is ``Daemon`` (``daemon/service.py``).

Must not import: the API, llfuse. Errors: UpgradeError, and what a mount raises; a failed restore
detaches and closes the mounts it had restored and closes the received fd.
Threading: called on the API thread under the daemon's takeover lock / the table's lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

from nydusd.daemon import upgrade
from nydusd.daemon.instance import RafsInstance
from nydusd.daemon.mounts import MountTable, check_fs_type
from nydusd.errors import NydusError
from nydusd.fs.devfuse import DevFuseSession
from nydusd.fs.vfs import normalize_path


def send_to_supervisor(supervisor: str, daemon_id: str | None, mountpoint: str,
                       session: DevFuseSession, table: MountTable) -> None:
    """``PUT /daemon/fuse/sendfd``: the state and the session's fd to ``supervisor``.
    Raises UpgradeError."""
    deadline = time.monotonic() + 1.0  # the kernel's INIT is answered right after the mount
    while not session.engine.initialized and time.monotonic() < deadline:
        time.sleep(0.005)
    with table.lock:
        layout = table.vfs.layout()
        mounts = [upgrade.MountState(
            mountpoint=path, index=layout["mounts"][path], source=inst.source,
            config=json.dumps(inst.config.to_dict(redact=False)), fs_type=inst.fs_type,
            prefetch_files=inst.prefetch_files) for path, inst in table.instances.items()]
    state = upgrade.UpgradeState(daemon_id=daemon_id, mountpoint=mountpoint,
                                 fuse=session.engine.export_state(), pseudo=layout["pseudo"],
                                 next_index=layout["next_index"], mounts=mounts)
    upgrade.send_state(supervisor, state.encode(), session.fd)


def restore_from_supervisor(supervisor: str, mountpoint: str, table: MountTable, *, threads: int,
                            writable: bool, failover_policy: str) -> DevFuseSession:
    """``PUT /daemon/fuse/takeover``: the adopted session, every mount of the state restored at its
    old Vfs index (mounts made before give way). Raises UpgradeError and what a mount raises."""
    data, fd = upgrade.fetch_state(supervisor)
    try:
        state = upgrade.UpgradeState.decode(data)
        if state.mountpoint != mountpoint:
            raise upgrade.UpgradeError("the supervisor's state is for another mountpoint",
                                       state_mountpoint=state.mountpoint, mountpoint=mountpoint)
        return _restore(state, fd, mountpoint, table, threads=threads, writable=writable,
                        failover_policy=failover_policy)
    except BaseException:
        os.close(fd)
        raise


def _restore(state: upgrade.UpgradeState, fd: int, mountpoint: str, table: MountTable, *,
             threads: int, writable: bool, failover_policy: str) -> DevFuseSession:
    vfs = table.vfs
    table.close_all()  # restore wins over mounts made in INIT (spec: as upstream)
    for path in list(vfs.mounts()):
        vfs.detach(path)
    built: dict[str, RafsInstance] = {}
    try:
        vfs.restore_layout(state.pseudo, state.next_index)
        for m in state.mounts:
            check_fs_type(m.fs_type)
            inst = table.build(normalize_path(m.mountpoint), m.source, m.config, m.prefetch_files)
            built[inst.mountpoint] = inst
            vfs.attach(inst.mountpoint, inst.fs, inst.stats, index=m.index)
        session = DevFuseSession(vfs, mountpoint, threads=threads, writable=writable,
                                 failover_policy=failover_policy)
        session.adopt(fd, state.fuse)
    except BaseException:
        for path, inst in built.items():
            with contextlib.suppress(NydusError):
                vfs.detach(path)
            inst.close()
        raise
    table.replace_all(built)
    return session
