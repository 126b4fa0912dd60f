"""The registry records the lifecycle coordinator reads and writes: operations, specialists and
the serving version, one typed call each."""

from __future__ import annotations

import grpc

from gateway.backends import RPC_TIMEOUT
from shiftable_lib.errors import Unavailable
from sma.v1 import common_pb2, registry_pb2, registry_pb2_grpc

R = registry_pb2


class LeaseLost(Exception):
    """Another gateway drives the operation now (this one's lease ran out): stop, write nothing."""


class Records:
    """Typed registry calls. Operation writes that pass an `owner` are fenced: the registry
    refuses them unless that owner holds the operation's lease (LeaseLost)."""

    def __init__(self, registry: registry_pb2_grpc.RegistryStub) -> None:
        self.registry = registry

    async def require_serving(self) -> common_pb2.ModelVersion:
        serving = (
            await self.registry.GetServing(R.GetServingRequest(), timeout=RPC_TIMEOUT)
        ).serving
        if not serving.version.id:
            raise Unavailable("the model is still training; try again when it serves")
        return serving.version

    async def create(
        self,
        kind: int,
        target: str,
        full_retrain: bool,
        owner: str,
        lease_s: float,
        max_drift: float | None = None,
    ) -> R.Operation:
        request = R.CreateOperationRequest(
            kind=kind,
            target=target,
            full_retrain=full_retrain,
            owner=owner,
            lease_seconds=lease_s,
            max_drift=max_drift,
        )
        reply = await self.registry.CreateOperation(request, timeout=RPC_TIMEOUT)
        return reply.operation

    async def claim(self, op_id: str, owner: str, lease_s: float) -> R.Operation:
        """Take or renew the lease on driving `op_id`; its `owner` says who holds it now."""
        reply = await self.registry.ClaimOperation(
            R.ClaimOperationRequest(id=op_id, owner=owner, lease_seconds=lease_s),
            timeout=RPC_TIMEOUT,
        )
        return reply.operation

    async def operation(self, op_id: str) -> R.Operation:
        reply = await self.registry.GetOperation(
            R.GetOperationRequest(id=op_id), timeout=RPC_TIMEOUT
        )
        return reply.operation

    async def update(
        self,
        op_id: str,
        state: int = R.OPERATION_STATE_UNSPECIFIED,
        progress: common_pb2.TrainingProgress | None = None,
        owner: str = "",
        **fields: str | bool,
    ) -> R.Operation:
        request = R.UpdateOperationRequest(
            id=op_id, state=state, progress=progress, owner=owner, **fields
        )
        try:
            reply = await self.registry.UpdateOperation(request, timeout=RPC_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            if owner and exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise LeaseLost(exc.details()) from None
            raise
        return reply.operation

    async def specialist(self, name: str) -> R.Specialist | None:
        try:
            reply = await self.registry.GetSpecialist(
                R.GetSpecialistRequest(name=name), timeout=RPC_TIMEOUT
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return reply.specialist

    async def set_specialist(
        self, name: str, state: int, error: str = "", digest: str = ""
    ) -> None:
        await self.registry.UpdateSpecialist(
            R.UpdateSpecialistRequest(name=name, state=state, error=error, corpus_digest=digest),
            timeout=RPC_TIMEOUT,
        )

    async def forget_specialist(self, name: str) -> None:
        try:
            await self.registry.DeleteSpecialist(
                R.DeleteSpecialistRequest(name=name), timeout=RPC_TIMEOUT
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
