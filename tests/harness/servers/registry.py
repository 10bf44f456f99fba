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
from tests.harness.servers.base import ProcessServer, free_port, http_status, port_open, wait_until
from tests.harness.servers.token_server import ISSUER, SERVICE, TokenServer

USER = "nydus"
PASSWORD = "s3cret-pass"

AuthMode = str  # "none" | "htpasswd" | "token"


def basic_auth(user: str = USER, password: str = PASSWORD) -> str:
    """The ``auth`` config value: base64 of ``user:pass``."""
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def make_tls_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed server certificate for 127.0.0.1 (IP SAN) and its key, as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _config(root: Path, port: int, auth: str, token: TokenServer | None,
            tls: tuple[Path, Path] | None = None, user: str = USER, password: str = PASSWORD) -> str:
    lines = [
        "version: 0.1",
        "log:",
        "  level: warn",
        "  accesslog:",
        "    disabled: true",
        "storage:",
        "  cache:",
        "    blobdescriptor: inmemory",
        "  filesystem:",
        f"    rootdirectory: {root / 'data'}",
        "  delete:",
        "    enabled: true",
        "http:",
        f"  addr: 127.0.0.1:{port}",
        "  secret: nydus-test-secret",
    ]
    if tls is not None:
        lines += ["  tls:", f"    certificate: {tls[0]}", f"    key: {tls[1]}"]
    if auth == "htpasswd":
        htpasswd = subprocess.run(["htpasswd", "-Bbn", user, password], check=True,
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

    def __init__(self, root: Path, auth: AuthMode = "none", *, tls: bool = False, user: str = USER,
                 password: str = PASSWORD, **token_opts: Any) -> None:
        if shutil.which("docker-registry") is None:
            raise RuntimeError("docker-registry is not installed (apt install docker-registry)")
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.auth_mode = auth
        self.user, self.password = user, password
        self.token: TokenServer | None = None
        if auth == "token":
            self.token = TokenServer(root, users={user: password}, **token_opts)
        self.port = free_port()
        self.tls_cert: Path | None = None
        tls_files = make_tls_cert(root) if tls else None
        if tls_files:
            self.tls_cert = tls_files[0]
        config = _config(root, self.port, auth, self.token, tls_files, user, password)
        (root / "registry.yml").write_text(config)
        self.process = ProcessServer(["docker-registry", "serve", str(root / "registry.yml")],
                                     root / "registry.log")
        try:
            wait_until(lambda: port_open(self.port) if tls else http_status(self.port, "/v2/") in (200, 401),
                       what="docker-registry")
        except TimeoutError:
            self.stop()
            raise

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def auth(self) -> str | None:
        """The ``auth`` config value that this registry accepts (None when it needs none)."""
        return None if self.auth_mode == "none" else basic_auth(self.user, self.password)

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"

    def client(self, repo: str, **kw: Any) -> RegistryClient:
        kw.setdefault("auth", self.auth)
        if self.tls_cert:
            kw.setdefault("ca_cert_files", [str(self.tls_cert)])
        return RegistryClient(self.host, repo, scheme=self.scheme, **kw)

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
        cfg: dict[str, Any] = {"scheme": self.scheme, "host": self.host, "repo": repo, "timeout": 5,
                               "connect_timeout": 5, "retry_limit": 2}
        if self.auth:
            cfg["auth"] = self.auth
        cfg.update(overrides)
        return cfg

    def stop(self) -> None:
        self.process.stop()
        if self.token is not None:
            self.token.stop()
