"""Model versions: every version the registry has published, the serving one marked."""

from __future__ import annotations

from fastapi import APIRouter

from gateway.backends import RPC_TIMEOUT
from gateway.deps import GatewayDep, R
from gateway.schemas import version_dict

router = APIRouter()


@router.get("/versions")
async def list_versions(gw: GatewayDep) -> list[dict]:
    """Newest first: id, specialists, profile, held-out metrics, when it was published, and
    whether it is the version served now."""
    reply = await gw.backends.registry.ListVersions(R.ListVersionsRequest(), timeout=RPC_TIMEOUT)
    serving = gw.serving.version.id
    return [version_dict(v, serving=v.id == serving) for v in reply.versions]
