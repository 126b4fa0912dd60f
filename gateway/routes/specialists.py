"""The specialists: the original API's `/specialists` (list, add, delete) and `/v1/specialists`."""

from __future__ import annotations

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse, Response

from gateway.backends import RPC_TIMEOUT
from gateway.deps import Gateway, GatewayDep, R
from gateway.schemas import (
    SpecialistBody,
    corpus_dict,
    operation_dict,
    outcome_dict,
    specialist_dict,
)
from shiftable_lib.config import MAX_DRIFT

router = APIRouter()


@router.get("/specialists")
async def list_specialists(gw: GatewayDep) -> list[str]:
    """Names of the specialists the model serves (the original API's shape)."""
    return await gw.specialists()


@router.post("/specialists", responses={202: {"description": "the operation (wait=false)"}})
async def add_specialist(
    gw: GatewayDep,
    body: SpecialistBody,
    wait: bool = Query(True, description="block until it serves (as the original API)"),
) -> Response:
    """Add a specialist whose corpus is in data/<name>/: train (incremental unless
    `full_retrain`), publish, hot-swap. 400 without a corpus, 409 while another operation
    runs (its id in the message)."""
    op, corpus = await gw.coordinator.add(body.name, body.full_retrain, body.max_drift)
    return await _finish(gw, op, wait, {"corpus": corpus_dict(corpus)})


@router.delete("/specialists/{name}", responses={202: {"description": "the operation"}})
async def delete_specialist(
    gw: GatewayDep,
    name: str,
    wait: bool = Query(True),
    max_drift: float | None = Query(
        None, ge=0.0, le=MAX_DRIFT, description="as POST /specialists's `max_drift`"
    ),
) -> Response:
    """Remove a specialist (never the last one: 409); its corpus moves to data/.deleted/."""
    op = await gw.coordinator.delete(name, max_drift)
    return await _finish(gw, op, wait)


async def _finish(gw: Gateway, op: R.Operation, wait: bool, extra: dict | None = None) -> Response:
    """The reply once the operation ends (`wait`), else at once (202) with the operation;
    `extra` joins either (the corpus an add reads)."""
    extra = extra or {}
    if not wait:
        return JSONResponse({**operation_dict(op), **extra}, status_code=202)
    op = await gw.coordinator.wait(op.id)
    if op.state == R.OPERATION_STATE_CANCELLED:
        detail = f"operation {op.id} was cancelled"
        return JSONResponse({"detail": detail, **operation_dict(op), **extra}, status_code=409)
    if op.state != R.OPERATION_STATE_SUCCEEDED:
        return JSONResponse(
            {"detail": op.error or "the operation did not succeed", **operation_dict(op), **extra},
            status_code=500,
        )
    serving = await gw.backends.registry.GetServing(R.GetServingRequest(), timeout=RPC_TIMEOUT)
    version = serving.serving.version
    if version.id == op.version_id:
        extra["outcome"] = outcome_dict(version, op.target)
    return JSONResponse({"message": op.message, "specialists": await gw.specialists(), **extra})


@router.get("/v1/specialists")
async def specialists_detail(gw: GatewayDep) -> list[dict]:
    """Every specialist the registry knows, with its state (training, ready, failed, ...)."""
    reply = await gw.backends.registry.ListSpecialists(
        R.ListSpecialistsRequest(), timeout=RPC_TIMEOUT
    )
    return [specialist_dict(s) for s in reply.specialists]
