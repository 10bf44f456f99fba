"""Conversion against registries with htpasswd and token (RS256 JWT) auth from tests/harness/servers,
credentials taken from a docker config.json."""

from __future__ import annotations

from pathlib import Path

import pytest

from nydusd.converter.check import Checker, CheckOptions
from nydusd.converter.remote import open_remote
from nydusd.errors import AuthError
from tests.converter.conftest import Image, docker_config
from tests.converter.test_convert import convert
from tests.harness.oci_images import skopeo_push
from tests.harness.servers.registry import PASSWORD, USER, RegistryServer


@pytest.mark.parametrize("mode", ["htpasswd", "token"])
def test_convert_and_check_with_auth(request: pytest.FixtureRequest, mode: str, source_image: Image,
                                     tmp_path: Path) -> None:
    server: RegistryServer = request.getfixturevalue(f"registry_{mode}")
    src = f"{server.host}/nydusify-{mode}/texture:v1"
    skopeo_push(source_image.tmp, source_image.layout, "v1", src, f"{USER}:{PASSWORD}")
    env = docker_config(tmp_path / "home", server.host, USER, PASSWORD)
    dst = f"{server.host}/nydusify-{mode}/texture:nydus"
    convert(src, dst, tmp_path / "w", env=env)
    target = open_remote(dst, plain_http=True, env=env)
    source = open_remote(src, plain_http=True, env=env)
    try:
        assert Checker(target, source, CheckOptions(work_dir=tmp_path / "c")).check().problems == []
    finally:
        target.close()
        source.close()
    bad = docker_config(tmp_path / "bad", server.host, USER, "not-the-password")
    with pytest.raises(AuthError):
        convert(src, f"{server.host}/nydusify-{mode}/texture:bad", tmp_path / "w2", env=bad)
