"""`nydusctl supervise`: keep a nydusd alive across crashes without nydus-snapshotter.

Owns: the supervisor loop. ``nydusctl -S API supervise --supervisor SUP [--id ID] -- NYDUSD-CMD…``
starts ``NYDUSD-CMD --apisock API --id ID --supervisor SUP`` (nydusd then serves its FUSE mount
with its own session, which can be handed over), waits for RUNNING and asks for the daemon's
state and ``/dev/fuse`` fd (``PUT /api/v1/daemon/fuse/sendfd``, again every ``--sendfd-interval``
seconds so API mounts made meanwhile are included). When the daemon dies by a signal or a
non-zero exit, it starts the same command with ``--upgrade``, hands the state and fd back
(``PUT …/fuse/takeover``), then ``PUT …/daemon/start``: the kernel mount never goes away, and
with ``--failover-policy resend`` (nydusd's default) readers see no error, only a pause. A daemon
that exits 0 (SIGTERM, external unmount) ends the supervisor; SIGTERM/SIGINT to the supervisor
are passed on to the daemon.

The protocol side is ``nydusd.daemon.upgrade.SupervisorStore``; the API calls go through ``api.client``.

Threading: the main thread runs the loop; a takeover's hand-back runs in a helper thread while the
main thread waits for the API reply.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import threading
import time
from types import FrameType

from api.client import ApiClient, ApiError
from nydusd.daemon.upgrade import SupervisorStore, UpgradeError
from nydusd.log import get_logger

log = get_logger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    sp = sub.add_parser("supervise", help="run nydusd and take its FUSE session over after a crash")
    sp.add_argument("--supervisor", required=True, help="supervisor unix socket to listen on")
    sp.add_argument("--id", default="supervised", help="daemon id passed as --id")
    sp.add_argument("--sendfd-interval", type=float, default=5.0,
                    help="seconds between state refreshes (default 5)")
    sp.add_argument("--start-timeout", type=float, default=30.0)
    sp.add_argument("nydusd_command", nargs=argparse.REMAINDER, help="-- nydusd command line")


class Supervisor:
    def __init__(self, apisock: str, supervisor: str, daemon_id: str, command: list[str], *,
                 interval: float, start_timeout: float) -> None:
        self.apisock = apisock
        self.command = [*command, "--apisock", apisock, "--id", daemon_id, "--supervisor", supervisor]
        self.interval = interval
        self.start_timeout = start_timeout
        self.store = SupervisorStore(supervisor)
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopping = False
        self.restarts = 0

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._forward)
        try:
            self.proc = subprocess.Popen(self.command)
            self._wait_state("RUNNING")
            self._sendfd()
            while True:
                try:
                    rc = self.proc.wait(self.interval)
                except subprocess.TimeoutExpired:
                    self._sendfd()
                    continue
                if rc == 0 or self.stopping:
                    log.info("supervised_daemon_exited", returncode=rc)
                    return 0 if rc == 0 else 1
                log.warning("supervised_daemon_died", returncode=rc, restarts=self.restarts)
                if self.store.state is None:
                    log.error("supervisor_has_no_state")
                    return 1
                self._restart()
        except (UpgradeError, ApiError, OSError, TimeoutError) as e:
            log.error("supervisor_failed", error=str(e))
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()
                self.proc.wait(30)
            return 1
        finally:
            self.store.close()

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def _call(self, method: str, path: str) -> None:
        with ApiClient(self.apisock) as client:
            client.call(method, path)

    def _wait_state(self, state: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise OSError(f"nydusd exited with {self.proc.returncode} before {state}")
            try:
                with ApiClient(self.apisock, timeout=2) as client:
                    if client.info().get("state") == state:
                        return
            except (OSError, ApiError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"nydusd did not reach {state} in {self.start_timeout} s")
            time.sleep(0.02)

    def _sendfd(self) -> None:
        """Refresh the stored state; a failure keeps the previous one (and is logged)."""
        try:
            self._call("PUT", "/api/v1/daemon/fuse/sendfd")  # the bytes wait in the socket
            self.store.receive(timeout=10)
        except (ApiError, OSError, UpgradeError) as e:
            log.warning("supervisor_sendfd_failed", error=str(e))

    def _restart(self) -> None:
        started = time.monotonic()
        self.proc = subprocess.Popen([*self.command, "--upgrade"])
        self._wait_state("INIT")
        errors: list[BaseException] = []

        def hand_back() -> None:
            try:
                self.store.serve(timeout=30)
            except UpgradeError as e:
                errors.append(e)

        helper = threading.Thread(target=hand_back, name="supervisor-takeover", daemon=True)
        helper.start()
        self._call("PUT", "/api/v1/daemon/fuse/takeover")
        helper.join(30)
        if errors:
            raise errors[0]
        self._call("PUT", "/api/v1/daemon/start")
        self._wait_state("RUNNING")
        self.restarts += 1
        log.info("supervised_daemon_restarted", restarts=self.restarts,
                 seconds=round(time.monotonic() - started, 3))
        self._sendfd()


def run(args: argparse.Namespace) -> int:
    command = list(args.nydusd_command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise SystemExit("nydusctl supervise: give the nydusd command line after --")
    return Supervisor(args.sock, args.supervisor, args.id, command, interval=args.sendfd_interval,
                      start_timeout=args.start_timeout).run()
