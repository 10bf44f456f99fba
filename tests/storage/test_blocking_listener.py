"""The per-thread blocking listener of ``storage/waits.py``: a FUSE transport learns when one of its
readers is about to wait on a backend (a fetch on a helper thread, or another thread's fetch of
the same chunk) and when the wait ends -- only for its own threads, once per outermost wait, and
not for a read refused without waiting."""

from __future__ import annotations

import threading
import time

import pytest

from nydusd.storage import waits
from nydusd.storage.cache.singleflight import SingleFlight
from nydusd.storage.waits import BackendBusy, BackendWaits


@pytest.fixture
def events():  # type: ignore[no-untyped-def]
    seen: list[bool] = []
    waits.set_blocking_listener(seen.append)
    yield seen
    waits.set_blocking_listener(None)


def test_a_backend_wait_is_announced_around_the_fetch(events) -> None:  # type: ignore[no-untyped-def]
    def fetch() -> bool:  # the reader tells it blocks while the fetch runs
        deadline = time.monotonic() + 5
        while events != [True] and time.monotonic() < deadline:
            time.sleep(0.001)
        return events == [True]
    assert BackendWaits("/a").run(fetch)
    assert events == [True, False]


def test_a_failed_wait_ends_too_and_a_refused_one_is_never_announced(events, monkeypatch, logs) -> None:  # type: ignore[no-untyped-def]
    def boom() -> None:
        raise OSError(5, "backend down")
    with pytest.raises(OSError):
        BackendWaits("/a").run(boom)
    assert events == [True, False]
    events.clear()
    monkeypatch.setattr(waits._budget, "limit", 0)
    with logs.expect("backend_waits_exhausted", count=1), pytest.raises(BackendBusy):
        BackendWaits("/a").run(lambda: 1)
    assert events == []


def test_nested_waits_are_announced_once(events) -> None:  # type: ignore[no-untyped-def]
    flights: SingleFlight[int] = SingleFlight()
    claim = flights.claim([1])
    assert claim.owned == [1]
    joined = flights.claim([1]).waiting[1]
    threading.Timer(0.05, lambda: flights.resolve(1, b"data")).start()
    with waits.blocked():
        assert joined.wait(5) == b"data"  # a wait for another thread's fetch, inside a wait
    assert events == [True, False]


def test_a_single_flight_wait_is_announced_unless_already_done(events) -> None:  # type: ignore[no-untyped-def]
    flights: SingleFlight[int] = SingleFlight()
    flights.claim([1, 2])
    first, second = flights.claim([1]).waiting[1], flights.claim([2]).waiting[2]
    flights.resolve(2, b"ready")
    assert second.wait() == b"ready"
    assert events == []
    threading.Timer(0.05, lambda: flights.resolve(1, b"late")).start()
    assert first.wait(5) == b"late"
    assert events == [True, False]


def test_other_threads_are_not_announced(events) -> None:  # type: ignore[no-untyped-def]
    results: list[int] = []
    t = threading.Thread(target=lambda: results.append(BackendWaits("/a").run(lambda: 3)))
    t.start()
    t.join(5)
    assert results == [3] and events == []
