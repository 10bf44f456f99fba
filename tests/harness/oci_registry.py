"""The docker-registry of the converter tests and the convert benchmark: a ``RegistryServer``
(tests/harness/servers/registry.py; CNCF distribution 2.8 on 127.0.0.1, state in a tmp dir, stopped
by PID) started by ``start()`` or ``with``. Auth: ``none`` or ``htpasswd`` with ``user``/``password``
(``creds`` is the ``user:password`` skopeo takes); ``tls=True`` serves https with a fresh
self-signed certificate.
"""

from __future__ import annotations

from pathlib import Path

from tests.harness.servers.registry import RegistryServer


class Registry:
    def __init__(self, root: Path, *, auth: str = "none", user: str = "user",
                 password: str = "pass", tls: bool = False) -> None:
        self.root = root
        self.auth = auth
        self.tls = tls
        self.user, self.password = user, password
        self.server: RegistryServer | None = None

    def start(self) -> Registry:
        self.server = RegistryServer(self.root, self.auth, tls=self.tls, user=self.user,
                                     password=self.password)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None, "Registry.start() first"
        return self.server.port

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def cert(self) -> Path:
        """The https certificate (``tls=True``) to trust."""
        assert self.server is not None and self.server.tls_cert is not None
        return self.server.tls_cert

    @property
    def creds(self) -> str | None:
        return f"{self.user}:{self.password}" if self.auth == "htpasswd" else None

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def blob_count(self) -> int:
        blobs = self.root / "data/docker/registry/v2/blobs"
        return sum(1 for p in blobs.rglob("data")) if blobs.exists() else 0

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
