"""What the routes share: the `Gateway` (settings, gRPC backends, the lifecycle coordinator,
the serving state) and a FastAPI dependency that hands it out."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import grpc
from fastapi import Depends, Request
from pydantic import BaseModel

from gateway.backends import RPC_TIMEOUT, Backends
from gateway.coordinator import Coordinator
from gateway.metrics import Metrics
from gateway.schemas import operation_dict
from shiftable_lib.config import Settings
from shiftable_lib.errors import Overloaded, Unavailable
from sma.v1 import inference_pb2, registry_pb2

log = logging.getLogger("sma.gateway")
R = registry_pb2
FRONTEND = Path(__file__).resolve().parent.parent / "frontend"
SERVED = (R.SPECIALIST_STATE_READY, R.SPECIALIST_STATE_DELETING)


class Gateway:
    """What the routes share: settings, gRPC backends, the coordinator, the serving state."""

    backends: Backends
    coordinator: Coordinator

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.serving = R.ServingState()
        self.tasks: list[asyncio.Task] = []
        self.client_streams: Counter[str] = Counter()  # generations running, by client

    async def start(self) -> None:
        """Connect (grpc.aio channels belong to the loop that creates them) and boot."""
        self.backends = Backends.connect(self.settings)
        self.coordinator = Coordinator(self.settings, self.backends)
        self.tasks = [
            asyncio.create_task(self.coordinator.boot(), name="boot"),
            asyncio.create_task(self._follow_serving(), name="serving"),
        ]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.coordinator.close()
        await self.backends.close()

    async def _follow_serving(self) -> None:
        """Keep `self.serving` in step with the registry (reconnecting when it restarts)."""
        while True:
            try:
                stream = self.backends.registry.WatchServing(
                    R.WatchServingRequest(), wait_for_ready=True
                )
                async for reply in stream:
                    self.serving = reply.serving
            except grpc.aio.AioRpcError as exc:
                log.debug("serving watch interrupted: %s", exc.details())
            await asyncio.sleep(0.5)

    @property
    def initialized(self) -> bool:
        return bool(self.serving.loaded_version_id)

    async def first_start(self) -> dict | None:
        """The unfinished first-start operation, if any (its progress feeds /health and 503s)."""
        try:
            reply = await self.backends.registry.ListOperations(
                R.ListOperationsRequest(unfinished_only=True), timeout=2.0
            )
        except grpc.aio.AioRpcError:
            return None
        for op in reply.operations:
            if op.kind == R.OPERATION_KIND_INITIALIZE:
                return operation_dict(op)
        return None

    async def require_model(self) -> None:
        if self.initialized:
            return
        first = await self.first_start()
        if first is not None:
            raise Unavailable(f"model is training ({first['progress']['percent']:.0f}%)")
        raise Unavailable("no model is serving yet")

    def generates(self, info: inference_pb2.GetModelInfoResponse | None) -> bool:
        """Whether /generate answers now: the registry says a version is loaded and the inference
        server (`info`, from `model_info`) has a model (not so while a restarted one loads)."""
        return self.initialized and info is not None and bool(info.version_id)

    async def require_generation(self) -> inference_pb2.GetModelInfoResponse:
        """Inference's model info, or Unavailable saying why /generate would answer 503."""
        await self.require_model()
        info = await self.model_info()
        if info is None:
            raise Unavailable("the inference server does not answer")
        if not info.version_id:
            raise Unavailable(info.load_error or "no model is loaded yet")
        return info

    @contextlib.contextmanager
    def client_stream(self, client: str) -> Iterator[None]:
        """Hold one of `client`'s generation slots (Overloaded when it has them all), so that
        one client cannot take every decode slot from the others."""
        limit = self.settings.max_streams_per_client
        if limit and self.client_streams[client] >= limit:
            raise Overloaded(
                f"this client has {limit} generations running, the most one may "
                "(SMA_MAX_STREAMS_PER_CLIENT): wait for one to end"
            )
        self.client_streams[client] += 1
        try:
            yield
        finally:
            self.client_streams[client] -= 1
            if not self.client_streams[client]:
                del self.client_streams[client]

    async def specialists(self) -> list[str]:
        reply = await self.backends.registry.ListSpecialists(
            R.ListSpecialistsRequest(), timeout=RPC_TIMEOUT
        )
        return [s.name for s in reply.specialists if s.state in SERVED]

    async def model_info(self) -> inference_pb2.GetModelInfoResponse | None:
        """Inference's model info, from a replica that has a model if any has: each call goes
        to the next replica (round robin), and /generate reaches a loaded one the same way (a
        replica with no model refuses it, and the call is retried on another). One try more
        than the replicas the registry knows: one that has not reported yet may answer first."""
        info = None
        for _ in range(len(self.serving.replicas) + 1):
            try:
                info = await self.backends.inference.GetModelInfo(
                    inference_pb2.GetModelInfoRequest(), timeout=1.0
                )
            except grpc.aio.AioRpcError:
                continue
            if info.version_id:
                break
        return info


def gateway(request: Request) -> Gateway:
    return request.app.state.gateway


def client_of(request: Request) -> str:
    """Who is calling, for per-client limits: its API key (as a digest) when it sends one,
    else its address."""
    header = request.headers.get("authorization", "")
    if header:
        return "key:" + hashlib.sha256(header.encode()).hexdigest()[:16]
    return "address:" + (request.client.host if request.client else "unknown")


GatewayDep = Annotated[Gateway, Depends(gateway)]


class Refusal(BaseModel):
    """The body of a refusal (any 4xx or 5xx but FastAPI's 422): a sentence for the user."""

    detail: str


def refusals(descriptions: dict[int, str]) -> dict[int | str, dict]:
    """A route's `responses=` for the refusals it may answer, each with a Refusal body."""
    return {code: {"model": Refusal, "description": text} for code, text in descriptions.items()}


# the 200 of an SSE route (FastAPI declares a StreamingResponse's without a media type)
EVENT_STREAM = {"description": "Server-Sent Events", "content": {"text/event-stream": {}}}
