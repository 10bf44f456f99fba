"""Registry authentication state: challenge parsing, credentials and the bearer-token cache.

Owns: ``parse_challenge`` (``WWW-Authenticate`` -> scheme + params), ``BasicCredentials`` (the
``auth`` config value, base64 ``user:pass``), ``Token`` and ``TokenCache`` (tokens keyed by realm,
service and scope; considered stale a little before they expire, so that a read never goes out
with a token about to lapse).

Must not import any HTTP library (``oci/client.py`` performs the token requests) nor any layer
above ``oci``.

Threading: ``TokenCache`` is shared by every thread of a client; it guards its dict with a lock.
Two threads may both fetch a token for the same scope at once; the later one wins, which is
harmless.
"""

from __future__ import annotations

import base64
import binascii
import re
import threading
import time
from dataclasses import dataclass, field

from nydusd.errors import AuthError, ConfigError

#: token lifetime assumed when the token server does not say (docker token spec: 60 s)
DEFAULT_EXPIRES_IN = 60
#: the client id upstream nydus sends to token servers
CLIENT_ID = "nydus-registry-client"

_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))\s*,?')


@dataclass(frozen=True)
class Challenge:
    """One parsed ``WWW-Authenticate`` challenge; ``scheme`` is lower-case (``basic``/``bearer``)."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")


def parse_challenge(header: str | None) -> Challenge | None:
    """Parse ``Bearer realm="…",service="…",scope="…"`` or ``Basic realm="…"``; None if absent."""
    if not header or not header.strip():
        return None
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM.match(rest, pos)
        if not m or m.end() == pos:
            break
        value = m.group(2) if m.group(2) is not None else (m.group(3) or "")
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
        pos = m.end()
    return Challenge(scheme.lower(), params)


@dataclass(frozen=True)
class BasicCredentials:
    """Registry credentials from the config's ``auth`` (base64 of ``user:pass``)."""

    username: str
    password: str

    @classmethod
    def from_auth(cls, auth: str | None) -> BasicCredentials | None:
        """Decode ``auth``; None when empty. Raises ConfigError when it is not base64 ``user:pass``."""
        if not auth:
            return None
        try:
            text = base64.b64decode(auth.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise ConfigError("registry auth must be base64 of user:pass",
                              field="backend.registry.auth") from None
        user, sep, password = text.partition(":")
        if not sep:
            raise ConfigError("registry auth must be base64 of user:pass",
                              field="backend.registry.auth")
        return cls(user, password)

    @classmethod
    def from_user_pass(cls, username: str, password: str) -> BasicCredentials:
        return cls(username, password)

    @property
    def header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


@dataclass(frozen=True)
class Token:
    """A bearer token and the monotonic time after which it must not be used any more."""

    value: str
    expires_at: float

    def fresh(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) < self.expires_at


def token_from_response(body: object, *, now: float | None = None) -> Token:
    """Build a Token from a token server's JSON answer (``token`` or ``access_token``,
    ``expires_in`` seconds). The token is retired early -- by a tenth of its lifetime, at most 10 s --
    so that requests do not race its expiry. Raises AuthError on a malformed answer."""
    if not isinstance(body, dict):
        raise AuthError("token server answered with something that is not a JSON object")
    value = body.get("token") or body.get("access_token")
    if not isinstance(value, str) or not value:
        raise AuthError("token server answer has no token")
    expires_in = body.get("expires_in")
    if not isinstance(expires_in, (int, float)) or isinstance(expires_in, bool) or expires_in <= 0:
        expires_in = DEFAULT_EXPIRES_IN
    margin = min(10.0, expires_in / 10.0)
    start = time.monotonic() if now is None else now
    return Token(value, start + float(expires_in) - margin)


class TokenCache:
    """Bearer tokens keyed by ``(realm, service, scope)``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[tuple[str, str, str], Token] = {}

    def get(self, key: tuple[str, str, str]) -> Token | None:
        """The cached token for ``key`` if it is still fresh."""
        with self._lock:
            tok = self._tokens.get(key)
            if tok is not None and not tok.fresh():
                del self._tokens[key]
                return None
            return tok

    def put(self, key: tuple[str, str, str], token: Token) -> None:
        with self._lock:
            self._tokens[key] = token

    def discard(self, key: tuple[str, str, str], token: Token | None = None) -> None:
        """Forget ``key`` (only if it still holds ``token``, when given: a refresh by another
        thread is kept)."""
        with self._lock:
            if token is None or self._tokens.get(key) == token:
                self._tokens.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._tokens.clear()
