"""Pure tests of image reference parsing and of the auth helpers (challenges, credentials, tokens)."""

from __future__ import annotations

import base64
import time

import pytest

from nydusd.errors import AuthError, ConfigError, InvalidArgument
from nydusd.oci.auth import (
    DEFAULT_EXPIRES_IN,
    BasicCredentials,
    Token,
    TokenCache,
    parse_challenge,
    token_from_response,
)
from nydusd.oci.reference import Reference, parse_reference

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize(("text", "expected"), [
    ("ubuntu", Reference("docker.io", "library/ubuntu", "latest")),
    ("ubuntu:22.04", Reference("docker.io", "library/ubuntu", "22.04")),
    ("user/app", Reference("docker.io", "user/app", "latest")),
    ("localhost/app", Reference("localhost", "app", "latest")),
    ("127.0.0.1:5000/a/b:v1", Reference("127.0.0.1:5000", "a/b", "v1")),
    ("reg.io/ns/app@" + DIGEST, Reference("reg.io", "ns/app", None, DIGEST)),
    ("reg.io:443/app:t@" + DIGEST, Reference("reg.io:443", "app", "t", DIGEST)),
])
def test_parse_reference(text: str, expected: Reference) -> None:
    assert parse_reference(text) == expected


def test_reference_helpers() -> None:
    ref = parse_reference("ubuntu")
    assert ref.api_host == "registry-1.docker.io" and ref.reference == "latest"
    assert str(ref) == "docker.io/library/ubuntu:latest"
    pinned = parse_reference("reg.io/app:v@" + DIGEST)
    assert pinned.reference == DIGEST and pinned.api_host == "reg.io"
    assert str(pinned.with_tag("v2")) == "reg.io/app:v2"


@pytest.mark.parametrize("bad", ["", " ubuntu", "Upper/case", "reg.io/app:bad tag", "app@sha256:xyz",
                                 "reg.io/app:" + "t" * 200, "a//b", "reg.io/-bad"])
def test_bad_references(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_reference(bad)


def test_parse_bearer_challenge() -> None:
    ch = parse_challenge('Bearer realm="https://auth.example/token",service="registry.example",'
                         'scope="repository:lib/a:pull,push"')
    assert ch is not None and ch.scheme == "bearer" and ch.realm == "https://auth.example/token"
    assert ch.params["service"] == "registry.example"
    assert ch.params["scope"] == "repository:lib/a:pull,push"


def test_parse_basic_and_odd_challenges() -> None:
    ch = parse_challenge('Basic realm="Registry Realm"')
    assert ch is not None and ch.scheme == "basic" and ch.realm == "Registry Realm"
    unquoted = parse_challenge("Bearer realm=https://a/b, service=svc")
    assert unquoted is not None and unquoted.params == {"realm": "https://a/b", "service": "svc"}
    escaped = parse_challenge(r'Bearer realm="a\"b"')
    assert escaped is not None and escaped.realm == 'a"b'
    assert parse_challenge("") is None and parse_challenge(None) is None


def test_basic_credentials() -> None:
    auth = base64.b64encode(b"user:pa:ss").decode()
    creds = BasicCredentials.from_auth(auth)
    assert creds == BasicCredentials("user", "pa:ss")
    assert creds.header == "Basic " + auth
    assert BasicCredentials.from_auth("") is None
    for bad in ("not base64!!", base64.b64encode(b"nocolon").decode()):
        with pytest.raises(ConfigError) as ei:
            BasicCredentials.from_auth(bad)
        assert ei.value.field == "backend.registry.auth"


def test_token_from_response() -> None:
    now = 1000.0
    tok = token_from_response({"token": "t1", "expires_in": 300}, now=now)
    assert tok.value == "t1" and tok.expires_at == now + 300 - 10
    short = token_from_response({"access_token": "t2", "expires_in": 2}, now=now)
    assert short.value == "t2" and short.expires_at == pytest.approx(now + 1.8)
    default = token_from_response({"token": "t3"}, now=now)
    assert default.expires_at == now + DEFAULT_EXPIRES_IN - 6
    for bad in ([], {"expires_in": 3}, {"token": ""}):
        with pytest.raises(AuthError):
            token_from_response(bad)


def test_token_cache_expiry_and_discard() -> None:
    cache = TokenCache()
    key = ("realm", "svc", "repository:a:pull")
    cache.put(key, Token("old", time.monotonic() - 1))
    assert cache.get(key) is None  # stale tokens are never handed out
    fresh = Token("new", time.monotonic() + 60)
    cache.put(key, fresh)
    assert cache.get(key) == fresh
    cache.discard(key, Token("other", 0))  # someone else's token: kept
    assert cache.get(key) == fresh
    cache.discard(key, fresh)
    assert cache.get(key) is None
