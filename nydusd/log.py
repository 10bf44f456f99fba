"""Logging setup: one structlog pipeline for the project's events and every library's stdlib records
(uvicorn, llfuse, asyncio, urllib3 ...), rendered in one of three forms:

- ``json``: one JSON object a line (the default when the stream is not a terminal);
- ``console``: structlog's coloured ``key=value`` lines (the default on a terminal);
- ``text``: upstream nydusd's plain form, ``[2023-03-01 10:00:00.123456 +00:00] INFO message k=v``
  (other levels add ``[module:line]`` after the level, as upstream does), so log greps written for
  upstream keep working. Chosen with ``fmt="text"`` or ``NYDUS_LOG_FORMAT=text``.

Owns: ``configure_logging`` (called only from ``nydusd.cli``), ``get_logger`` (called by every module
as ``log = get_logger(__name__)``) and ``redirect_output`` (a progress display prints log lines
above its bars). Must not import anything from the project but ``errors``.
Thread-safe: structlog loggers are; configuration happens once at start-up (and on a log-level
change through the API).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, TextIO

import structlog

from nydusd.errors import ConfigError, redact_credentials

LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO,
          "warn": logging.WARNING, "warning": logging.WARNING, "error": logging.ERROR,
          "off": logging.CRITICAL + 10}
FORMATS = ("json", "console", "text")
#: environment variable choosing the output form when no explicit one is given
FORMAT_ENV = "NYDUS_LOG_FORMAT"
#: upstream's level names (Rust ``log`` crate)
_UPSTREAM_LEVELS = {"warning": "WARN", "critical": "ERROR", "exception": "ERROR"}

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


# ------------------------------------------------------------------------------- output stream
class _Output:
    """The file both pipelines write to. Whole lines only: each thread's text is held until its
    newline (``print`` writes a line in two calls), then written under one lock -- or handed to the
    sink of ``redirect_output``."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.sink: Callable[[str], None] | None = None
        self._pending = threading.local()
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        buf = getattr(self._pending, "text", "") + text
        head, sep, tail = buf.rpartition("\n")
        self._pending.text = tail
        if sep:
            with self._lock:
                sink = self.sink
                if sink is None:
                    self.stream.write(head + "\n")
                    self.stream.flush()
                else:
                    for line in head.split("\n"):
                        sink(line)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()


_output = _Output(sys.stderr)


@contextlib.contextmanager
def redirect_output(sink: Callable[[str], None]) -> Iterator[None]:
    """Hand every log line (without its newline) to ``sink`` while the block runs -- e.g.
    ``tqdm.write``, which prints it above the progress bars."""
    previous, _output.sink = _output.sink, sink
    try:
        yield
    finally:
        _output.sink = previous


# ------------------------------------------------------------------------------- processors
def _drop_shutdown_noise(record: logging.LogRecord) -> bool:
    """llfuse reports the exception that ends its main loop at INFO; ours (``SessionStop``) is how
    the daemon stops on purpose, so the line is noise."""
    return not (record.name.startswith("llfuse") and "SessionStop" in record.getMessage())


def _upstream_timestamp(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    now = datetime.now().astimezone()
    offset = now.strftime("%z")
    event["timestamp"] = now.strftime("%Y-%m-%d %H:%M:%S.%f ") + f"{offset[:3]}:{offset[3:]}"
    return event


def _value(v: Any) -> str:
    text = v if isinstance(v, str) else repr(v)
    return repr(text) if (not text or any(c in text for c in " \t\n\"'=")) else text


def render_text(_logger: Any, _name: str, event: dict[str, Any]) -> str:
    """``[timestamp] LEVEL [module:line] message key=value ...`` (no location at INFO)."""
    level = str(event.pop("level", "info")).lower()
    head = f"[{event.pop('timestamp', '')}] {_UPSTREAM_LEVELS.get(level, level.upper())}"
    module, line = event.pop("module", None), event.pop("lineno", None)
    if level != "info" and module:
        head += f" [{module}:{line}]"
    message = str(event.pop("event", ""))
    exc = event.pop("exception", None)
    for key in ("logger", "_record", "_from_structlog"):
        event.pop(key, None)
    parts = [head, message, *(f"{k}={_value(v)}" for k, v in event.items())]
    out = " ".join(parts)
    return f"{out}\n{exc}" if exc else out


def _pick_format(fmt: str | None, json: bool | None, stream: TextIO) -> str:
    if fmt is None and json is not None:
        return "json" if json else "console"
    fmt = fmt or os.environ.get(FORMAT_ENV) or ("console" if stream.isatty() else "json")
    if fmt not in FORMATS:
        raise ConfigError(f"invalid log format {fmt!r}, expected one of {', '.join(FORMATS)}",
                          field="log-format")
    return fmt


def _processors(fmt: str, colors: bool) -> tuple[list[Any], list[Any]]:
    """(shared processors run for structlog events and stdlib records alike, final renderers)."""
    shared: list[Any] = [structlog.contextvars.merge_contextvars, structlog.processors.add_log_level]
    if fmt == "text":
        shared += [_upstream_timestamp, structlog.processors.CallsiteParameterAdder(
            {structlog.processors.CallsiteParameter.MODULE, structlog.processors.CallsiteParameter.LINENO},
            additional_ignores=["nydusd.log"])]
    else:
        shared.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
    shared.append(structlog.processors.StackInfoRenderer())
    # tracebacks become text first, so that the redaction sees them too (for stdlib records as well)
    final: list[Any] = [structlog.processors.format_exc_info, redact_event]
    if fmt == "json":
        final.append(structlog.processors.JSONRenderer())
    elif fmt == "text":
        final.append(render_text)
    else:
        final.append(structlog.dev.ConsoleRenderer(colors=colors))
    return shared, final


# ------------------------------------------------------------------------------- configuration
def configure_logging(level: str = "info", log_file: str | None = None,
                      json: bool | None = None, fmt: str | None = None) -> None:
    """Configure structlog and the stdlib root logger for the whole process.

    Output goes to ``log_file`` (appended; missing parent directories are created, as upstream
    nydusd does: nydus-snapshotter passes ``<log dir>/<daemon id>/nydusd.log`` without creating
    ``<daemon id>/``) or stderr. ``fmt`` is ``json``, ``console`` or ``text``;
    None takes ``json`` (True/False -> json/console), else ``$NYDUS_LOG_FORMAT``, else console on a
    terminal and JSON otherwise. Raises ConfigError for an unknown level or format or an unwritable
    log file.
    """
    global _log_file
    lvl = level_number(level)
    stream: TextIO = sys.stderr
    if log_file:
        try:
            parent = os.path.dirname(log_file)
            if parent:
                os.makedirs(parent, exist_ok=True)
            stream = open(log_file, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - process-lived
        except OSError as e:
            raise ConfigError(f"cannot open log file: {e.strerror}", field="log-file",
                              path=log_file) from None
        if _log_file is not None:
            _log_file.close()
        _log_file = stream
    chosen = _pick_format(fmt, json, stream)
    _output.stream = stream
    shared, final = _processors(chosen, colors=stream.isatty())
    structlog.configure(
        processors=[*shared, *final],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(_output),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    # Libraries that log through the stdlib (uvicorn, llfuse, asyncio, urllib3) run the same
    # processors and renderer; their logger name travels as ``logger``.
    handler = logging.StreamHandler(_output)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final]))
    handler.addFilter(_drop_shutdown_noise)
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(lvl)
