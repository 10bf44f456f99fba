"""Coalesce concurrent fetches of the same chunk (singleflight).

Owns: ``SingleFlight``, a table of in-flight fetches keyed by chunk key. The first caller that
claims a key becomes its *leader* and must later ``resolve`` or ``fail`` it; every other caller
gets the leader's ``Flight`` and waits on it. Must not import backends, rafs, fs or daemon.

Threading: one small lock guards the table; it is held only to look up / insert / remove entries,
never while a fetch runs or while a waiter blocks (waiters block on the flight's own future, and
tell their thread's blocking listener, see ``storage/waits.py``).
Lock order: a caller may hold no other cache lock when calling ``claim`` except that the
``is_ready`` callback it passes is invoked under the table lock (it must be a cheap, non-blocking
bitmap lookup). That ordering -- the leader marks a chunk ready *before* removing its flight --
closes the race in which a late caller would find neither a flight nor a ready bit.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from nydusd.storage.waits import blocked

K = TypeVar("K", bound=Hashable)


@dataclass(eq=False)
class Flight:
    """One in-flight fetch. ``prefetch`` tells waiters whether the leader is a background prefetch
    (an on-demand waiter retries by itself when such a leader fails or gives up)."""

    prefetch: bool
    future: Future[bytes | None] = field(default_factory=Future)
    #: callers that joined this flight (a prefetch that readers wait for must not step aside)
    waiters: int = 0

    def wait(self, timeout: float | None = None) -> bytes | None:
        """The leader's plain chunk bytes, or ``None`` when the leader fetched nothing for this key
        (the caller should look again). Raises whatever the leader failed with. A wait that
        blocks is announced to the calling thread's blocking listener (``storage/waits.py``)."""
        future = self.future
        if future.done():
            return future.result()
        with blocked():
            return future.result(timeout)


@dataclass
class Claim(Generic[K]):
    """Result of ``SingleFlight.claim``: keys this caller now leads, keys to wait for, and keys
    that became ready meanwhile (read them from the cache)."""

    owned: list[K]
    waiting: dict[K, Flight]
    ready: list[K]


class SingleFlight(Generic[K]):
    """Table of in-flight fetches (see module docstring for the protocol)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[K, Flight] = {}

    def claim(self, keys: Iterable[K], *, is_ready: Callable[[K], bool] | None = None,
              prefetch: bool = False) -> Claim[K]:
        """Atomically sort ``keys`` into owned / waiting / ready (see ``Claim``)."""
        claim: Claim[K] = Claim([], {}, [])
        with self._lock:
            try:
                for key in keys:
                    flight = self._flights.get(key)
                    if flight is not None:
                        flight.waiters += 1
                        claim.waiting[key] = flight
                    elif is_ready is not None and is_ready(key):
                        claim.ready.append(key)
                    else:
                        self._flights[key] = Flight(prefetch)
                        claim.owned.append(key)
            except BaseException as exc:
                # ``is_ready`` failed (a closed cache): the caller never learns which keys it
                # owns, so withdraw them here -- an orphaned flight would block its waiters forever.
                for key in claim.owned:
                    self._flights.pop(key).future.set_exception(exc)
                raise
        return claim

    def try_claim(self, key: K, *, is_ready: Callable[[K], bool] | None = None,
                  prefetch: bool = False) -> bool:
        """Claim ``key`` only if nobody fetches it and it is not ready; never waits."""
        with self._lock:
            if key in self._flights or (is_ready is not None and is_ready(key)):
                return False
            self._flights[key] = Flight(prefetch)
            return True

    def resolve(self, key: K, value: bytes | None) -> None:
        """Leader: publish the result of ``key`` (``None``: nothing fetched, waiters look again)."""
        with self._lock:
            flight = self._flights.pop(key, None)
        if flight is not None:
            flight.future.set_result(value)

    def fail(self, key: K, exc: BaseException) -> None:
        """Leader: publish a failure of ``key`` to its waiters."""
        with self._lock:
            flight = self._flights.pop(key, None)
        if flight is not None:
            flight.future.set_exception(exc)

    def wanted(self, keys: Iterable[K]) -> bool:
        """Whether someone waits for any of ``keys`` (flights of a leader that must keep going)."""
        with self._lock:
            for key in keys:
                flight = self._flights.get(key)
                if flight is not None and flight.waiters:
                    return True
        return False

    def in_flight(self) -> int:
        with self._lock:
            return len(self._flights)
