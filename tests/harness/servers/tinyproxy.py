"""tinyproxy as a stand-in for a Dragonfly peer (dfdaemon is an HTTP forward proxy too).

Runs ``tinyproxy -d -c <conf>`` on 127.0.0.1:<port> with its log under the tmp directory. Tests
``kill()`` it mid-run and ``restart()`` it on the same port to exercise proxy fallback and
recovery; ``requests_seen()`` counts the requests tinyproxy logged (to observe which way reads go).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from tests.harness.servers.base import ProcessServer, free_port, port_open, wait_until

_REQUEST = re.compile(r"Request \(file descriptor \d+\): (\w+) (\S+)")


class TinyProxy:
    """A tinyproxy process that can be killed and restarted on the same port."""

    def __init__(self, root: Path, *, basic_auth: tuple[str, str] | None = None) -> None:
        """``basic_auth``: (user, password) the proxy demands (``BasicAuth``; 407 otherwise)."""
        if shutil.which("tinyproxy") is None:
            raise RuntimeError("tinyproxy is not installed (apt install tinyproxy)")
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.port = free_port()
        self.log_path = root / "tinyproxy.log"
        self.conf = root / "tinyproxy.conf"
        self.conf.write_text("\n".join([
            f"Port {self.port}", "Listen 127.0.0.1", "Allow 127.0.0.1", "Timeout 30",
            f"PidFile \"{root / 'tinyproxy.pid'}\"", f"LogFile \"{self.log_path}\"", "LogLevel Info",
            "DisableViaHeader Yes", "MaxClients 50",
            *([f"BasicAuth {basic_auth[0]} {basic_auth[1]}"] if basic_auth else []), ""]))
        self.process: ProcessServer | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = ProcessServer(["tinyproxy", "-d", "-c", str(self.conf)], self.root / "stdout.log")
        try:
            wait_until(lambda: port_open(self.port), what="tinyproxy")
        except TimeoutError:
            self.stop()
            raise

    def kill(self) -> None:
        """Stop the proxy (SIGTERM by PID) and wait until its port is closed."""
        self.stop()
        wait_until(lambda: not port_open(self.port), what="tinyproxy shutdown")

    def restart(self) -> None:
        self.start()

    def requests_seen(self, path_part: str = "") -> int:
        """How many proxied requests tinyproxy logged (whose URL contains ``path_part``)."""
        if not self.log_path.exists():
            return 0
        return sum(1 for m in _REQUEST.finditer(self.log_path.read_text(errors="replace"))
                   if path_part in m.group(2))

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None
