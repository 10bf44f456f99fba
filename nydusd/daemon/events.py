"""The daemon's bookkeeping the API reads back: the events ring and the runtime configuration.

Owns: ``EventLog`` (``GET /api/v1/daemon/events``: the last errors, bounded by count and by total
size, and the number ever recorded) and ``RuntimeConfig`` (``GET|PUT /api/v1/config``: the
``registry_auth``/``proxy_url``/``dragonfly_scheduler_endpoint`` values stored per id -- a
mountpoint, a config id, or "" for all -- and ``apply``, which hands a new ``registry_auth`` to a
mount's registry backend).

Must not import: the API, fs, storage. Thread-safety: both classes take their own small lock; FUSE
workers record read failures with llfuse's lock released.
"""

from __future__ import annotations

import email.utils
import threading
import time
from collections import deque
from typing import Any

from nydusd.daemon.instance import RafsInstance
from nydusd.errors import NydusError, redact_credentials

MAX_EVENTS = 500
MAX_EVENTS_SIZE = 50 * 1024
#: keys ``PUT /api/v1/config`` accepts (spec §3.1)
RUNTIME_CONFIG_KEYS = ("registry_auth", "proxy_url", "dragonfly_scheduler_endpoint")


class EventLog:
    """The events ring: at most ``MAX_EVENTS`` entries of at most ``MAX_EVENTS_SIZE`` bytes in all."""

    def __init__(self) -> None:
        self._events: deque[str] = deque(maxlen=MAX_EVENTS)
        self._lock = threading.Lock()
        self._total = 0

    def record(self, message: str) -> None:
        """Add one entry, stamped with the current time (RFC 1123, as upstream)."""
        stamp = email.utils.formatdate(time.time(), usegmt=True)
        with self._lock:
            self._events.append(f"{stamp} - {message}")
            self._total += 1
            while sum(len(e) for e in self._events) > MAX_EVENTS_SIZE:
                self._events.popleft()

    def snapshot(self) -> dict[str, Any]:
        """``{max_errors, total_errors, max_size, total_size, errors}``."""
        with self._lock:
            errors = list(self._events)
            total = self._total
        return {"max_errors": MAX_EVENTS, "total_errors": total, "max_size": MAX_EVENTS_SIZE,
                "total_size": sum(len(e) for e in errors), "errors": errors}


class RuntimeConfig:
    """Runtime values per id (``/api/v1/config``)."""

    def __init__(self) -> None:
        self._store: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()

    def get(self, id: str | None = None) -> dict[str, str]:
        """Stored values: ``{key: value}`` for ``id``, or ``{"<id>:<key>": value}`` for all."""
        with self._lock:
            # registry_auth is echoed (nydus-snapshotter's hot-reload contract reads it back);
            # URLs (proxy_url) are shown without their password
            store = {k: {key: value if key == "registry_auth" else redact_credentials(value)
                         for key, value in v.items()} for k, v in self._store.items()}
        if id is not None:
            return store.get(id, {})
        return {f"{i}:{k}": v for i, values in store.items() for k, v in values.items()}

    def update(self, id: str, values: dict[str, Any]) -> None:
        """Store ``values`` for ``id``. Raises NydusError for an unknown key or a non-string value
        (HTTP 500, as upstream); nothing is stored then."""
        for key, value in values.items():
            if key not in RUNTIME_CONFIG_KEYS:
                raise NydusError(f"unknown configuration key {key!r}", id=id)
            if not isinstance(value, str):
                raise NydusError(f"configuration value of {key!r} must be a string", id=id)
        with self._lock:
            self._store.setdefault(id, {}).update(values)

    def matches(self, id: str, inst: RafsInstance) -> bool:
        """Whether values stored for ``id`` concern ``inst`` ("" concerns every mount)."""
        return id in ("", inst.mountpoint, inst.config.id)

    def apply_stored(self, inst: RafsInstance) -> None:
        """Hand a new mount what is stored for all mounts, its config id and its mountpoint (the
        most specific last: it wins)."""
        for key in dict.fromkeys(("", inst.config.id, inst.mountpoint)):
            apply(inst, self.get(key))


def apply(inst: RafsInstance, values: dict[str, str]) -> None:
    """Apply runtime ``values`` to one mount: a ``registry_auth`` reaches its registry backend (its
    next request); backends without credentials ignore it."""
    auth = values.get("registry_auth")
    setter = getattr(inst.backend, "set_credentials", None)  # only the registry backend has them
    if auth is not None and setter is not None:
        setter(auth or None)
