"""Conversion progress: per-layer download / build / push bars on a terminal (drawn by a display the
command line injects), structured log lines always, and the timing/size counters behind ``convert
--output-json``.

Owns: ``Progress`` (factory of ``Task`` objects; bars when given a display), ``Task`` (a byte
counter with start/finish events), the readers that feed a task (``CountingReader``,
``TimedReader``: also the wall time spent waiting) and ``Metrics`` (upstream's output-json fields:
SourceImageSize, TargetImageSize, SourcePullElapsed, ConversionElapsed, TargetPushElapsed, in bytes
and nanoseconds). Must not import the registry client or the builder. Threading: a ``Task`` is
updated by the one thread running that phase; ``Metrics`` guards its counters with a lock because
pushes run in a worker pool.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from nydusd.log import get_logger

log = get_logger(__name__)


class Task:
    """One phase of one layer (``download`` / ``build`` / ``push``)."""

    def __init__(self, progress: Progress, phase: str, layer: str, total: int | None) -> None:
        self.phase, self.layer, self.total = phase, layer, total
        self.done = 0
        self.started = time.monotonic()
        self._bar: Any = progress.bar(f"{phase:<8} {layer[:19]}", total)
        log.info("layer_phase_started", phase=phase, layer=layer, size=total)

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)

    def finish(self, **extra: Any) -> float:
        elapsed = time.monotonic() - self.started
        if self._bar is not None:
            self._bar.close()
        log.info("layer_phase_finished", phase=self.phase, layer=self.layer, bytes=self.done,
                 ms=round(elapsed * 1000, 1), **extra)
        return elapsed


class Progress:
    """Progress of one conversion. ``display`` (an object with ``bar(desc, total)``, e.g. the CLI's
    ``TerminalDisplay``) draws bars; without one only the log events are written."""

    def __init__(self, display: Any | None = None) -> None:
        self.display = display
        self.enabled = display is not None

    def bar(self, desc: str, total: int | None) -> Any:
        return None if self.display is None else self.display.bar(desc, total)

    def task(self, phase: str, layer: str, total: int | None = None) -> Task:
        return Task(self, phase, layer, total)


@dataclass
class Metrics:
    """Upstream ``--output-json`` fields (sizes in bytes, durations in nanoseconds)."""

    source_image_size: int = 0
    target_image_size: int = 0
    source_pull_ns: int = 0
    conversion_ns: int = 0
    target_push_ns: int = 0
    bytes_pulled: int = 0
    bytes_pushed: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for key, value in deltas.items():
                setattr(self, key, getattr(self, key) + value)

    def to_json(self) -> dict[str, int]:
        return {"SourceImageSize": self.source_image_size, "TargetImageSize": self.target_image_size,
                "SourcePullElapsed": self.source_pull_ns, "ConversionElapsed": self.conversion_ns,
                "TargetPushElapsed": self.target_push_ns, "BytesPulled": self.bytes_pulled,
                "BytesPushed": self.bytes_pushed}


class Readable(Protocol):
    """Anything read front to back with ``read(n)`` (a layer blob, a decompressed layer stream)."""

    def read(self, n: int = -1) -> bytes: ...


class CountingReader:
    """Feeds a progress task with the bytes read through it."""

    def __init__(self, raw: Readable, task: Task) -> None:
        self._raw, self._task = raw, task

    def read(self, n: int = -1) -> bytes:
        data: bytes = self._raw.read(n)
        self._task.update(len(data))
        return data

    def readable(self) -> bool:
        return True


class TimedReader:
    """Counts wall time spent waiting for the source (pull time) and feeds the progress bar."""

    def __init__(self, raw: Readable, task: Task) -> None:
        self._raw, self._task = raw, task
        self.ns = 0

    def read(self, n: int = -1) -> bytes:
        t = time.monotonic_ns()
        data: bytes = self._raw.read(n)
        self.ns += time.monotonic_ns() - t
        self._task.update(len(data))
        return data
