"""Prometheus exposition of the daemon's metrics (``GET /metrics``): the home of prometheus-client.

Owns: ``DaemonCollector`` (a custom collector that reads the daemon's JSON metrics at scrape time,
so there is no second set of counters to keep in sync), ``create_registry`` and
``render_prometheus``. Families are labelled by ``mountpoint``: filesystem (``nydusd_fs_*``, spec
§8.1), backend (``nydusd_backend_*``, §8.3), blob cache (``nydusd_blobcache_*``, §8.4) and daemon
(``nydusd_daemon_state``, ``nydusd_mounts``). A mount whose counters vanish between listing and
reading (umounted meanwhile) is skipped, never an error.
Must not import: fs/storage/rafs internals; prometheus_client is imported only here.
Thread-safety: ``collect`` runs in the scraping request's worker thread; it only calls the
daemon's thread-safe read methods.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from api.deps import DaemonApi
from nydusd.errors import NydusError
from nydusd.metrics import StatsFop

log = structlog.get_logger(__name__)

STATES = ("INIT", "READY", "RUNNING", "STOPPED", "UNKNOWN")
SIZE_BUCKETS = ("lt_1k", "1k_4k", "4k_16k", "16k_64k", "64k_128k", "128k_512k", "512k_1m", "ge_1m")
FOPS = tuple(f.name.lower() for f in StatsFop)
MP = ["mountpoint"]

# (family name, JSON field, help, is_counter) for scalar values of each metrics object
FS_SCALARS = (
    ("nydusd_fs_read_bytes", "data_read", "Bytes returned by successful reads.", True),
    ("nydusd_fs_open_files", "nr_opens", "Files currently open.", False),
)
BACKEND_SCALARS = (
    ("nydusd_backend_reads", "read_count", "Backend read requests.", True),
    ("nydusd_backend_read_errors", "read_errors", "Failed backend read requests.", True),
    ("nydusd_backend_read_bytes", "read_amount_total", "Bytes read from the backend.", True),
    ("nydusd_backend_read_latency_milliseconds", "read_cumulative_latency_millis_total",
     "Cumulative backend read latency.", True),
)
BLOBCACHE_SCALARS = (
    ("nydusd_blobcache_reads", "total", "Reads served by the blob cache.", True),
    ("nydusd_blobcache_whole_hits", "whole_hits", "Reads whose chunks were all cached.", True),
    ("nydusd_blobcache_partial_hits", "partial_hits", "Reads with some chunks cached.", True),
    ("nydusd_blobcache_entries", "entries_count", "Chunks ready in the cache.", False),
    ("nydusd_blobcache_prefetch_bytes", "prefetch_data_amount", "Bytes prefetched.", True),
    ("nydusd_blobcache_prefetch_requests", "prefetch_requests_count", "Prefetch requests.", True),
    ("nydusd_blobcache_buffered_backend_bytes", "buffered_backend_size", "Buffered backend bytes.", False),
    ("nydusd_blobcache_data_all_ready", "data_all_ready", "1 when every chunk is cached.", False),
)
FS_ARRAYS = (
    ("nydusd_fs_fop_hits", "fop_hits", "Successful filesystem operations.", "fop", FOPS),
    ("nydusd_fs_fop_errors", "fop_errors", "Failed filesystem operations.", "fop", FOPS),
    ("nydusd_fs_fop_latency_microseconds", "fop_cumulative_latency_total",
     "Cumulative latency per filesystem operation.", "fop", FOPS),
    ("nydusd_fs_reads_by_size", "block_count_read", "Reads per size bucket.", "size", SIZE_BUCKETS),
)


Family = CounterMetricFamily | GaugeMetricFamily


class _Families:
    """Lazily created metric families, one per name, reused across mountpoints."""

    def __init__(self) -> None:
        self.by_name: dict[str, Family] = {}

    def get(self, name: str, doc: str, counter: bool, labels: list[str]) -> Family:
        if name not in self.by_name:
            family: Family = (CounterMetricFamily(name, doc, labels=labels) if counter
                              else GaugeMetricFamily(name, doc, labels=labels))
            self.by_name[name] = family
        return self.by_name[name]


class DaemonCollector(Collector):
    """Reads the daemon's metrics at scrape time and yields Prometheus families."""

    def __init__(self, daemon: DaemonApi) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        families = _Families()
        state = GaugeMetricFamily("nydusd_daemon_state", "1 for the daemon's current state.",
                                  labels=["state"])
        current = self.daemon.state
        for name in STATES:
            state.add_metric([name], 1.0 if name == current else 0.0)
        mounts = self.daemon.mounts()
        yield state
        yield GaugeMetricFamily("nydusd_mounts", "Mounted filesystem instances.", value=len(mounts))
        for mp, mount in sorted(mounts.items()):
            self._fs(families, mp)
            self._scalars(families, mp, BACKEND_SCALARS, self._read(self.daemon.metrics_backend, mp))
            self._scalars(families, mp, BLOBCACHE_SCALARS,
                          self._read(self.daemon.metrics_blobcache, _cache_id(mp, mount)))
        yield from families.by_name.values()

    def _fs(self, families: _Families, mp: str) -> None:
        stats = self._read(self.daemon.metrics_fs, mp)
        self._scalars(families, mp, FS_SCALARS, stats)
        if stats is None:
            return
        for name, field, doc, label, names in FS_ARRAYS:
            family = families.get(name, doc, True, [*MP, label])
            for label_value, value in zip(names, stats.get(field, ()), strict=False):
                family.add_metric([mp, label_value], float(value))

    @staticmethod
    def _scalars(families: _Families, mp: str, table: tuple[tuple[str, str, str, bool], ...],
                 stats: dict[str, Any] | None) -> None:
        if stats is None:
            return
        for name, field, doc, counter in table:
            if field in stats:
                families.get(name, doc, counter, MP).add_metric([mp], float(stats[field]))

    @staticmethod
    def _read(method: Callable[[str], dict[str, Any]], id: str) -> dict[str, Any] | None:
        try:
            return method(id)
        except NydusError as e:
            # e.g. umounted between mounts() and this read, or a mount without a blob cache
            log.debug("prometheus_metric_skipped", id=id, error=str(e))
            return None


def _cache_id(mountpoint: str, mount: dict[str, Any]) -> str:
    """Blob cache metrics are keyed by the mount's config id (spec §3.1), else by its mountpoint."""
    config = mount.get("config")
    cfg_id = config.get("id") if isinstance(config, dict) else None
    return cfg_id if isinstance(cfg_id, str) and cfg_id else mountpoint


def create_registry(daemon: DaemonApi) -> CollectorRegistry:
    """A registry holding only the collector of ``daemon`` (no process/platform collectors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(daemon))
    return registry


def render_prometheus(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The text exposition of ``registry`` and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
