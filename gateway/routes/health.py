"""`/`, `/health` and `/metrics`."""

from __future__ import annotations

import asyncio

import grpc
from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse, Response

from gateway.coordinator import cannot_load, serves_everywhere
from gateway.deps import FRONTEND, GatewayDep, R
from gateway.schemas import artifact_paths
from shiftable_lib.sampling import is_plain
from sma.v1 import inference_pb2

router = APIRouter()


@router.get("/", include_in_schema=False)
async def index(gw: GatewayDep) -> Response:
    page = FRONTEND / "index.html"
    if page.is_file():
        return FileResponse(page)
    return HTMLResponse(
        "<!doctype html><title>Shiftable</title><h1>Shiftable</h1>"
        '<p>The API is up: see <a href="/docs">/docs</a> and <a href="/health">/health</a>.'
    )


@router.get("/health")
async def health(gw: GatewayDep) -> dict:
    """The original API's fields, plus readiness, serving version, first-start progress and the
    health of each gRPC service."""
    services, info, first_start = await asyncio.gather(
        gw.backends.health(), gw.model_info(), gw.first_start()
    )
    version = gw.serving.version
    initialized = gw.generates(info)
    # a first start is over once its operation has recorded the specialists, a moment after
    # the model serves: until then the stack is not ready, though /generate already answers
    up = all(s["status"] == "SERVING" for s in services.values())
    # and the serving version is what every replica loaded, by the registry's records and by
    # the replica that answered: not so while a hot swap or a fallback is under way
    agreed = (
        info is not None
        and bool(version.id)
        and version.id == info.version_id
        and serves_everywhere(gw.serving, version.id)
    )
    ready = initialized and up and first_start is None and agreed
    # a replica that cannot load the serving version (it says why in `replicas`)
    broken = bool(version.id) and bool(cannot_load(gw.serving, version.id))
    if ready:
        status = "ok"
    elif initialized and (not up or broken):
        status = "degraded"
    else:
        status = "loading" if initialized and first_start is None else "initializing"
    try:
        specialists = await gw.specialists()
    except grpc.aio.AioRpcError:
        specialists = list(version.specialists)
    return {
        "initialized": initialized,
        "device": info.device if info is not None and info.device else None,
        **artifact_paths(version.artifact_dir),
        "specialists": specialists,
        "ready": ready,
        "status": status,
        "serving_version": version.id or None,
        "loaded_version": gw.serving.loaded_version_id or None,
        "profile": version.profile or None,
        "model": _model(info),
        "first_start": first_start,
        "boot": gw.coordinator.boot_error,
        "services": services,
        "replicas": [
            {"id": r.id, "version": r.version_id or None, "load_error": r.load_error or None}
            for r in gw.serving.replicas
        ],
    }


@router.get("/livez")
async def livez() -> dict:
    """200 while the gateway's process answers at all (a liveness probe)."""
    return {"alive": True}


@router.get("/readyz")
async def readyz(gw: GatewayDep) -> dict:
    """200 once this gateway can serve generation, else 503 saying why (a readiness probe)."""
    info = await gw.require_generation()
    return {"ready": True, "version": info.version_id}


def _model(info: inference_pb2.GetModelInfoResponse | None) -> dict | None:
    if info is None or not info.version_id:
        return None
    return {
        "context": info.context,
        "n_layer": info.n_layer,
        "d_model": info.d_model,
        "vocab_size": info.vocab_size,
        "max_batch": info.max_batch,
        "active_streams": info.active_streams,
        "queued": info.queued,
        # "own": an instruct model's template, which chats go through (`messages`)
        "chat_template": "plain" if is_plain(info.chat_template) else "own",
        "dtype": info.dtype or None,
        "threads": info.threads or None,  # CPU decode threads; None on a GPU
    }


@router.get("/metrics", include_in_schema=False)
async def metrics(gw: GatewayDep) -> Response:
    """Prometheus text: requests, tokens, time to first token, inter-token latency, finished
    generations, replicas' versions and training progress."""
    info = await gw.model_info()
    try:  # the registry being down is no reason to lose the rest of the scrape
        running = await gw.backends.registry.ListOperations(
            R.ListOperationsRequest(unfinished_only=True), timeout=2.0
        )
        operations: list | None = list(running.operations)
    except grpc.aio.AioRpcError:
        operations = None
    gw.metrics.observe_state(info, operations)
    gw.metrics.observe_replicas(gw.serving)
    body, content_type = gw.metrics.render()
    return Response(body, media_type=content_type)
