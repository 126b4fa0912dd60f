"""Generation: `/generate` (the original API), its SSE twin `/generate/stream`, `/inspect_gates`."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from gateway.backends import RPC_TIMEOUT, http_status
from gateway.deps import EVENT_STREAM, Gateway, GatewayDep, client_of, refusals
from gateway.openai import OpenAIError, render_chat
from gateway.schemas import FINISH, GenerateBody, InspectBody, gate_summary, sse, usage
from shiftable_lib.errors import Unavailable
from sma.v1 import inference_pb2

router = APIRouter()

TOO_LARGE = "a body over the gateway's limit (docs/api.md)"
UNKNOWN_EXPERT = "`routing` names an expert the model does not have"
NO_MODEL = "no model serves yet (the first start is training), or inference does not answer"
GENERATION_REFUSALS = refusals(
    {
        400: "a value the serving model cannot take (max_new_tokens at or over its context, a "
        "routing that leaves no expert), or a body that is not UTF-8",
        404: UNKNOWN_EXPERT,
        413: TOO_LARGE,
        429: "this client has SMA_MAX_STREAMS_PER_CLIENT generations running already",
        503: NO_MODEL,
    }
)


@router.post("/generate", responses=GENERATION_REFUSALS)
async def generate(gw: GatewayDep, body: GenerateBody, request: Request) -> dict:
    """The whole completion at once (the original API's shape, plus usage and gate weights)."""
    await gw.require_model()
    prompt = await _prompt(gw, body)
    parts: list[str] = []
    last = None
    async for message in stream_generation(gw, body.to_proto(prompt), client_of(request)):
        parts.append(message.text)
        last = message
    completion = "".join(parts)
    return {
        "prompt": prompt,
        "completion": completion,
        "full_text": prompt + completion,
        "specialists": list(gw.serving.version.specialists),  # no registry call per request
        **_final(last),
    }


async def _prompt(gw: Gateway, body: GenerateBody) -> str:
    """The body's prompt, or its messages as the serving model's chat template renders them."""
    if body.messages is None:
        return str(body.prompt)
    info = await gw.model_info()
    if info is None:
        raise Unavailable(NO_MODEL)
    try:
        return render_chat(info.chat_template, body.messages, info.eos_token)
    except OpenAIError as exc:
        raise ValueError(exc.message) from None


async def stream_generation(
    gw: Gateway, request: inference_pb2.GenerateRequest, client: str
) -> AsyncIterator[inference_pb2.GenerateResponse]:
    """Messages of one Generate call, in one of `client`'s slots (429 when it has none left);
    the call is cancelled if the consumer stops."""
    with gw.client_stream(client):
        call = gw.backends.inference.Generate(request)
        timer = gw.metrics.stream_timer(request)
        try:
            async for message in call:
                timer.tick(message)
                yield message
        finally:
            call.cancel()


@router.post(
    "/generate/stream",
    response_class=StreamingResponse,
    responses={200: EVENT_STREAM, **GENERATION_REFUSALS},
)
async def generate_stream(
    gw: GatewayDep, body: GenerateBody, request: Request
) -> StreamingResponse:
    """Server-Sent Events: `token` events with text deltas, then one `done` event with the
    finish reason, usage and gate weights. Errors before the first token are plain HTTP
    errors; a later one is an `error` event."""
    await gw.require_model()
    prompt = await _prompt(gw, body)
    messages = stream_generation(gw, body.to_proto(prompt), client_of(request))
    first = await anext(messages)  # bad parameters raise here, as a 4xx
    rendered = {"prompt": prompt} if body.messages is not None else {}

    async def events() -> AsyncIterator[str]:
        text = []
        message = first
        try:
            while True:
                text.append(message.text)
                yield sse("token", {"text": message.text, "token_ids": list(message.token_ids)})
                if message.finish_reason:
                    done = {"completion": "".join(text), **rendered, **_final(message)}
                    yield sse("done", done)
                    return
                message = await anext(messages)
        except StopAsyncIteration:
            yield sse("error", {"status": 502, "detail": "the stream ended early"})
        except grpc.aio.AioRpcError as exc:
            yield sse("error", {"status": http_status(exc.code()), "detail": exc.details()})
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


@router.post(
    "/inspect_gates",
    responses=refusals(
        {
            400: "a routing that leaves no expert, or a body that is not UTF-8",
            404: UNKNOWN_EXPERT,
            413: TOO_LARGE,
            503: NO_MODEL,
        }
    ),
)
async def inspect_gates(gw: GatewayDep, body: InspectBody) -> dict:
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
