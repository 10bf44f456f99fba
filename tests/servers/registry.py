"""A real OCI registry for tests: ``docker-registry serve`` (CNCF distribution 2.8).

Listens on 127.0.0.1:<free port>, keeps its storage under the given tmp directory and runs in one
of three auth modes: ``none``, ``htpasswd`` (bcrypt file made with ``htpasswd -Bbn``) or ``token``
(with ``TokenServer`` issuing RS256 JWTs). ``push_blob`` uploads through the project's own
``RegistryClient`` so tests push exactly the way the converter will.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
from pathlib import Path
from typing import Any

from nydusd.oci.client import RegistryClient
from tests.servers.base import ProcessServer, free_port, http_status, wait_until
from tests.servers.token_server import ISSUER, SERVICE, TokenServer

USER = "nydus"
PASSWORD = "s3cret-pass"

AuthMode = str  # "none" | "htpasswd" | "token"


def basic_auth(user: str = USER, password: str = PASSWORD) -> str:
    """The ``auth`` config value: base64 of ``user:pass``."""
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def _config(root: Path, port: int, auth: str, token: TokenServer | None) -> str:
    lines = [
        "version: 0.1",
        "log:",
        "  level: warn",
        "  accesslog:",
        "    disabled: true",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {root / 'data'}",
        "  delete:",
        "    enabled: true",
        "http:",
        f"  addr: 127.0.0.1:{port}",
    ]
    if auth == "htpasswd":
        htpasswd = subprocess.run(["htpasswd", "-Bbn", USER, PASSWORD], check=True,
                                  capture_output=True, text=True).stdout
        (root / "htpasswd").write_text(htpasswd)
        lines += ["auth:", "  htpasswd:", "    realm: nydus-test", f"    path: {root / 'htpasswd'}"]
    elif auth == "token":
        assert token is not None
        lines += ["auth:", "  token:", f"    realm: {token.realm}", f"    service: {SERVICE}",
                  f"    issuer: {ISSUER}", f"    rootcertbundle: {token.cert_pem}"]
    return "\n".join(lines) + "\n"


class RegistryServer:
    """docker-registry on 127.0.0.1; ``stop()`` ends it by PID."""

    def __init__(self, root: Path, auth: AuthMode = "none", **token_opts: Any) -> None:
        if shutil.which("docker-registry") is None:
            raise RuntimeError("docker-registry is not installed (apt install docker-registry)")
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.auth_mode = auth
        self.token: TokenServer | None = None
        if auth == "token":
            self.token = TokenServer(root, users={USER: PASSWORD}, **token_opts)
        self.port = free_port()
        (root / "registry.yml").write_text(_config(root, self.port, auth, self.token))
        self.process = ProcessServer(["docker-registry", "serve", str(root / "registry.yml")],
                                     root / "registry.log")
        try:
            wait_until(lambda: http_status(self.port, "/v2/") in (200, 401), what="docker-registry")
        except TimeoutError:
            self.stop()
            raise

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def auth(self) -> str | None:
        """The ``auth`` config value that this registry accepts (None when it needs none)."""
        return None if self.auth_mode == "none" else basic_auth()

    def client(self, repo: str, **kw: Any) -> RegistryClient:
        kw.setdefault("auth", self.auth)
        return RegistryClient(self.host, repo, scheme="http", **kw)

    def push_blob(self, repo: str, data: bytes, *, chunk_size: int | None = None) -> str:
        """Upload ``data`` to ``repo``; returns the blob id (hex sha256, no prefix)."""
        client = self.client(repo)
        try:
            digest = client.push_blob(data, chunk_size=chunk_size)
        finally:
            client.close()
        assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
        return digest.split(":", 1)[1]

    def backend_config(self, repo: str, **overrides: Any) -> dict[str, Any]:
        """The ``backend.registry`` config dict for this server."""
        cfg: dict[str, Any] = {"scheme": "http", "host": self.host, "repo": repo, "timeout": 5,
                               "connect_timeout": 5, "retry_limit": 2}
        if self.auth:
            cfg["auth"] = self.auth
        cfg.update(overrides)
        return cfg

    def stop(self) -> None:
        self.process.stop()
        if self.token is not None:
            self.token.stop()
