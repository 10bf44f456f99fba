"""Logging setup: structlog events, console renderer on a TTY, JSON lines otherwise.

Owns: ``configure_logging`` (called only from ``nydusd.cli``) and ``get_logger`` (called by every
module as ``log = get_logger(__name__)``). Must not import anything from the project but ``errors``.
Thread-safe: structlog loggers are; configuration happens once at start-up.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

from nydusd.errors import ConfigError, redact_credentials

LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO,
          "warn": logging.WARNING, "warning": logging.WARNING, "error": logging.ERROR,
          "off": logging.CRITICAL + 10}

_log_file: TextIO | None = None


def get_logger(name: str | None = None, **initial: Any) -> Any:
    """A structlog bound logger; events are snake_case names with key=value context."""
    return structlog.get_logger(name, **initial) if name else structlog.get_logger(**initial)


def redact_event(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: no log line carries URL credentials (``user:password@`` of a proxy),
    whatever value they hide in (cause texts, reprs, URLs)."""
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = redact_credentials(value)
        elif isinstance(value, (BaseException, list, tuple, dict)):
            text = repr(value)
            red = redact_credentials(text)
            if red != text:
                event[key] = red
    return event


def level_number(level: str) -> int:
    """Map an upstream log level name (trace/debug/info/warn/error/off) to a logging level.

    Raises ConfigError for an unknown name.
    """
    try:
        return LEVELS[level.lower()]
    except KeyError:
        raise ConfigError(f"invalid log level {level!r}, expected one of "
                          "trace, debug, info, warn, error, off", field="log-level") from None


def configure_logging(level: str = "info", log_file: str | None = None,
                      json: bool | None = None) -> None:
    """Configure structlog for the whole process.

    Output goes to ``log_file`` (appended) or stderr. ``json=None`` picks JSON unless the stream is
    a terminal. Raises ConfigError for an unknown level or an unwritable log file.
    """
    global _log_file
    lvl = level_number(level)
    stream: TextIO = sys.stderr
    if log_file:
        try:
            stream = open(log_file, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - process-lived
        except OSError as e:
            raise ConfigError(f"cannot open log file: {e.strerror}", field="log-file",
                              path=log_file) from None
        if _log_file is not None:
            _log_file.close()
        _log_file = stream
    if json is None:
        json = not stream.isatty()
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        # tracebacks become text first, so that the redaction sees them too
        structlog.processors.format_exc_info,
        redact_event,
    ]
    if json:
        processors += [structlog.processors.JSONRenderer()]
    else:
        processors += [structlog.dev.ConsoleRenderer(colors=stream.isatty())]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    # Third-party libraries that use stdlib logging (uvicorn, urllib3) follow the same level.
    logging.basicConfig(stream=stream, level=lvl if lvl <= logging.CRITICAL else logging.CRITICAL,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s", force=True)
