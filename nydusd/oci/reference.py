"""Image references: ``[host[:port]/]repo[:tag][@digest]`` with docker's normalisation.

Owns: ``Reference`` and ``parse_reference``. ``ubuntu`` means ``docker.io/library/ubuntu:latest``;
the first path component is a host only if it contains a ``.`` or ``:`` or is ``localhost``
(docker's rule). Must not import any HTTP library or layer above ``oci``. Pure and thread-safe.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nydusd.errors import InvalidArgument

DEFAULT_HOST = "docker.io"
DEFAULT_TAG = "latest"
#: where docker.io's registry API actually lives
DOCKER_HUB_API_HOST = "registry-1.docker.io"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_REPO = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}$")
_HOST = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*|\[[0-9a-fA-F:]+\])"
                   r"(?::[0-9]+)?$")


@dataclass(frozen=True)
class Reference:
    """A parsed image reference. ``tag`` is None when only a digest was given."""

    host: str
    repo: str
    tag: str | None = None
    digest: str | None = None

    @property
    def api_host(self) -> str:
        """The host serving the registry API (docker.io's API is on registry-1.docker.io)."""
        return DOCKER_HUB_API_HOST if self.host == DEFAULT_HOST else self.host

    @property
    def reference(self) -> str:
        """What goes into ``/v2/<repo>/manifests/<reference>``: the digest if any, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def with_tag(self, tag: str) -> Reference:
        return Reference(self.host, self.repo, tag, None)

    def __str__(self) -> str:
        s = f"{self.host}/{self.repo}"
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s


def parse_reference(text: str) -> Reference:
    """Parse an image reference. Raises InvalidArgument naming what is wrong."""
    ref = text.strip()
    if not ref or ref != text or any(c.isspace() for c in ref):
        raise InvalidArgument(f"invalid image reference {text!r}: empty or contains spaces")
    digest = None
    if "@" in ref:
        ref, digest = ref.split("@", 1)
        if not _DIGEST.match(digest):
            raise InvalidArgument(f"invalid image reference {text!r}: bad digest {digest!r}")
    host = DEFAULT_HOST
    first, sep, rest = ref.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        host, ref = first, rest
        if not _HOST.match(host):
            raise InvalidArgument(f"invalid image reference {text!r}: bad host {host!r}")
    tag = None
    last_slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon > last_slash:
        ref, tag = ref[:colon], ref[colon + 1:]
        if not _TAG.match(tag):
            raise InvalidArgument(f"invalid image reference {text!r}: bad tag {tag!r}")
    if host == DEFAULT_HOST and "/" not in ref:
        ref = f"library/{ref}"
    if not _REPO.match(ref):
        raise InvalidArgument(f"invalid image reference {text!r}: bad repository {ref!r}")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(host, ref, tag, digest)
