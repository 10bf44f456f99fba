"""`nydusd` command line: upstream's flags, the startup mount, the API server, the FUSE loop.

Owns: argument parsing (root-level legacy form and the ``fuse`` subcommand, spec §1.1-1.5), the
checks upstream's clap definitions make (``--id`` needs ``--supervisor``, ``--bootstrap`` needs
``--config`` or ``--localfs-dir`` ...), log setup, RLIMIT_NOFILE, crash detection (§1.6), and the
composition of ``Daemon`` + ``api.server`` -- this module is the composition root, the only place
importing both ``nydusd.*`` and ``api``.

Threading: runs in the main thread and ends in ``Daemon.run`` (llfuse.main). Once the daemon is
RUNNING the API socket is bound and ``api/early.py`` answers the state poll on it; the full API
server (imported meanwhile on a thread of its own) takes the socket over a moment later.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import socket
import sys
import threading
import time
from typing import Any

# Start-up time (issue 13): structlog renders exceptions with rich when it can import it, ~100 ms
# of pretty-printer imports before the mount; the daemon logs JSON lines or plain console lines.
# FastAPI imports pydantic's whole v1 compatibility package (~80 modules) only to check that no
# route uses a v1 model; this daemon has none, and the check treats a missing v1 as "not v1".
for _unused in ("rich", "pydantic.v1"):
    sys.modules.setdefault(_unused, None)  # type: ignore[arg-type]

from nydusd.errors import ConfigError, InvalidArgument, NydusError, Unsupported  # noqa: E402 - after the import guards
from nydusd.log import configure_logging, get_logger  # noqa: E402 - after the import guards

log = get_logger(__name__)

FUSE_SESSIONS = ("llfuse", "own")
#: environment default of --fuse-session (lets a test suite run every mount over both sessions)
SESSION_ENV = "NYDUSD_FUSE_SESSION"
SUBCOMMANDS = ("fuse", "virtiofs", "singleton", "uffd", "nbd")
LOG_LEVELS = ("trace", "debug", "info", "warn", "error")
# options taking a value: a subcommand name right after one of these is that option's value
_VALUE_OPTS = {"-A", "--apisock", "-C", "--config", "--id", "--supervisor", "-l", "--log-level",
               "-L", "--log-file", "--log-rotation-size", "--rlimit-nofile", "--dedup-db", "-M",
               "--mountpoint", "--fuse-threads", "--thread-num", "--failover-policy", "-B",
               "--bootstrap", "-D", "--localfs-dir", "-s", "--shared-dir", "--prefetch-files", "-m",
               "--virtual-mountpoint", "--backend-source", "--sock", "-S", "-F", "--fscache",
               "--fscache-tag", "--fscache-threads", "--threads", "--fuse-session"}


def _threads(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid thread number {value!r}") from None
    if not 1 <= n <= 1024:
        raise argparse.ArgumentTypeError(f"thread number {n} is not in 1..1024")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nydusd", description="Nydus image service daemon (FUSE)")
    p.add_argument("-V", "--version", action="store_true", help="print version information")
    g = p.add_argument_group("global options")
    g.add_argument("-A", "--apisock", help="unix socket of the HTTP admin API")
    g.add_argument("-C", "--config", help="daemon/RAFS configuration file")
    g.add_argument("--id", help="instance id (requires --supervisor)")
    g.add_argument("--supervisor", help="supervisor socket (requires --id)")
    g.add_argument("--upgrade", action="store_true", help="start in upgrade mode (stay INIT)")
    g.add_argument("-l", "--log-level", default="info", type=str.lower, choices=LOG_LEVELS)
    g.add_argument("-L", "--log-file", help="log to this file instead of stderr")
    g.add_argument("--log-rotation-size", type=int, default=0, help="MiB (accepted, not rotated)")
    g.add_argument("--rlimit-nofile", type=int, default=1_000_000)
    g.add_argument("--dedup-db", help="accepted for compatibility; unused")
    f = p.add_argument_group("FUSE options")
    f.add_argument("-M", "--mountpoint", help="host directory to FUSE-mount")
    f.add_argument("--fuse-threads", "--thread-num", dest="threads", type=_threads, default=4)
    f.add_argument("--failover-policy", default="resend", choices=("none", "resend", "flush"))
    f.add_argument("--fuse-session", choices=FUSE_SESSIONS, default=None,
                   help="FUSE session: llfuse (default) or own (/dev/fuse served by nydusd itself: "
                        "1 MiB reads, readdirplus, hand-over; the default with --supervisor). "
                        f"Default from ${SESSION_ENV} when set")
    f.add_argument("--writable", action="store_true", help="mount read-write")
    f.add_argument("--readonly", action="store_true", help=argparse.SUPPRESS)
    fs = p.add_argument_group("filesystem options")
    fs.add_argument("-B", "--bootstrap", help="RAFS bootstrap to mount at startup")
    fs.add_argument("-D", "--localfs-dir", help="shorthand config: localfs backend + blobcache in DIR")
    fs.add_argument("-s", "--shared-dir", help="passthroughfs directory (not supported)")
    fs.add_argument("--prefetch-files", help="file listing absolute paths to prefetch")
    fs.add_argument("-m", "--virtual-mountpoint", default="/")
    fs.add_argument("--backend-source", help=argparse.SUPPRESS)  # sent by the snapshotter; ignored
    fs.add_argument("--hybrid-mode", action="store_true", help=argparse.SUPPRESS)
    fs.add_argument("--sock", help="vhost-user-fs socket to serve a VM (virtio-fs) on")
    return p


def split_subcommand(argv: list[str]) -> tuple[str | None, list[str]]:
    """Find the subcommand among ``argv`` (global options may precede it); return it and the rest."""
    prev = ""
    for i, tok in enumerate(argv):
        if tok in SUBCOMMANDS and prev not in _VALUE_OPTS:
            return tok, argv[:i] + argv[i + 1:]
        prev = tok
    return None, argv


def _validate(p: argparse.ArgumentParser, sub: str | None, a: argparse.Namespace) -> None:
    if sub in ("uffd", "nbd"):
        p.error(f"the {sub} mode is not supported by this nydusd; use FUSE mode "
                "(`nydusd [fuse] --mountpoint ...`) or virtio-fs (`nydusd [virtiofs] --sock ...`)")
    if sub == "singleton":
        p.error("the singleton/fscache mode is not supported by this nydusd; use FUSE mode")
    if bool(a.id) != bool(a.supervisor):
        p.error("--id and --supervisor must be given together")
    if sub == "virtiofs" or a.sock:
        if not a.sock:
            p.error("the following required arguments were not provided: --sock <sock>")
        if a.mountpoint:
            p.error("the argument --sock cannot be used with --mountpoint")
    elif not a.mountpoint:
        p.error("the following required arguments were not provided: --mountpoint <mountpoint>")
    if a.shared_dir:
        p.error("--shared-dir (passthroughfs) is not supported by this nydusd")
    if a.localfs_dir and a.config:
        p.error("the argument --localfs-dir cannot be used with --config")
    if a.bootstrap and not (a.config or a.localfs_dir):
        p.error("both --config and --localfs-dir are missing")
    if a.prefetch_files and not a.bootstrap:
        p.error("--prefetch-files requires --bootstrap")
    if a.fuse_session is None:
        env = os.environ.get(SESSION_ENV, "")
        a.fuse_session = env if env in FUSE_SESSIONS else "own" if a.supervisor else "llfuse"
    if a.supervisor and a.fuse_session != "own" and not a.sock:
        p.error("--supervisor needs the own FUSE session (--fuse-session own): llfuse cannot "
                "hand its /dev/fuse connection over")


SUBCOMMAND_HELP = {
    "fuse": "serve RAFS images over FUSE at --mountpoint (the default without a subcommand)",
    "virtiofs": "serve RAFS images to a QEMU guest as a vhost-user-fs back-end (--sock)",
    "singleton": "fscache/EROFS service for the kernel's on-demand mode (not supported: use fuse)",
}


def _describe(p: argparse.ArgumentParser, sub: str | None) -> None:
    """Root help lists the subcommands; ``nydusd <sub> --help`` is that subcommand's own help."""
    if sub is None:
        p.formatter_class = argparse.RawDescriptionHelpFormatter
        p.epilog = ("subcommands:\n" + "".join(f"  {n:<11}{h}\n" for n, h in SUBCOMMAND_HELP.items())
                    + "\nRun `nydusd <subcommand> --help` for a subcommand's options.")
    else:
        p.prog = f"nydusd {sub}"
        p.description = SUBCOMMAND_HELP.get(sub, f"the {sub} mode (not supported by this nydusd)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = build_parser()
    sub, rest = split_subcommand(argv)
    _describe(p, sub)
    args = p.parse_args(rest)
    args.subcommand = sub
    if not args.version:
        _validate(p, sub, args)
    return args


def _log_file(path: str | None) -> str | None:
    if path and not os.path.splitext(path)[1]:
        return path + ".log"
    return path


def _raise_nofile(limit: int) -> None:
    if limit <= 0:
        return
    try:
        with open("/proc/sys/fs/file-max") as f:
            file_max = int(f.read().split()[0])
    except (OSError, ValueError):
        file_max = 1 << 20
    if file_max < 32768:
        raise InvalidArgument("fs.file-max is too small to raise RLIMIT_NOFILE", file_max=file_max)
    target = min(limit, file_max - 16384, 1_000_000)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(hard, target)))
    except (ValueError, OSError):
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# glibc <malloc.h> mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
#: llfuse's request buffer, allocated and zeroed by each of its workers as it starts (max_write
#: 128 KiB + one page): at this threshold it is a fresh mmap, touched only by the requests it holds
_FUSE_BUFFER = (128 << 10) + resource.getpagesize()
#: once the workers run: chunk-sized (1 MiB) buffers come from the heap again -- a fresh mmap costs
#: its page faults on every allocation, ~20x the copy itself (what glibc's dynamic threshold avoids)
_SERVING_MMAP_THRESHOLD = 4 << 20
#: and the heap keeps up to this much free at its top: trimming it after every freed chunk would
#: cost the same page faults again (glibc's dynamic rule keeps twice the mmap threshold, 8 MiB: 2 MiB
#: holds a freed 1 MiB chunk buffer for the next one at a quarter of the memory)
_SERVING_TRIM_THRESHOLD = 2 << 20


def _mallopt(param: int, value: int) -> None:
    try:  # the process's own symbols include libc's (ctypes.util would cost 25 ms of imports)
        ctypes.CDLL(None).mallopt(param, value)
    except (OSError, AttributeError):
        pass


def _tune_malloc_for_start() -> None:
    """In this process only (mallopt, not MALLOC_* variables that children would inherit):

    - at most 2 malloc arenas: every FUSE worker would otherwise keep its own arena of freed
      128 KiB-1 MiB read buffers, and the RSS would creep up with the worker count;
    - until the FUSE workers have started, blocks of ``_FUSE_BUFFER`` bytes and more are mmapped:
      from the heap, the 132 KiB each llfuse worker zeroes at start would be resident at once
      (about 17 MB for the --thread-num + 128 backend-wait workers). Setting a threshold turns
      glibc's dynamic one off for good: ``_tune_malloc_for_serving`` sets the serving values."""
    _mallopt(_M_ARENA_MAX, 2)
    _mallopt(_M_MMAP_THRESHOLD, _FUSE_BUFFER)


def _tune_malloc_for_serving(workers: int, started: threading.Event, timeout: float = 5.0) -> None:
    """Thread: once ``workers`` more threads run (the FUSE workers, started by the session's loop
    right after this) and the API is up (``started``), raise the mmap threshold to
    ``_SERVING_MMAP_THRESHOLD`` for the hot path and hand the heap the start-up freed (import and
    schema-building garbage) back to the kernel."""
    def threads() -> int:
        try:
            return len(os.listdir("/proc/self/task"))
        except OSError:
            return 1 << 30
    target = threads() + workers
    deadline = time.monotonic() + timeout
    # wait for the API first: the thread count is then polled (a /proc listing every 5 ms) only
    # while workers are still starting after it, not throughout the start-up, whose imports need
    # the CPU; the bound on the whole wait stays ``timeout``
    started.wait(timeout)
    while threads() < target and time.monotonic() < deadline:
        time.sleep(0.005)
    _mallopt(_M_MMAP_THRESHOLD, _SERVING_MMAP_THRESHOLD)
    _mallopt(_M_TRIM_THRESHOLD, _SERVING_TRIM_THRESHOLD)
    gc.collect()  # the cycles import and schema building left: their arenas go back to the kernel
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
    log.debug("malloc_tuned", mmap_threshold=_SERVING_MMAP_THRESHOLD, workers=workers)


def _startup_config(args: argparse.Namespace) -> Any:
    from nydusd.config import apply_image_pull_auth, load_config, load_config_file

    if args.localfs_dir:
        d = args.localfs_dir
        cfg = load_config(json.dumps({
            "version": 2, "backend": {"type": "localfs", "localfs": {"dir": d}},
            "cache": {"type": "blobcache", "filecache": {"work_dir": d}}, "rafs": {"mode": "direct"}}))
    else:
        cfg = load_config_file(args.config)
    return apply_image_pull_auth(cfg, os.environ)


def _prefetch_list(path: str | None) -> list[str] | None:
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise ConfigError(f"cannot read prefetch file list: {e.strerror}", field="prefetch-files",
                          path=path) from None


def _canonical_mountpoint(path: str) -> str:
    """The absolute, symlink-free mountpoint path -- without touching the mountpoint itself: after a
    crash it is the root of a FUSE mount nobody serves until our takeover, and a stat of it (which
    ``realpath`` does) would wait for that takeover forever."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    return os.path.join(os.path.realpath(parent), name) if name else path


def _crashed_before(mountpoint: str, apisock: str | None) -> bool:
    """Failover detection (spec §1.6): our mountpoint is still mounted and the old socket is dead.
    Only meaningful with ``--supervisor`` (see ``run``)."""
    if not apisock or not os.path.exists(apisock):
        return False
    try:
        with open("/proc/self/mounts") as f:
            mounted = any(line.split()[1] == mountpoint for line in f if len(line.split()) > 1)
    except OSError:
        return False
    if not mounted:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(apisock)
        except OSError:
            return True
    return False


def _since_exec() -> float:
    """Seconds since this process was exec-ed (start-up phases, logged as ``startup_phase``)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return -1.0


#: without an image mounted at start the API stack is imported during the start (``prepare``); with
#: one it waits until a request needs it, or the daemon has served no request for ``_QUIET`` seconds
#: (a starting container's reads do not share the CPU and the GIL with a second of imports), or
#: ``_API_LATEST`` seconds passed; the FUSE session is sampled every ``_QUIET_STEP`` seconds
_QUIET, _QUIET_STEP, _API_LATEST = 0.3, 0.005, 5.0
#: GIL switch interval while the API stack is imported and built after RUNNING with no request
#: waiting for it (alongside a starting container's FUSE requests): a FUSE worker waits at most this
#: long for the importing thread to let go of the GIL, instead of the default 5 ms per request
_IMPORT_SWITCH_INTERVAL = 0.0005


class _ApiStarter:
    """The admin API on ``apisock``, from the moment the daemon is RUNNING; stops it at shutdown.

    At RUNNING (``__call__``, main thread) the socket is bound and ``api/early.py`` answers the
    snapshotter's state poll at once; the FUSE session starts serving right after. The thread
    ``nydusd-api-start`` then imports the API stack (FastAPI, pydantic, uvicorn: the largest part of
    a start) unless ``prepare`` already did -- once it is wanted or the daemon is quiet, see
    ``_QUIET`` -- and hands the socket over to the full server. The socket still appears only once
    RUNNING (INIT in upgrade mode)."""

    def __init__(self, apisock: str | None) -> None:
        self.apisock = apisock
        self.daemon: Any = None
        self.server: Any = None
        self.early: Any = None
        self._starter: threading.Thread | None = None
        self._importer: threading.Thread | None = None
        self._start_api: Any = None
        self._stopping = threading.Event()

    def prepare(self, deferrable: bool) -> None:
        """When the full API is needed right after RUNNING (``deferrable`` False: the first mount
        comes through the API, or a supervisor asks for the FUSE session at once so that a crash
        can be taken over), the stack is imported now, alongside the daemon's own imports (with a
        cold page cache the two read their files in parallel). Otherwise only after RUNNING: the
        import would hold the GIL the mount needs, and nothing waits for the full API then."""
        if self.apisock and not deferrable:
            self._importer = threading.Thread(target=self._import, name="nydusd-api-import",
                                              daemon=True)
            self._importer.start()

    def _import(self) -> None:
        try:
            from api.server import start_api_server  # composition root: imports both sides
        except ImportError as e:
            log.warning("api_server_unavailable", error=str(e), apisock=self.apisock)
        else:
            self._start_api = start_api_server

    def __call__(self) -> None:
        log.info("startup_phase", phase="running", since_exec_s=round(_since_exec(), 4))
        started = threading.Event()
        threading.Thread(target=_tune_malloc_for_serving, args=(self.daemon.worker_threads, started),
                         name="nydusd-malloc", daemon=True).start()
        if not self.apisock:
            started.set()
            return
        from api.early import EarlyApi

        self.early = EarlyApi(self.daemon.info, self.apisock)
        try:
            self.early.start()  # AlreadyExists / InvalidArgument: the daemon fails, as it should
        except BaseException:
            started.set()
            raise
        log.info("startup_phase", phase="api_socket", since_exec_s=round(_since_exec(), 4))
        self._starter = threading.Thread(target=self._start_full, args=(started,),
                                         name="nydusd-api-start", daemon=True)
        self._starter.start()

    def _wait_for_quiet(self) -> str:
        """Until the full API is wanted (a request waits for it), the daemon is quiet, at the
        latest ``_API_LATEST`` seconds, or the daemon stops: which of them."""
        now = time.monotonic()
        quiet_since, latest = now, now + _API_LATEST
        while not self.early.wanted.wait(_QUIET_STEP):
            if self._stopping.is_set():
                return "stopping"
            now = time.monotonic()
            if self.daemon.serving():
                quiet_since = now
            elif now - quiet_since >= _QUIET:
                return "quiet"
            if now >= latest:
                return "latest"
        return "wanted"

    def _start_full(self, started: threading.Event) -> None:
        default_interval = sys.getswitchinterval()
        try:
            if self._importer is not None:
                self._importer.join()  # imported during the start (``prepare``)
            else:
                until = self._wait_for_quiet()
                log.debug("api_import_deferred", until=until)
                if until == "stopping":  # the daemon stops before anyone needed the full API
                    self.early.fail()
                    return
                if until != "wanted":  # nobody waits for it: the FUSE requests come first
                    sys.setswitchinterval(_IMPORT_SWITCH_INTERVAL)
                self._import()
            start_api_server = self._start_api
            if start_api_server is None:
                self.early.fail()
                return
            log.info("startup_phase", phase="api_imported", since_exec_s=round(_since_exec(), 4))
            path = self.early.path
            self.server = self.early.hand_over(
                lambda sock: start_api_server(self.daemon, path, sock=sock))
            log.info("startup_phase", phase="api_started", since_exec_s=round(_since_exec(), 4))
        except Exception as e:  # noqa: BLE001 - a thread must report, not die silently
            log.exception("api_server_failed", error=str(e), apisock=self.apisock)
        finally:
            sys.setswitchinterval(default_interval)
            started.set()
            # what the start imported (tests/integration/test_startup.py keeps it lean)
            log.debug("startup_modules", modules=sorted(k for k, v in list(sys.modules.items()) if v))

    def stop(self) -> None:
        self._stopping.set()
        if self._starter is not None:
            self._starter.join(10.0)
        if self.server is not None:
            self.server.stop(timeout=2.0)
        if self.early is not None:
            self.early.close()


def run(args: argparse.Namespace) -> int:
    from nydusd.daemon import block_stop_signals

    # Before any thread exists (the API importer, prefetch threads): every thread inherits the
    # mask, and the daemon's signal thread alone receives SIGTERM/SIGINT/SIGHUP.
    block_stop_signals()
    _tune_malloc_for_start()
    api = _ApiStarter(args.apisock)
    api.prepare(deferrable=bool(args.bootstrap) and not args.upgrade and not args.supervisor)
    from nydusd.daemon.service import Daemon
    from nydusd.fs.mountpoint import check_mountable

    log_file = _log_file(args.log_file)
    configure_logging(args.log_level, log_file)
    log.info("startup_phase", phase="imported", since_exec_s=round(_since_exec(), 4))
    _raise_nofile(args.rlimit_nofile)
    mountpoint = _canonical_mountpoint(args.mountpoint) if args.mountpoint else None
    upgrade = args.upgrade
    # Crash detection (spec §1.6) only where a takeover can follow: with a supervisor holding the
    # old FUSE connection. Without one (nydus-snapshotter's recover_policy "restart"), a dead FUSE
    # mount left by a killed daemon is detached and mounted afresh.
    if mountpoint and not upgrade and args.supervisor and _crashed_before(mountpoint, args.apisock):
        log.warning("previous_daemon_crashed", mountpoint=mountpoint, apisock=args.apisock,
                    supervisor=args.supervisor)
        upgrade = True
    if mountpoint and not upgrade:
        check_mountable(mountpoint)
    daemon = Daemon(mountpoint=mountpoint, threads=args.threads, id=args.id,
                    supervisor=args.supervisor, upgrade=upgrade, writable=args.writable,
                    failover_policy=args.failover_policy,
                    set_log_level=lambda level: configure_logging(level, log_file),
                    sock=os.path.abspath(args.sock) if args.sock else None,
                    fuse_session=args.fuse_session)
    if args.bootstrap and not upgrade:
        daemon.mount(args.virtual_mountpoint, args.bootstrap, _startup_config(args),
                     prefetch_files=_prefetch_list(args.prefetch_files))
        log.info("startup_phase", phase="image_mounted", since_exec_s=round(_since_exec(), 4))
    api.daemon = daemon
    try:
        return daemon.run(on_running=api)
    finally:
        api.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.version:
        from nydusd.version import version_text

        sys.stdout.write(version_text())
        return 0
    try:
        return run(args)
    except Unsupported as e:
        print(f"nydusd: error: {e}", file=sys.stderr)
        return e.exit_code
    except NydusError as e:
        print(f"nydusd: error: {e}", file=sys.stderr)
        log.error("daemon_failed", error=str(e), kind=type(e).__name__)
        return e.exit_code
