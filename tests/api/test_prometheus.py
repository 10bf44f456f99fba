"""``GET /metrics``: Prometheus text format over the daemon's metrics, labelled by mountpoint."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.harness.fakes.daemon import FakeDaemon


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_prometheus_counters_move_with_reads(client: TestClient, daemon: FakeDaemon, bootstrap: Path,
                                             config_text: str) -> None:
    for mp in ("/a", "/b"):
        r = client.post(f"/api/v1/mount?mountpoint={mp}",
                        json={"source": str(bootstrap), "fs_type": "rafs", "config": config_text})
        assert r.status_code == 204
    before = scrape(client)
    assert before[("nydusd_daemon_state", (("state", "RUNNING"),))] == 1.0
    assert before[("nydusd_daemon_state", (("state", "INIT"),))] == 0.0
    assert before[("nydusd_mounts", ())] == 2.0
    assert before[("nydusd_fs_read_bytes_total", (("mountpoint", "/a"),))] == 0.0
    daemon.read("/a", ino=3, size=5000)
    daemon.read("/a", ino=3, size=5000)
    after = scrape(client)
    assert after[("nydusd_fs_read_bytes_total", (("mountpoint", "/a"),))] == 10000.0
    assert after[("nydusd_fs_read_bytes_total", (("mountpoint", "/b"),))] == 0.0
    assert after[("nydusd_fs_fop_hits_total", (("fop", "read"), ("mountpoint", "/a")))] == 2.0
    assert after[("nydusd_fs_reads_by_size_total", (("mountpoint", "/a"), ("size", "4k_16k")))] == 2.0
    assert after[("nydusd_backend_reads_total", (("mountpoint", "/a"),))] == 2.0
    assert after[("nydusd_backend_read_bytes_total", (("mountpoint", "/a"),))] == 10000.0
    assert after[("nydusd_blobcache_reads_total", (("mountpoint", "/a"),))] == 2.0
    assert after[("nydusd_blobcache_data_all_ready", (("mountpoint", "/a"),))] == 0.0


def test_prometheus_without_mounts(client: TestClient) -> None:
    samples = scrape(client)
    assert samples[("nydusd_mounts", ())] == 0.0
    assert not any(name.startswith("nydusd_fs_") for name, _ in samples)
