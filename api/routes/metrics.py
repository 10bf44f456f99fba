"""Metrics routes: ``GET /api/v1/metrics[/files|/pattern|/backend|/blobcache|/inflight]`` (JSON,
spec interfaces.md §8) and ``GET /metrics`` (Prometheus text format, api/prometheus.py).

Owns: ``router`` and ``prometheus_router``. ``id`` is a vfs mountpoint (fs/backend metrics) or a
config id (blobcache); without it the daemon picks the only/first instance. An unknown id is a
404 ``Metrics(Stats(NoCounter))``. ``/metrics/inflight`` answers 204 when nothing is in flight.
Must not import: fs/storage/rafs internals. Thread-safety: plain ``def`` routes run in worker threads.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from api.deps import DaemonDep
from api.responses import EMPTY, METRIC_ERRORS, json_ok, no_content
from api.schemas import (
    AccessPattern,
    BackendMetrics,
    BlobcacheMetrics,
    FilesMetrics,
    FsIoStats,
    InflightRequest,
)

router = APIRouter(prefix="/api/v1/metrics", tags=["metrics"])
prometheus_router = APIRouter(tags=["metrics"])

IdQuery = Annotated[str | None, Query(description="mountpoint (fs, backend) or config id (blobcache)")]


@router.get("", name="metrics_fs", response_model=FsIoStats, responses=METRIC_ERRORS)
def metrics_fs(daemon: DaemonDep, id: IdQuery = None) -> Response:
    return json_ok(daemon.metrics_fs(id))


LatestQuery = Annotated[str | None, Query(description="true: read-and-clear the recently read inodes")]


@router.get("/files", name="metrics_files", response_model=FilesMetrics, responses=METRIC_ERRORS)
def metrics_files(daemon: DaemonDep, id: IdQuery = None, latest: LatestQuery = None) -> Response:
    # upstream parses the value as a Rust bool; anything but "true" means false
    return json_ok(daemon.metrics_files(id, latest == "true"))


@router.get("/pattern", name="metrics_pattern", response_model=list[AccessPattern], responses=METRIC_ERRORS)
def metrics_pattern(daemon: DaemonDep, id: IdQuery = None) -> Response:
    return json_ok(daemon.metrics_pattern(id))


@router.get("/backend", name="metrics_backend", response_model=BackendMetrics, responses=METRIC_ERRORS)
def metrics_backend(daemon: DaemonDep, id: IdQuery = None) -> Response:
    return json_ok(daemon.metrics_backend(id))


@router.get("/blobcache", name="metrics_blobcache", response_model=BlobcacheMetrics,
            responses=METRIC_ERRORS)
def metrics_blobcache(daemon: DaemonDep, id: IdQuery = None) -> Response:
    return json_ok(daemon.metrics_blobcache(id))


@router.get("/inflight", name="metrics_inflight", response_model=list[InflightRequest],
            responses={**EMPTY, **METRIC_ERRORS})
def metrics_inflight(daemon: DaemonDep) -> Response:
    inflight = daemon.metrics_inflight()
    return json_ok(inflight) if inflight else no_content()


@prometheus_router.get("/metrics", name="prometheus_metrics", response_class=Response,
                       responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                                        "description": "Prometheus text exposition format"},
                                  **METRIC_ERRORS})
def prometheus_metrics(request: Request) -> Response:
    # prometheus_client is imported at the first scrape, not on the daemon's start-up path
    from api.prometheus import create_registry, render_prometheus

    state = request.app.state
    registry = getattr(state, "prometheus_registry", None)
    if registry is None:  # two first scrapes at once make two equal registries: harmless
        registry = state.prometheus_registry = create_registry(state.daemon)
    body, content_type = render_prometheus(registry)
    return Response(content=body, media_type=content_type)
