"""A docker token-auth server for docker-registry's ``auth.token`` (the docker token spec).

Issues RS256 JWTs whose header carries the signing certificate in ``x5c``; the registry trusts that
certificate through ``rootcertbundle``. Accepts GET (query) and POST (form) token requests,
checks Basic credentials, grants the requested repository actions to known users and ``pull``
to anonymous clients when ``anonymous_pull`` is set.

Expiry: docker-registry adds 60 s of leeway to ``exp``; a token meant to live ``ttl`` seconds is
therefore minted with ``exp = now + ttl - 60`` so that the registry really refuses it after ``ttl``.
``advertised_expires_in`` (default ``ttl``) is what the answer's ``expires_in`` claims, so a test
can make clients trust a token longer than the registry does (and see them refresh on 401).
"""

from __future__ import annotations

import base64
import datetime
import json
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from tests.harness.servers.base import QuietHandler, ThreadedServer

REGISTRY_LEEWAY = 60
SERVICE = "nydus-test-registry"
ISSUER = "nydus-test-issuer"


def make_signing_cert(directory: Path) -> tuple[rsa.RSAPrivateKey, bytes, Path]:
    """An RSA key and a self-signed CA certificate (DER bytes); the PEM is written for the registry."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nydus test token signer")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    pem = directory / "token-signer.pem"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert.public_bytes(serialization.Encoding.DER), pem


class _TokenHandler(QuietHandler):
    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._issue(parse_qsl(urlsplit(self.path).query))

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode()
        server: TokenServer = self.server.owner  # type: ignore[attr-defined]
        if not server.accept_post:
            self.send_body(405, b"method not allowed")
            return
        self._issue(parse_qsl(body))

    def _issue(self, params: list[tuple[str, str]]) -> None:
        server: TokenServer = self.server.owner  # type: ignore[attr-defined]
        user = server.check_basic(self.headers.get("Authorization"))
        if user is False:
            self.send_body(401, b'{"details":"invalid credentials"}',
                           {"Content-Type": "application/json"})
            return
        scopes = [v for k, v in params if k == "scope"]
        service = next((v for k, v in params if k == "service"), "")
        token = server.mint(user or "", scopes, service)
        body = json.dumps({"token": token, "access_token": token,
                           "expires_in": server.advertised_expires_in or server.ttl,
                           "issued_at": datetime.datetime.now(datetime.UTC).isoformat()}).encode()
        self.send_body(200, body, {"Content-Type": "application/json"})


class TokenServer(ThreadedServer):
    """Token endpoint at ``<url>/token``; ``issued`` counts the tokens handed out."""

    def __init__(self, directory: Path, *, users: dict[str, str] | None = None,
                 anonymous_pull: bool = True, ttl: float = 300, advertised_expires_in: float | None = None,
                 accept_post: bool = True) -> None:
        self.key, self.cert_der, self.cert_pem = make_signing_cert(directory)
        self.users = dict(users or {})
        self.anonymous_pull = anonymous_pull
        self.ttl = ttl
        self.advertised_expires_in = advertised_expires_in
        self.accept_post = accept_post
        self.issued = 0
        self.requests: list[dict[str, object]] = []
        self._lock = threading.Lock()
        super().__init__(_TokenHandler)

    @property
    def realm(self) -> str:
        return f"{self.url}/token"

    def check_basic(self, header: str | None) -> str | None | bool:
        """The user name, None for anonymous, False for bad credentials."""
        if not header:
            return None
        if not header.startswith("Basic "):
            return False
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        return user if self.users.get(user) == password else False

    def mint(self, user: str, scopes: list[str], service: str) -> str:
        access = []
        for scope in " ".join(scopes).split():
            typ, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            wanted = [a for a in actions.split(",") if a]
            granted = wanted if user else [a for a in wanted if a == "pull" and self.anonymous_pull]
            access.append({"type": typ, "name": name, "actions": granted})
        now = int(time.time())
        claims = {"iss": ISSUER, "sub": user, "aud": service or SERVICE, "iat": now,
                  "nbf": now - 1, "exp": int(now + self.ttl - REGISTRY_LEEWAY), "jti": uuid.uuid4().hex,
                  "access": access}
        headers = {"x5c": [base64.b64encode(self.cert_der).decode()]}
        with self._lock:
            self.issued += 1
            self.requests.append({"user": user, "scopes": scopes, "service": service})
        return jwt.encode(claims, self.key, algorithm="RS256", headers=headers)
