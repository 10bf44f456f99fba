"""Registry credentials from a docker ``config.json`` (what ``docker login`` / ``skopeo login`` write).

Owns: ``docker_config_path`` (``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``; skopeo's
``$XDG_RUNTIME_DIR/containers/auth.json`` / ``$REGISTRY_AUTH_FILE`` as fallbacks) and ``lookup``
(``auths`` entries by host, with docker.io's legacy keys; ``credHelpers``/``credsStore`` through
``docker-credential-<helper> get``). Must not import the registry client or requests: it returns a
plain ``(username, password)`` pair. Environment reads happen only when the CLI passes ``env``.
Thread-safe: pure functions over files.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

from nydusd.errors import ConfigError
from nydusd.log import get_logger

log = get_logger(__name__)

DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io",
                   "registry-1.docker.io", "https://index.docker.io/v1")


def auth_files(env: Mapping[str, str]) -> list[Path]:
    """Candidate credential files in lookup order."""
    files: list[Path] = []
    if env.get("REGISTRY_AUTH_FILE"):
        files.append(Path(env["REGISTRY_AUTH_FILE"]))
    if env.get("DOCKER_CONFIG"):
        files.append(Path(env["DOCKER_CONFIG"]) / "config.json")
    home = env.get("HOME")
    if home:
        files.append(Path(home) / ".docker" / "config.json")
    if env.get("XDG_RUNTIME_DIR"):
        files.append(Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    return files


def _keys_for(host: str) -> list[str]:
    if host in ("docker.io", "index.docker.io", "registry-1.docker.io"):
        return list(DOCKER_HUB_KEYS)
    return [host, f"https://{host}", f"http://{host}", f"https://{host}/v1/", f"https://{host}/v2/"]


def _decode_auth(value: str, path: Path, host: str) -> tuple[str, str]:
    try:
        user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise ConfigError("invalid base64 'auth' in docker config", field=f"auths.{host}.auth",
                          path=str(path)) from None
    return user, password


def _from_helper(helper: str, host: str) -> tuple[str, str] | None:
    try:
        proc = subprocess.run([f"docker-credential-{helper}", "get"], input=host, capture_output=True,
                              text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("credential_helper_failed", helper=helper, host=host, error=str(e))
        return None
    if proc.returncode != 0:
        return None
    try:
        data = json.loads(proc.stdout)
        return str(data["Username"]), str(data["Secret"])
    except (ValueError, KeyError, TypeError):
        log.warning("credential_helper_failed", helper=helper, host=host, error="bad output")
        return None


def lookup_in(path: Path, host: str) -> tuple[str, str] | None:
    """Credentials for ``host`` in one config file, or None. Raises ConfigError for a file that is
    not JSON or carries a malformed ``auth`` value."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read docker config: {e}", path=str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError("docker config is not a JSON object", path=str(path))
    keys = _keys_for(host)
    helpers = data.get("credHelpers") or {}
    for key in keys:
        if key in helpers:
            return _from_helper(str(helpers[key]), host)
    auths = data.get("auths") or {}
    for key in keys:
        entry = auths.get(key)
        if not isinstance(entry, dict):
            continue
        if entry.get("auth"):
            return _decode_auth(str(entry["auth"]), path, host)
        if entry.get("username"):
            return str(entry["username"]), str(entry.get("password", ""))
    if data.get("credsStore"):
        return _from_helper(str(data["credsStore"]), host)
    return None


def lookup(host: str, env: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """``(username, password)`` for registry ``host`` from the first credential file that has it."""
    env = os.environ if env is None else env
    for path in auth_files(env):
        found = lookup_in(path, host)
        if found is not None:
            log.debug("credentials_found", host=host, path=str(path))
            return found
    return None


def basic_auth(creds: tuple[str, str] | None) -> str | None:
    """The base64 ``user:pass`` string nydusd's registry backend config calls ``auth``."""
    if creds is None:
        return None
    return base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
