"""A real docker-registry (CNCF distribution 2.8) on 127.0.0.1, state in a tmp dir, stopped by PID.

Used by the converter tests and the convert benchmark until/unless ``tests/harness/servers`` provides an
equivalent fixture. Auth: ``none`` or ``htpasswd`` (bcrypt file made with ``htpasswd -Bbn``);
``tls=True`` serves https with a fresh self-signed certificate.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


def _unverified() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Registry:
    def __init__(self, root: Path, *, auth: str = "none", user: str = "user",
                 password: str = "pass", tls: bool = False) -> None:
        self.root = root
        self.auth = auth
        self.tls = tls
        self.user, self.password = user, password
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def creds(self) -> str | None:
        return f"{self.user}:{self.password}" if self.auth == "htpasswd" else None

    def _config(self) -> str:
        lines = ["version: 0.1", "log:", "  level: error", "  accesslog:", "    disabled: true",
                 "storage:", "  filesystem:", f"    rootdirectory: {self.root / 'data'}",
                 "  delete:", "    enabled: true",
                 "http:", f"  addr: {self.host}", "  secret: nydus-test"]
        if self.tls:
            cert, key = self.root / "cert.pem", self.root / "key.pem"
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                            "-keyout", str(key), "-out", str(cert)], capture_output=True, check=True)
            lines += ["  tls:", f"    certificate: {cert}", f"    key: {key}"]
        if self.auth == "htpasswd":
            htpasswd = self.root / "htpasswd"
            out = subprocess.run(["htpasswd", "-Bbn", self.user, self.password], capture_output=True,
                                 check=True).stdout
            htpasswd.write_bytes(out)
            lines += ["auth:", "  htpasswd:", "    realm: nydus-test", f"    path: {htpasswd}"]
        return "\n".join(lines) + "\n"

    def start(self) -> Registry:
        self.root.mkdir(parents=True, exist_ok=True)
        cfg = self.root / "registry.yml"
        cfg.write_text(self._config())
        log = open(self.root / "registry.log", "wb")  # noqa: SIM115 - owned by the process
        try:
            self.proc = subprocess.Popen(["docker-registry", "serve", str(cfg)], stdout=log,
                                         stderr=subprocess.STDOUT)
        finally:
            log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.scheme}://{self.host}/v2/", timeout=1,
                                       context=_unverified()).close()
                return self
            except urllib.error.HTTPError as e:
                e.close()
                if e.code == 401:
                    return self
            except OSError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("docker-registry did not start: "
                           + (self.root / "registry.log").read_text()[-2000:])

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def blob_count(self) -> int:
        blobs = self.root / "data/docker/registry/v2/blobs"
        return sum(1 for p in blobs.rglob("data")) if blobs.exists() else 0

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
