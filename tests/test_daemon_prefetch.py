"""Which prefetch pass a mount runs (``nydusd.daemon.instance`` fs_prefetch): the image's prefetch table as
one ordered hint list, ``prefetch_all`` (or a table listing ``/``, nydusify's default) as the bulk
pass that stays behind the container's reads."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from nydusd.config import load_config
from nydusd.daemon.instance import build_rafs_instance
from nydusd.storage.device import BlobDevice
from tests.harness.images import build_daemon_image, sample_tree


def submissions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefetch: tuple[str, ...],
                prefetch_all: bool) -> list[tuple[int, bool]]:
    """(chunks, bulk) of every ``BlobDevice.prefetch`` call the mount makes."""
    calls: list[tuple[int, bool]] = []

    def record(self: BlobDevice, chunks: Any, *, merge_limit: int | None = None, bulk: bool = False) -> int:
        calls.append((len(list(chunks)), bulk))
        return 1

    monkeypatch.setattr(BlobDevice, "prefetch", record)
    image = build_daemon_image(sample_tree(tmp_path / "src", big=False), tmp_path / "img", prefetch=prefetch)
    cfg = image.config(tmp_path / "cache", fs_prefetch={"enable": True, "prefetch_all": prefetch_all})
    inst = build_rafs_instance("/m", image.bootstrap, load_config(json.dumps(cfg)))
    try:
        for t in threading.enumerate():
            if t.name == "prefetch-/m":
                t.join(10)
    finally:
        inst.close()
    return calls


def test_a_table_of_files_is_one_hinted_submission(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = submissions(tmp_path, monkeypatch, ("/dir/sub/f003", "/dir/exact_chunk"), False)
    assert len(calls) == 1 and calls[0][1] is False and calls[0][0] >= 2


def test_a_table_listing_root_is_the_bulk_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = submissions(tmp_path, monkeypatch, ("/",), False)
    assert calls and all(bulk for _, bulk in calls)


def test_prefetch_all_after_the_hints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = submissions(tmp_path, monkeypatch, ("/dir/exact_chunk",), True)
    assert calls[0][1] is False and len(calls) > 1 and all(bulk for _, bulk in calls[1:])
