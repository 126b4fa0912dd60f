"""The FastAPI gateway: the seed's REST surface, SSE streams, metrics and the web UI, over gRPC.

Routes stay thin: they validate the body, call one service (or the lifecycle coordinator) and
translate the answer. gRPC status codes become HTTP statuses in one exception handler.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.backends import Backends, error_status, http_status
from gateway.coordinator import Coordinator, artifact_paths
from gateway.metrics import Metrics
from gateway.schemas import (
    FINISH,
    GenerateBody,
    InspectBody,
    SpecialistBody,
    gate_summary,
    operation_dict,
    specialist_dict,
    usage,
)
from shiftable_lib.config import Settings
from shiftable_lib.errors import ShiftableError, Unavailable
from sma.v1 import inference_pb2, registry_pb2

log = logging.getLogger("sma.gateway")
R = registry_pb2
FRONTEND = Path(__file__).resolve().parent.parent / "frontend"
MAX_BODY = 1024 * 1024
RPC_TIMEOUT = 15.0
SERVED = (R.SPECIALIST_STATE_READY, R.SPECIALIST_STATE_DELETING)


class LimitBody:
    """Answer 413 to a body over MAX_BODY bytes before any route reads it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
                response = JSONResponse(
                    {"detail": f"request body over {MAX_BODY} bytes"}, status_code=413
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Gateway:
    """What the routes share: settings, gRPC backends, the coordinator, the serving state."""

    backends: Backends
    coordinator: Coordinator

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.serving = R.ServingState()
        self.tasks: list[asyncio.Task] = []

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

    async def specialists(self) -> list[str]:
        reply = await self.backends.registry.ListSpecialists(
            R.ListSpecialistsRequest(), timeout=RPC_TIMEOUT
        )
        return [s.name for s in reply.specialists if s.state in SERVED]

    async def model_info(self) -> inference_pb2.GetModelInfoResponse | None:
        try:
            return await self.backends.inference.GetModelInfo(
                inference_pb2.GetModelInfoRequest(), timeout=1.0
            )
        except grpc.aio.AioRpcError:
            return None


def create_app(settings: Settings) -> FastAPI:
    gw = Gateway(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await gw.start()
        yield
        await gw.stop()

    app = FastAPI(
        title="Shiftable",
        version="1",
        summary="A language model that grows domain specialists at runtime",
        lifespan=lifespan,
    )
    app.state.gateway = gw
    app.add_middleware(LimitBody)

    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        gw.metrics.request(
            request.method, getattr(route, "path", "unmatched"), response.status_code
        )
        return response

    @app.exception_handler(grpc.aio.AioRpcError)
    async def grpc_error(_: Request, exc: grpc.aio.AioRpcError) -> JSONResponse:
        return JSONResponse({"detail": exc.details()}, status_code=http_status(exc.code()))

    @app.exception_handler(ShiftableError)
    async def domain_error(_: Request, exc: ShiftableError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=error_status(exc))

    @app.exception_handler(ValueError)
    async def value_error(_: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    # ---- the seed's surface ------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        page = FRONTEND / "index.html"
        if page.is_file():
            return FileResponse(page)
        return HTMLResponse(
            "<!doctype html><title>Shiftable</title><h1>Shiftable</h1>"
            '<p>The API is up: see <a href="/docs">/docs</a> and <a href="/health">/health</a>.'
        )

    @app.get("/health")
    async def health() -> dict:
        """The seed's fields, plus readiness, serving version, first-start progress and the
        health of each gRPC service."""
        services, info = await asyncio.gather(gw.backends.health(), gw.model_info())
        version = gw.serving.version
        ready = gw.initialized and all(s["status"] == "SERVING" for s in services.values())
        try:
            specialists = await gw.specialists()
        except grpc.aio.AioRpcError:
            specialists = list(version.specialists)
        return {
            "initialized": gw.initialized,
            "device": info.device if info is not None and info.device else None,
            **artifact_paths(version.artifact_dir),
            "specialists": specialists,
            "ready": ready,
            "status": "ok" if ready else ("degraded" if gw.initialized else "initializing"),
            "serving_version": version.id or None,
            "loaded_version": gw.serving.loaded_version_id or None,
            "profile": version.profile or None,
            "model": _model(info),
            "first_start": await gw.first_start(),
            "boot": gw.coordinator.boot_error,
            "services": services,
        }

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
        }

    @app.get("/specialists")
    async def list_specialists() -> list[str]:
        """Names of the specialists the model serves (the seed's shape)."""
        return await gw.specialists()

    @app.post("/specialists", responses={202: {"description": "the operation (wait=false)"}})
    async def add_specialist(
        body: SpecialistBody,
        wait: bool = Query(True, description="block until the specialist serves, as the seed"),
    ) -> Response:
        """Add a specialist whose corpus is in data/<name>/: train (incremental unless
        `full_retrain`), publish, hot-swap. 400 without a corpus, 409 while another operation
        runs (its id in the message)."""
        op = await gw.coordinator.add(body.name, body.full_retrain)
        return await _finish(op, wait)

    @app.delete("/specialists/{name}", responses={202: {"description": "the operation"}})
    async def delete_specialist(name: str, wait: bool = Query(True)) -> Response:
        """Remove a specialist (never the last one: 409); its corpus moves to data/.deleted/."""
        op = await gw.coordinator.delete(name)
        return await _finish(op, wait)

    async def _finish(op: R.Operation, wait: bool) -> Response:
        if not wait:
            return JSONResponse(operation_dict(op), status_code=202)
        op = await gw.coordinator.wait(op.id)
        if op.state != R.OPERATION_STATE_SUCCEEDED:
            return JSONResponse(
                {"detail": op.error or "the operation did not succeed", **operation_dict(op)},
                status_code=500,
            )
        return JSONResponse({"message": op.message, "specialists": await gw.specialists()})

    @app.post("/generate")
    async def generate(body: GenerateBody) -> dict:
        """The whole completion at once (the seed's shape, plus usage and gate weights)."""
        await gw.require_model()
        parts: list[str] = []
        last = None
        async for message in _stream(body):
            parts.append(message.text)
            last = message
        completion = "".join(parts)
        return {
            "prompt": body.prompt,
            "completion": completion,
            "full_text": body.prompt + completion,
            "specialists": list(gw.serving.version.specialists),  # no registry call per request
            **_final(last),
        }

    async def _stream(body: GenerateBody) -> AsyncIterator[inference_pb2.GenerateResponse]:
        """Messages of one Generate call; the call is cancelled if the consumer stops."""
        call = gw.backends.inference.Generate(body.to_proto())
        timer = gw.metrics.stream_timer()
        try:
            async for message in call:
                timer.tick(len(message.token_ids))
                yield message
        finally:
            call.cancel()

    @app.post("/generate/stream", response_class=StreamingResponse)
    async def generate_stream(body: GenerateBody) -> StreamingResponse:
        """Server-Sent Events: `token` events with text deltas, then one `done` event with the
        finish reason, usage and gate weights. Errors before the first token are plain HTTP
        errors; a later one is an `error` event."""
        await gw.require_model()
        messages = _stream(body)
        first = await anext(messages)  # bad parameters raise here, as a 4xx

        async def events() -> AsyncIterator[str]:
            text = []
            message = first
            try:
                while True:
                    text.append(message.text)
                    yield _sse(
                        "token", {"text": message.text, "token_ids": list(message.token_ids)}
                    )
                    if message.finish_reason:
                        yield _sse("done", {"completion": "".join(text), **_final(message)})
                        return
                    message = await anext(messages)
            except StopAsyncIteration:
                yield _sse("error", {"status": 502, "detail": "the stream ended early"})
            except grpc.aio.AioRpcError as exc:
                yield _sse("error", {"status": http_status(exc.code()), "detail": exc.details()})
            finally:
                await messages.aclose()

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    def _final(message: inference_pb2.GenerateResponse | None) -> dict:
        if message is None:
            return {}
        return {
            "finish_reason": FINISH.get(message.finish_reason),
            "usage": usage(message.usage),
            "version": message.version_id,
            **gate_summary(list(message.gate_means)),
        }

    # ---- the rest of the API -----------------------------------------------------------------

    @app.post("/inspect_gates")
    async def inspect_gates(body: InspectBody) -> dict:
        """Gate weights per layer and expert for a prompt: which experts the model leans on."""
        await gw.require_model()
        reply = await gw.backends.inference.InspectGates(
            inference_pb2.InspectGatesRequest(prompt=body.prompt, routing=body.routing.to_proto()),
            timeout=RPC_TIMEOUT,
        )
        experts = list(reply.experts)
        layers = []
        for i, layer in enumerate(reply.layers):
            entry = {"layer": i, "mean": dict(zip(experts, layer.mean, strict=True))}
            if body.per_position:
                n = len(experts)
                flat = list(layer.per_position)
                entry["per_position"] = [flat[j : j + n] for j in range(0, len(flat), n)]
            layers.append(entry)
        return {
            "experts": experts,
            "tokens": list(reply.tokens),
            "layers": layers,
            "version": reply.version_id,
            "truncated_prompt_tokens": reply.truncated_prompt_tokens,
        }

    @app.get("/v1/specialists")
    async def specialists_detail() -> list[dict]:
        """Every specialist the registry knows, with its state (training, ready, failed, ...)."""
        reply = await gw.backends.registry.ListSpecialists(
            R.ListSpecialistsRequest(), timeout=RPC_TIMEOUT
        )
        return [specialist_dict(s) for s in reply.specialists]

    @app.get("/operations")
    async def list_operations(unfinished: bool = False, limit: int = Query(20, ge=1, le=100)):
        reply = await gw.backends.registry.ListOperations(
            R.ListOperationsRequest(unfinished_only=unfinished, limit=limit), timeout=RPC_TIMEOUT
        )
        return [operation_dict(op) for op in reply.operations]

    @app.get("/operations/{op_id}")
    async def get_operation(op_id: str) -> dict:
        reply = await gw.backends.registry.GetOperation(
            R.GetOperationRequest(id=op_id), timeout=RPC_TIMEOUT
        )
        return operation_dict(reply.operation)

    @app.get("/operations/{op_id}/events", response_class=StreamingResponse)
    async def operation_events(op_id: str) -> StreamingResponse:
        """Server-Sent Events: the operation object now and on every change, until it ends."""
        call = gw.backends.registry.WatchOperation(R.WatchOperationRequest(id=op_id))
        first = await call.read()  # NOT_FOUND raises here, as a 404
        if first is grpc.aio.EOF:
            raise Unavailable("the registry ended the stream")

        async def events() -> AsyncIterator[str]:
            try:
                reply = first
                while reply is not grpc.aio.EOF:  # read() only: grpc.aio forbids mixing it with
                    yield _sse("operation", operation_dict(reply.operation))  # `async for`
                    reply = await call.read()
            except grpc.aio.AioRpcError as exc:
                yield _sse("error", {"status": http_status(exc.code()), "detail": exc.details()})
            finally:
                call.cancel()

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        """Prometheus text: requests, tokens, time to first token, inter-token latency, queue
        depth, active streams and training progress."""
        info = await gw.model_info()
        running = await gw.backends.registry.ListOperations(
            R.ListOperationsRequest(unfinished_only=True), timeout=2.0
        )
        gw.metrics.observe_state(info, list(running.operations))
        body, content_type = gw.metrics.render()
        return Response(body, media_type=content_type)

    if FRONTEND.is_dir():
        app.mount("/static", StaticFiles(directory=FRONTEND), name="static")
    return app


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def main(settings: Settings) -> None:
    """`sma serve gateway`: run the app with uvicorn on settings.host:settings.port."""
    import uvicorn

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="warning",
        timeout_graceful_shutdown=5,
    )
