"""Record and replay, the recording half: with ``access_pattern`` on, nydusd records when each
file was first read; ``/api/v1/metrics/pattern`` turned into paths (``paths_in_access_order``) is
the order the files were read in, ready to be an image's prefetch list."""

from __future__ import annotations

from pathlib import Path

import pytest

from nydusd.converter.optimize import paths_in_access_order
from nydusd.rafs import load_bootstrap
from tests.harness.apiclient import ApiClient
from tests.harness.daemon import Nydusd
from tests.harness.images import build_daemon_image, sample_tree

pytestmark = pytest.mark.fuse


def test_first_reads_are_recorded_in_order(tmp_path: Path) -> None:
    image = build_daemon_image(sample_tree(tmp_path / "src", big=False), tmp_path / "img")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sock = str(tmp_path / "api.sock")
    cfg = image.write_config(tmp_path / "cfg.json", tmp_path / "cache", access_pattern=True)
    order = ["/dir/sub/f007", "/dir/sub/deeper/leaf.bin", "/dir/sub/f002", "/dir/exact_chunk"]
    with Nydusd(["--config", cfg, "--bootstrap", image.bootstrap, "--mountpoint", str(mnt),
                 "--apisock", sock], mnt, log_path=tmp_path / "log", apisock=sock) as d:
        try:
            for path in order + order[::-1]:              # re-reads do not move a file
                with open(str(mnt) + path, "rb") as f:
                    assert f.read()
            status, pattern = ApiClient(sock).request("GET", "/api/v1/metrics/pattern")
            assert status == 200, pattern
        finally:
            d.terminate()
    with load_bootstrap(image.bootstrap) as sb:
        assert paths_in_access_order(sb, pattern) == order
    assert {p["nr_read"] >= 1 for p in pattern} == {True}
