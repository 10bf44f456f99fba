"""Converter fixtures: real docker-registry instances and a 3-layer OCI image built with umoci and
pushed with skopeo (see tests/harness/oci_images.py)."""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.oci_images import build_texture_image, skopeo_push
from tests.harness.oci_registry import Registry

NEEDED = ("docker-registry", "skopeo", "umoci", "htpasswd")


def _missing() -> str | None:
    for tool in NEEDED:
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


@dataclass
class Image:
    """An OCI image in a local layout, pushed to a registry."""

    layout: Path
    tag: str
    ref: str
    tmp: Path


@pytest.fixture(scope="session")
def texture_layout(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("oci-texture")
    return tmp, build_texture_image(tmp, "v1")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    with Registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    with Registry(tmp_path_factory.mktemp("registry-auth"), auth="htpasswd") as reg:
        yield reg


@pytest.fixture(scope="module")
def source_image(registry: Registry, texture_layout: tuple[Path, Path]) -> Image:
    tmp, layout = texture_layout
    ref = f"{registry.host}/src/texture:v1"
    skopeo_push(tmp, layout, "v1", ref)
    return Image(layout, "v1", ref, tmp)


def docker_config(home: Path, host: str, user: str, password: str) -> dict[str, str]:
    """An env whose docker config.json holds credentials for ``host``."""
    cfg = home / ".docker"
    cfg.mkdir(parents=True, exist_ok=True)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (cfg / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return {"HOME": str(home)}
