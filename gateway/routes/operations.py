"""Long-running operations: list, get, and an SSE stream of one until it ends."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from gateway.backends import RPC_TIMEOUT, http_status
from gateway.deps import EVENT_STREAM, GatewayDep, R, refusals
from gateway.schemas import operation_dict, sse
from shiftable_lib.errors import Unavailable

router = APIRouter()

NO_SUCH = "no such operation"


@router.get("/operations")
async def list_operations(
    gw: GatewayDep, unfinished: bool = False, limit: int = Query(20, ge=1, le=100)
):
    reply = await gw.backends.registry.ListOperations(
        R.ListOperationsRequest(unfinished_only=unfinished, limit=limit), timeout=RPC_TIMEOUT
    )
    return [operation_dict(op) for op in reply.operations]


@router.get("/operations/{op_id}", responses=refusals({404: NO_SUCH}))
async def get_operation(gw: GatewayDep, op_id: str) -> dict:
    reply = await gw.backends.registry.GetOperation(
        R.GetOperationRequest(id=op_id), timeout=RPC_TIMEOUT
    )
    return operation_dict(reply.operation)


@router.get(
    "/operations/{op_id}/events",
    response_class=StreamingResponse,
    responses={200: EVENT_STREAM, **refusals({404: NO_SUCH})},
)
async def operation_events(gw: GatewayDep, op_id: str) -> StreamingResponse:
    """Server-Sent Events: the operation object now and on every change, until it ends."""
    call = gw.backends.registry.WatchOperation(R.WatchOperationRequest(id=op_id))
    first = await call.read()  # NOT_FOUND raises here, as a 404
    if first is grpc.aio.EOF:
        raise Unavailable("the registry ended the stream")

    async def events() -> AsyncIterator[str]:
        try:
            reply = first
            while reply is not grpc.aio.EOF:  # read() only: grpc.aio forbids mixing it with
                yield sse("operation", operation_dict(reply.operation))  # `async for`
                reply = await call.read()
        except grpc.aio.AioRpcError as exc:
            yield sse("error", {"status": http_status(exc.code()), "detail": exc.details()})
        finally:
            call.cancel()

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


@router.post(
    "/operations/{op_id}/cancel",
    responses=refusals(
        {404: NO_SUCH, 409: "the operation has ended, is not an add, or is past training"}
    ),
)
async def cancel_operation(gw: GatewayDep, op_id: str) -> dict:
    """Stop an add while it trains; the specialist is then as if never asked for. 409 once the
    operation has ended, is not an add, or has already published its version."""
    return operation_dict(await gw.coordinator.cancel(op_id))
