"""Model versions: every version the registry has published, the serving one marked, and an
explicit rollback to one of them."""

from __future__ import annotations

from fastapi import APIRouter

from gateway.backends import RPC_TIMEOUT
from gateway.deps import GatewayDep, R, refusals
from gateway.jobs import OperationFailed
from gateway.schemas import version_dict
from shiftable_lib.errors import Conflict

router = APIRouter()


@router.get("/versions")
async def list_versions(gw: GatewayDep) -> list[dict]:
    """Newest first: id, specialists, profile, held-out metrics, when it was published, and
    whether it is the version served now."""
    reply = await gw.backends.registry.ListVersions(R.ListVersionsRequest(), timeout=RPC_TIMEOUT)
    serving = gw.serving.version.id
    return [version_dict(v, serving=v.id == serving) for v in reply.versions]


@router.post(
    "/versions/{version_id}/rollback",
    responses=refusals(
        {
            404: "No such version",
            409: "The version is marked invalid, holds other specialists than the registry "
            "lists, an operation is running, or a replica could not load it",
            503: "It serves now, but not every replica had loaded it in time",
        }
    ),
)
async def rollback(gw: GatewayDep, version_id: str) -> dict:
    """Serve a version published before again (admin key). Answers once every inference
    replica serves it, with the version."""
    try:
        serving = await gw.coordinator.rollback(version_id)
    except OperationFailed as exc:
        raise Conflict(str(exc)) from None
    return version_dict(serving.version, serving=True)
