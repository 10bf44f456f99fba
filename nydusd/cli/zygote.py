"""The nydusd zygote: a process that has imported everything a daemon needs, and forks a daemon
for each ``nydusd`` started with ``$NYDUSD_ZYGOTE`` set -- so that a daemon per image starts in
the time of a fork and a mount, not of a Python start-up (issue 13; nydus-snapshotter's default
mode starts one nydusd per image, and every container start waits for it).

    nydusd-zygote --socket /run/nydusd/zygote.sock       # e.g. a service next to the snapshotter
    NYDUSD_ZYGOTE=/run/nydusd/zygote.sock nydusd …         # in the snapshotter's environment

Owns: the zygote server (``serve``), the daemon side of a fork (``_child``) and the client side
(``run_via_zygote``, called by ``nydusd/cli/launch.py``, the ``nydusd`` entry point).

The ``nydusd`` process the caller started stays the one it knows (its pid, its exit status, its
signals): it sends the zygote its arguments, working directory, umask, environment and stdin/stdout/
stderr (SCM_RIGHTS over a SOCK_SEQPACKET unix socket), then waits. The forked daemon gets those,
joins the caller's cgroups and runs ``nydusd.cli.daemon.main`` with the arguments. The caller
forwards the signals it gets (SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2) to the daemon
and exits with the daemon's status (a daemon killed by a signal: the caller kills itself with it).
If the caller is killed (SIGKILL), the daemon kills itself at once (it watches a pidfd of the
caller): to the caller's parent, the daemon is that process. Stopping the zygote (SIGTERM) leaves
its daemons running; their callers then wait for them on a pidfd, still forwarding signals.

Refusals (the caller then starts the daemon itself, as without a zygote, and says why on stderr):
no zygote at the path, another user (``SO_PEERCRED``), or another mount/pid/network namespace than
the zygote's (a fork would mount in the wrong one).

Must not import at module level: anything but the few standard modules the caller needs (it runs
in every ``nydusd`` start, often with a cold page cache). Threading: the zygote is single-threaded
(it forks); a forked daemon starts its threads after the fork.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
from typing import Any

ZYGOTE_ENV = "NYDUSD_ZYGOTE"
#: largest request (argv + environment); a SOCK_SEQPACKET message is read whole
MAX_MESSAGE = 1 << 20
#: signals the caller passes on to its daemon
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2)
NAMESPACES = ("mnt", "pid", "net")
#: what the zygote imports before it forks anything: the whole start and serving path
PRELOAD = ("nydusd.cli.daemon", "nydusd.daemon.service", "nydusd.daemon.instance",
           "nydusd.fs.session", "nydusd.fs.devfuse", "nydusd.storage.backend.localfs",
           "nydusd.storage.backend.registry", "nydusd.daemon.handover", "api.early", "api.server")


# -- the caller ----------------------------------------------------------------------------------


def run_via_zygote(path: str, argv: list[str]) -> int | None:
    """Have the zygote at ``path`` fork the daemon for ``argv``; its exit status, or None when the
    zygote cannot (the caller then runs the daemon itself)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(5.0)
        sock.connect(path)
        umask = os.umask(0o022)
        os.umask(umask)
        request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ),
                              "umask": umask}).encode()
        socket.send_fds(sock, [request], [_open_fd(0), _open_fd(1), _open_fd(2)])
        reply = json.loads(sock.recv(MAX_MESSAGE) or b"{}")
    except (OSError, ValueError) as e:
        sock.close()
        _note(f"zygote {path} unavailable ({getattr(e, 'strerror', None) or e}); starting here")
        return None
    if "pid" not in reply:
        sock.close()
        _note(f"zygote {path} refused: {reply.get('error', 'no reason')}; starting here")
        return None
    child = int(reply["pid"])

    def forward(signum: int, _frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    sock.settimeout(None)
    data = sock.recv(4096)  # retried after a forwarded signal's handler (PEP 475)
    sock.close()
    end = json.loads(data) if data else {}
    if "signal" in end:
        signal.signal(end["signal"], signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [end["signal"]])
        os.kill(os.getpid(), end["signal"])
    if "exit" in end:
        return int(end["exit"])
    # the zygote stopped (a restart, an upgrade): its daemons live on, so this waits for ours
    # itself -- ending here would make the daemon kill itself -- and then knows no exit status
    _note(f"zygote {path} went away; waiting for daemon {child} (its exit status will be unknown)")
    _wait_for(child)
    return 0


def _wait_for(pid: int) -> None:
    import select

    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        select.select([fd], [], [])  # readable once the process ended; retried after signals
    finally:
        os.close(fd)


def _open_fd(fd: int) -> int:
    try:
        os.fstat(fd)
        return fd
    except OSError:
        return os.open(os.devnull, os.O_RDWR)


def _note(text: str) -> None:
    with contextlib.suppress(OSError):
        sys.stderr.write(f"nydusd: {text}\n")
        sys.stderr.flush()


# -- the zygote ----------------------------------------------------------------------------------


def serve(path: str) -> int:
    """Import the daemon, listen on ``path`` (0600), fork a daemon per request until SIGTERM/SIGINT."""
    import gc
    import importlib
    import selectors

    for module in PRELOAD:
        importlib.import_module(module)
    gc.collect()
    gc.freeze()  # what the import built is never collected again: its pages stay shared
    listener = _listen(path)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    stop: list[int] = []
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTERM, lambda n, _f: stop.append(n))
    signal.signal(signal.SIGINT, lambda n, _f: stop.append(n))
    callers: dict[int, socket.socket] = {}  # daemon pid -> its caller's connection
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    _log(event="zygote_ready", path=path, pid=os.getpid(), modules=len(sys.modules))
    while not stop:
        for key, _ in sel.select():
            if key.fileobj is listener:
                with contextlib.suppress(BlockingIOError, InterruptedError):
                    conn, _addr = listener.accept()
                    _fork_daemon(conn, listener, (wake_r, wake_w), callers)
            else:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 4096)
                _reap(callers)
    listener.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    _log(event="zygote_stopped", signal=stop[0], daemons=len(callers))
    return 0


def _listen(path: str) -> socket.socket:
    import stat

    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
        try:
            probe.connect(path)
        except FileNotFoundError:
            pass
        except ConnectionRefusedError:
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise SystemExit(f"nydusd-zygote: {path} exists and is not a socket") from None
            os.unlink(path)  # the socket of a dead zygote
        except OSError as e:
            raise SystemExit(f"nydusd-zygote: {path}: {e.strerror}") from None
        else:
            raise SystemExit(f"nydusd-zygote: a zygote already serves {path}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)  # 0600 from the start: the socket forks daemons as our user
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _refusal(caller_pid: int, caller_uid: int) -> str | None:
    if caller_uid != os.getuid():
        return f"caller uid {caller_uid} is not the zygote's ({os.getuid()})"
    for ns in NAMESPACES:
        try:
            if os.stat(f"/proc/{caller_pid}/ns/{ns}").st_ino != os.stat(f"/proc/self/ns/{ns}").st_ino:
                return f"the caller runs in another {ns} namespace"
        except OSError as e:
            return f"cannot read the caller's {ns} namespace: {e.strerror}"
    return None


def _fork_daemon(conn: socket.socket, listener: socket.socket, wake: tuple[int, int],
                 callers: dict[int, socket.socket]) -> None:
    """Serve one caller: check it, fork its daemon, tell it the daemon's pid (or why not)."""
    import struct

    fds: list[int] = []
    caller = child = -1
    try:
        conn.setblocking(True)
        conn.settimeout(5.0)
        pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                             struct.calcsize("3i")))
        msg, fds, _flags, _addr = socket.recv_fds(conn, MAX_MESSAGE, 3)
        refusal = _refusal(pid, uid)
        if refusal is None and len(fds) != 3:
            refusal = "expected stdin, stdout and stderr"
        if refusal is not None:
            _log(event="zygote_refused", caller=pid, reason=refusal)
            conn.send(json.dumps({"error": refusal}).encode())
            return
        request = json.loads(msg)
        caller = os.pidfd_open(pid)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        child = os.fork()
        if child == 0:
            _child(request, fds, caller, pid, (conn, listener), wake)  # never returns
    except (OSError, ValueError) as e:
        _log(event="zygote_request_failed", error=str(e))
        with contextlib.suppress(OSError):
            conn.send(json.dumps({"error": f"zygote: {e}"}).encode())
        return
    finally:
        # the caller's stdin/stdout/stderr are the daemon's now (or nobody's): held here, their
        # readers would never see EOF
        for fd in fds:
            os.close(fd)
        if caller >= 0:
            os.close(caller)
        if child <= 0:
            conn.close()  # refused or failed: the caller starts the daemon itself
    callers[child] = conn
    _log(event="zygote_forked", caller=pid, daemon=child, argv=request["argv"])
    with contextlib.suppress(OSError):
        conn.send(json.dumps({"pid": child}).encode())


def _reap(callers: dict[int, socket.socket]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = callers.pop(pid, None)
        if conn is None:
            continue
        end = ({"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status)
               else {"exit": os.waitstatus_to_exitcode(status)})
        with contextlib.suppress(OSError):
            conn.send(json.dumps(end).encode())
        conn.close()
        _log(event="zygote_daemon_ended", daemon=pid, **end)


def _log(**fields: Any) -> None:
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(json.dumps(fields) + "\n")
        sys.stderr.flush()


# -- a forked daemon -------------------------------------------------------------------------------


def _child(request: dict[str, Any], fds: list[int], caller: int, caller_pid: int,
           sockets: tuple[socket.socket, ...], wake: tuple[int, int]) -> None:
    import threading

    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        for s in sockets:
            s.close()
        for fd in wake:
            os.close(fd)
        os.setsid()
        _set_name(b"nydusd")  # what ps and pgrep show (the command line stays the zygote's)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        os.chdir(request["cwd"])
        os.umask(int(request.get("umask", 0o022)))
        os.environ.clear()
        os.environ.update(request["env"])
        _join_cgroups(caller_pid)
        # the watcher must never be the thread a stop signal lands on (the daemon's own signal
        # thread takes them; to a thread without a handler, SIGTERM's default would kill us)
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        threading.Thread(target=_die_with, args=(caller,), name="nydusd-caller-watch",
                         daemon=True).start()
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        argv = [str(a) for a in request["argv"]]
        sys.argv = ["nydusd", *argv]
        from nydusd.cli.daemon import main

        code = main(argv)
    except SystemExit as e:  # argparse: usage errors (2), --help (0)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            _note(e.code)
    except BaseException as e:  # noqa: BLE001 - a forked child must never return into the zygote
        _note(f"daemon failed: {e!r}")
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(code)


def _set_name(name: bytes) -> None:
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(15, ctypes.c_char_p(name), 0, 0, 0)  # PR_SET_NAME


def _die_with(pidfd: int) -> None:
    """The caller was killed (it exits only after its daemon): so is the daemon, at once."""
    import select

    select.select([pidfd], [], [])
    os.kill(os.getpid(), signal.SIGKILL)


def _join_cgroups(pid: int) -> None:
    """Move this process into every cgroup the caller is in and this process is not (cgroup v1
    hierarchies and v2); a group it cannot join is reported, not fatal."""
    mounts: list[tuple[str, set[str], str]] = []  # (fstype, super options, mount dir)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = right.split()
            if len(fields) >= 3 and fields[0] in ("cgroup", "cgroup2"):
                mounts.append((fields[0], set(fields[2].split(",")), left.split()[4]))
    with open("/proc/self/cgroup") as f:
        mine = set(f.read().splitlines())
    with open(f"/proc/{pid}/cgroup") as f:
        theirs = f.read().splitlines()
    for line in theirs:
        if line in mine:
            continue
        _hid, controllers, group = line.split(":", 2)
        wanted = set(controllers.split(",")) if controllers else set()
        base = next((d for fstype, opts, d in mounts
                     if (fstype == "cgroup2" if not wanted else fstype == "cgroup" and wanted <= opts)),
                    None)
        if base is None:
            continue
        try:
            with open(os.path.join(base, group.lstrip("/"), "cgroup.procs"), "w") as procs:
                procs.write(str(os.getpid()))
        except OSError as e:
            _note(f"cannot join the caller's cgroup {controllers or 'v2'}:{group} ({e.strerror})")


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="nydusd-zygote", description=(
        "Keep a pre-imported nydusd ready and fork daemons from it: every `nydusd` started with "
        f"${ZYGOTE_ENV}=<socket> in its environment is served by a fork of this process."))
    p.add_argument("--socket", "-S", required=True, help="unix socket to listen on (created 0600)")
    args = p.parse_args(argv)
    return serve(os.path.abspath(args.socket))


if __name__ == "__main__":
    raise SystemExit(main())
