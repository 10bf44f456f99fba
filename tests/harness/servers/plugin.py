"""pytest plugin: fixtures that start REAL servers on 127.0.0.1 (registered by tests/conftest.py).

Session-scoped (started once, shared; tests use their own repositories / buckets / keys):
``registry_server`` (no auth), ``registry_htpasswd``, ``registry_token`` (token auth, 300 s tokens),
``moto_s3`` (S3 with signature checks), ``oss_server`` (OSS protocol, v1 signatures checked).
Function-scoped (tests change their state): ``tinyproxy`` (kill/restart), ``fault_shim`` (in front
of ``registry_server``), ``blob_store`` (redirect target), ``registry_factory`` (custom
registries, e.g. token auth with 2 s tokens). Every server is stopped by PID / shut down in
teardown; a missing binary skips the test with the install hint.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.servers.fault_shim import BlobStore, FaultShim
from tests.harness.servers.moto_s3 import MotoS3Server
from tests.harness.servers.oss_server import OssServer
from tests.harness.servers.registry import RegistryServer
from tests.harness.servers.tinyproxy import TinyProxy


def _need(binary: str, package: str) -> None:
    if shutil.which(binary) is None:
        pytest.skip(f"{binary} is not installed (apt install {package})")


def _registry(tmp_path_factory: pytest.TempPathFactory, auth: str, **opts: Any) -> Iterator[RegistryServer]:
    _need("docker-registry", "docker-registry")
    if auth == "htpasswd":
        _need("htpasswd", "apache2-utils")
    server = RegistryServer(tmp_path_factory.mktemp(f"registry-{auth}"), auth, **opts)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def registry_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    yield from _registry(tmp_path_factory, "none")


@pytest.fixture(scope="session")
def registry_htpasswd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    yield from _registry(tmp_path_factory, "htpasswd")


@pytest.fixture(scope="session")
def registry_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    yield from _registry(tmp_path_factory, "token")


@pytest.fixture
def registry_factory(tmp_path: Path) -> Iterator[Callable[..., RegistryServer]]:
    """Start registries with custom options: ``registry_factory("token", ttl=2)``."""
    _need("docker-registry", "docker-registry")
    started: list[RegistryServer] = []

    def make(auth: str = "none", **opts: Any) -> RegistryServer:
        server = RegistryServer(tmp_path / f"registry-{len(started)}", auth, **opts)
        started.append(server)
        return server

    try:
        yield make
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3Server]:
    try:
        import moto  # noqa: F401
    except ImportError:
        pytest.skip("moto is not installed (pip install 'moto[server]')")
    server = MotoS3Server(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def oss_server() -> Iterator[OssServer]:
    server = OssServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[TinyProxy]:
    _need("tinyproxy", "tinyproxy")
    proxy = TinyProxy(tmp_path / "tinyproxy")
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def fault_shim(registry_server: RegistryServer) -> Iterator[FaultShim]:
    shim = FaultShim(registry_server.port, slow_seconds=2.5)
    try:
        yield shim
    finally:
        shim.stop()


@pytest.fixture
def blob_store() -> Iterator[BlobStore]:
    store = BlobStore()
    try:
        yield store
    finally:
        store.stop()
