"""`nydusify convert` checks source and target access before pulling anything, and says what to do:
a wrong password names the registry and the docker config, a plain-HTTP registry names the
``--*-insecure`` flag (instead of ``SSL: WRONG_VERSION_NUMBER``). Real docker-registry instances
(htpasswd auth for the target); the CLI runs as a subprocess, its JSON log shows nothing was pulled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.converter.conftest import Image, docker_config
from tests.harness.oci_registry import Registry

NYDUSIFY = str(Path(sys.executable).parent / "nydusify")


def nydusify(tmp: Path, env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess[str],
                                                               list[str]]:
    log = tmp / "nydusify.log"
    r = subprocess.run([NYDUSIFY, "--log-file", str(log), "convert", "--work-dir", str(tmp / "work"), *args],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HOME": env.get("HOME", str(tmp / "nohome"))}, cwd=tmp)
    events = [json.loads(line)["event"] for line in log.read_text().splitlines()] if log.exists() else []
    return r, events


def test_wrong_target_password_fails_before_any_pull(registry: Registry, auth_registry: Registry,
                                                     source_image: Image, tmp_path: Path) -> None:
    env = docker_config(tmp_path / "home", auth_registry.host, "user", "wrong")
    r, events = nydusify(tmp_path, env, "--source", source_image.ref, "--source-insecure",
                         "--target", f"{auth_registry.host}/dst/texture:v1", "--target-insecure")
    assert r.returncode == 1
    assert r.stderr.strip() == (f"error: authentication failed for {auth_registry.host} "
                                "(check ~/.docker/config.json)")
    assert "layer_phase_started" not in events and not (tmp_path / "work").exists()


def test_target_without_credentials(registry: Registry, auth_registry: Registry, source_image: Image,
                                    tmp_path: Path) -> None:
    r, events = nydusify(tmp_path, {}, "--source", source_image.ref, "--source-insecure",
                         "--target", f"{auth_registry.host}/dst/texture:v1", "--target-insecure")
    assert r.returncode == 1
    assert r.stderr.strip() == (f"error: authentication failed for {auth_registry.host} "
                                "(no credentials for it in ~/.docker/config.json)")
    assert "layer_phase_started" not in events


def test_right_password_converts(registry: Registry, auth_registry: Registry, source_image: Image,
                                 tmp_path: Path) -> None:
    env = docker_config(tmp_path / "home", auth_registry.host, "user", "pass")
    r, events = nydusify(tmp_path, env, "--source", source_image.ref, "--source-insecure",
                         "--target", f"{auth_registry.host}/dst/texture:ok", "--target-insecure")
    assert r.returncode == 0, r.stderr
    assert "layer_phase_started" in events


def test_plain_http_registry_names_the_flag(registry: Registry, source_image: Image, tmp_path: Path) -> None:
    target = f"{registry.host}/dst/texture:v1"
    r, _ = nydusify(tmp_path, {}, "--source", source_image.ref, "--target", target)
    assert r.returncode == 1
    assert r.stderr.strip() == (f"error: registry {registry.host} does not answer https (a plain-HTTP "
                                "registry?): pass --source-insecure")
    assert "WRONG_VERSION_NUMBER" not in r.stderr
    r, events = nydusify(tmp_path, {}, "--source", source_image.ref, "--source-insecure", "--target", target)
    assert r.returncode == 1
    assert r.stderr.strip() == (f"error: registry {registry.host} does not answer https (a plain-HTTP "
                                "registry?): pass --target-insecure")
    assert "layer_phase_started" not in events
