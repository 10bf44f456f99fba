"""Terminal progress display shared by the command-line tools: tqdm bars on stderr with the log
lines printed above them (never through them), and the human-readable numbers of summaries.

Owns: ``TerminalDisplay`` (context manager: while active, every log line goes through
``tqdm.write``; ``bar(desc, total)`` makes a byte bar), ``wants_display`` (the ``auto`` / ``always`` /
``never`` decision) and ``human_bytes`` / ``human_duration``. The only tqdm importer: the converter
gets the display injected (``nydusd.converter.progress.Progress(display)``).
Threading: tqdm bars are updated by the one thread running their phase; creating a bar is
serialised by a lock (pushes run in a pool).
"""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Any, TextIO

from tqdm import tqdm

from nydusd.log import redirect_output


def wants_display(mode: str = "auto", stream: TextIO | None = None) -> bool:
    """``always`` / ``never``, or ``auto``: only when ``stream`` (stderr) is a terminal."""
    if mode == "always":
        return True
    if mode == "never":
        return False
    return (stream or sys.stderr).isatty()


class TerminalDisplay:
    """Bars at the bottom of the terminal, log lines scrolling above them."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self._lock = threading.Lock()
        self._redirect: contextlib.ExitStack | None = None

    def __enter__(self) -> TerminalDisplay:
        stack = contextlib.ExitStack()
        stack.enter_context(redirect_output(lambda line: tqdm.write(line, file=self.stream)))
        self._redirect = stack
        return self

    def __exit__(self, *exc: object) -> None:
        if self._redirect is not None:
            self._redirect.close()
            self._redirect = None

    def bar(self, desc: str, total: int | None, *, unit: str = "B") -> Any:
        with self._lock:
            return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1024,
                        leave=True, file=self.stream, dynamic_ncols=True)

    def write(self, text: str) -> None:
        """A line above the bars (or plainly, when none is shown)."""
        tqdm.write(text, file=self.stream)


def human_bytes(n: float) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"
