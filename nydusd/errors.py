"""The one exception tree of the project.

Owns: every error class a layer may raise. Each class carries, as class variables, the errno a FUSE
handler answers with, the HTTP status the API answers with and the short code of the API's
``{"code", "message"}`` body; context (blob id, offset, mountpoint, field path ...) travels as
attributes and is rendered by ``__str__``.

Must not import anything from the project: it is the leaf every layer may import freely.
Translation into errno / HTTP / exit codes happens only at the three boundaries: the FUSE adapter,
the API exception handler and the CLI ``main`` functions.
"""

from __future__ import annotations

import errno as _errno
import re
from typing import Any, ClassVar

#: ``scheme://userinfo@``: the credentials part of a URL (proxy URLs may carry ``user:password@``)
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^\s/?#@:]*)"
                           r"(?::[^\s/?#]*)?@")
REDACTED = "***"


def redact_credentials(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` URL in it replaced by
    ``***`` (``user:***@``; a lone ``token@`` becomes ``***@``). The one redaction every error
    message, log line and API answer goes through (config secrets are dropped by
    ``ConfigV2.to_dict``, which uses this for URLs)."""
    if "@" not in text:
        return text

    def sub(m: re.Match[str]) -> str:
        user = m.group("user")
        has_password = m.group(0)[len(m.group("scheme")) + len(user)] == ":"
        return f"{m.group('scheme')}{user}:{REDACTED}@" if has_password and user else \
            f"{m.group('scheme')}{REDACTED}@"
    return _URL_USERINFO.sub(sub, text)


class NydusError(Exception):
    """Root of every error the project raises on purpose."""

    errno: ClassVar[int] = _errno.EIO
    http_status: ClassVar[int] = 500
    code: ClassVar[str] = "UNDEFINED"
    #: process exit code used by the command-line tools
    exit_code: ClassVar[int] = 1

    def __init__(self, message: str = "", **context: Any) -> None:
        # URLs with credentials (a proxy's user:password@) end up in messages and context; an
        # error travels to logs, the events ring and API answers, so it never carries them.
        message = redact_credentials(message)
        context = {k: redact_credentials(v) if isinstance(v, str) else v for k, v in context.items()}
        super().__init__(message)
        self.message = message
        self.context = context
        for key, value in context.items():
            setattr(self, key, value)

    def __str__(self) -> str:
        if not self.context:
            return self.message
        ctx = ", ".join(f"{k}={v}" for k, v in self.context.items() if v is not None)
        return f"{self.message} ({ctx})" if ctx else self.message


class NotFound(NydusError):
    errno = _errno.ENOENT
    http_status = 404
    code = "NOT_FOUND"


class AlreadyExists(NydusError):
    errno = _errno.EEXIST
    http_status = 409
    code = "ALREADY_EXISTS"


class NotReady(NydusError):
    errno = _errno.EAGAIN
    http_status = 503
    code = "NOT_READY"


class Unsupported(NydusError):
    errno = _errno.ENOTSUP
    http_status = 501
    code = "UNSUPPORTED"


class InvalidArgument(NydusError):
    """A request or command line that is well-formed but asks for something impossible."""

    errno = _errno.EINVAL
    http_status = 400
    code = "INVALID_ARGUMENT"
    exit_code = 2


class ConfigError(InvalidArgument):
    """A configuration that fails validation; ``field`` names the offending path (``a.b.c``)."""

    code = "INVALID_CONFIG"


class ReadOnly(NydusError):
    errno = _errno.EROFS
    http_status = 405
    code = "READ_ONLY"


class CorruptMetadata(NydusError):
    """A bootstrap (or blob meta) that fails validation; ``offset`` and ``field`` say where."""

    code = "CORRUPT_METADATA"


class IntegrityError(NydusError):
    """Chunk data whose digest does not match, or that does not decompress to its recorded size."""

    code = "INTEGRITY"


class BackendError(NydusError):
    """A storage backend failure; ``transient`` tells whether a retry may help."""

    code = "BACKEND"

    def __init__(self, message: str = "", *, transient: bool = False, **context: Any) -> None:
        super().__init__(message, **context)
        self.transient = transient


class BlobNotFound(BackendError):
    """The blob/object is missing from the backend. EIO, not ENOENT: the file exists, its data doesn't."""

    code = "BLOB_NOT_FOUND"


class AuthError(BackendError):
    http_status = 401
    code = "UNAUTHORIZED"


class BuildError(NydusError):
    """Input a builder cannot turn into an image (bad tar entry, unreadable file ...)."""

    errno = _errno.EINVAL
    http_status = 400
    code = "BUILD"
