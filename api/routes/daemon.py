"""Daemon routes: ``/api/v1/daemon`` (info, log level, events, backend, start, exit, fuse takeover),
``/api/v1/config`` and the v2 daemon/blob routes (spec interfaces.md §3.1).

Owns: the routers ``router`` (v1 daemon), ``config_router`` (v1 config) and ``v2_router``.
Each route parses, calls one daemon method and returns; failures are NydusErrors rendered by
api/errors.py. sendfd/takeover drive the daemon's hand-over to/from its supervisor; fscache blob
management is not supported and answers 501 ``Unsupported`` (upstream's reply without it).
Must not import: fs/storage/rafs internals. Thread-safety: plain ``def`` routes run in worker threads.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Response

from api.deps import DaemonDep
from api.responses import EMPTY, ERRORS, METRIC_ERRORS, json_ok, no_content
from api.schemas import DaemonConf, DaemonInfo, Events, FsBackendInfo
from nydusd.errors import Unsupported

router = APIRouter(prefix="/api/v1/daemon", tags=["daemon"])
config_router = APIRouter(prefix="/api/v1/config", tags=["daemon"])
v2_router = APIRouter(prefix="/api/v2", tags=["v2"])

MountpointQuery = Annotated[str, Query(description="mountpoint inside the pseudo fs, e.g. /sid")]
IdQuery = Annotated[str | None, Query(description="mountpoint / config id")]


@router.get("", name="daemon_info", response_model=DaemonInfo, responses=METRIC_ERRORS)
def daemon_info(daemon: DaemonDep) -> Response:
    return json_ok(daemon.info())


@router.put("", name="configure_daemon", status_code=204, responses={**EMPTY, **ERRORS})
def configure_daemon(conf: DaemonConf, daemon: DaemonDep) -> Response:
    daemon.set_config(conf.model_dump())
    return no_content()


@router.get("/events", name="daemon_events", response_model=Events, responses=ERRORS)
def daemon_events(daemon: DaemonDep) -> Response:
    return json_ok(daemon.events())


@router.get("/backend", name="daemon_backend", response_model=FsBackendInfo, responses=METRIC_ERRORS)
def daemon_backend(mountpoint: MountpointQuery, daemon: DaemonDep) -> Response:
    return json_ok(daemon.backend_info(mountpoint))


@router.put("/start", name="daemon_start", status_code=204, responses={**EMPTY, **ERRORS})
def daemon_start(daemon: DaemonDep) -> Response:
    daemon.start()
    return no_content()


@router.put("/exit", name="daemon_exit", status_code=204, responses={**EMPTY, **ERRORS})
def daemon_exit(daemon: DaemonDep) -> Response:
    daemon.exit()
    return no_content()


@router.put("/fuse/sendfd", name="fuse_sendfd", status_code=204, responses={**EMPTY, **ERRORS})
def fuse_sendfd(daemon: DaemonDep) -> Response:
    daemon.sendfd()
    return no_content()


@router.put("/fuse/takeover", name="fuse_takeover", status_code=204, responses={**EMPTY, **ERRORS})
def fuse_takeover(daemon: DaemonDep) -> Response:
    daemon.takeover()
    return no_content()


@config_router.get("", name="get_config", response_model=dict[str, str], responses=ERRORS)
def get_config(daemon: DaemonDep, id: IdQuery = None) -> Response:
    return json_ok(daemon.get_config(id))


@config_router.put("", name="update_config", status_code=204, responses={**EMPTY, **ERRORS})
def update_config(conf: Annotated[dict[str, str], Body()], daemon: DaemonDep,
                  id: IdQuery = None) -> Response:
    daemon.update_config(id or "", conf)
    return no_content()


@v2_router.get("/daemon", name="daemon_info_v2", response_model=DaemonInfo, responses=METRIC_ERRORS)
def daemon_info_v2(daemon: DaemonDep) -> Response:
    return json_ok({**daemon.info(), "backend_collection": None})


@v2_router.put("/daemon", name="configure_daemon_v2", status_code=204, responses={**EMPTY, **ERRORS})
def configure_daemon_v2(conf: DaemonConf, daemon: DaemonDep) -> Response:
    daemon.set_config(conf.model_dump())
    return no_content()


@v2_router.put("/blobs", name="create_blob_object", status_code=204, responses={**EMPTY, **ERRORS})
def create_blob_object(entry: Annotated[dict[str, Any], Body()]) -> Response:
    raise Unsupported("blob cache entries (fscache/singleton mode) are not supported by this nydusd")


@v2_router.get("/blobs", name="get_blob_objects", status_code=204, responses={**EMPTY, **ERRORS})
def get_blob_objects(domain_id: Annotated[str | None, Query()] = None) -> Response:
    raise Unsupported("listing blob cache entries is not supported (upstream leaves it unimplemented)")


@v2_router.delete("/blobs", name="delete_blob_object", status_code=204, responses={**EMPTY, **ERRORS})
def delete_blob_object(domain_id: Annotated[str | None, Query()] = None,
                       blob_id: Annotated[str | None, Query()] = None) -> Response:
    if domain_id is None and blob_id is not None:
        # cache-file GC for one blob: upstream FUSE daemons answer it as a no-op
        return no_content()
    raise Unsupported("blob cache entries (fscache/singleton mode) are not supported by this nydusd")
