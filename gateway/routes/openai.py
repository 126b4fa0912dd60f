"""The OpenAI-compatible API: `/v1/models`, `/v1/completions`, `/v1/chat/completions`, and the
tokenizer as vLLM serves it (`/tokenize`, `/detokenize`, `/tokenizer_info`), so that clients,
evaluation harnesses and tools written for those servers work unchanged (docs/openai.md).

Each choice is one `Generate` stream; a request's choices (its prompts times `n`) run at once,
each in one of the client's generation slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.backends import RPC_TIMEOUT, http_status
from gateway.deps import EVENT_STREAM, Gateway, GatewayDep, client_of
from gateway.openai import (
    FINISH,
    MODEL,
    ChatBody,
    CompletionBody,
    DetokenizeBody,
    OpenAIError,
    TextOffsets,
    TokenizeBody,
    chat_logprobs,
    completion_logprobs,
    error_body,
    gate_weights,
    new_id,
    now,
    render_chat,
    usage_of,
)
from gateway.routes.generate import stream_generation
from sma.v1 import inference_pb2

router = APIRouter(tags=["OpenAI-compatible"])
DISCONNECT_POLL_S = 0.5  # how often a whole (not streamed) reply checks the client is there

# the paths whose refusals take OpenAI's error shape (app.py's handlers ask)
PATHS = frozenset(
    {
        "/v1/models",
        "/v1/completions",
        "/v1/chat/completions",
        "/tokenize",
        "/detokenize",
        "/tokenizer_info",
    }
)
ERRORS = {
    code: {"description": text}
    for code, text in {
        400: "a value the model cannot take, or one this server does not support",
        404: "`model` names no served model",
        429: "this client has SMA_MAX_STREAMS_PER_CLIENT generations running already",
        503: "no model serves yet, or inference does not answer",
    }.items()
}


@router.get("/v1/models")
async def list_models(gw: GatewayDep) -> dict:
    """The model and one model per specialist (forcing it), with the serving version."""
    version = gw.serving.version
    info = await gw.model_info()
    created = version.created_at.seconds or now()
    common = {
        "object": "model",
        "created": created,
        "owned_by": "shiftable",
        "version": version.id or None,
        "max_model_len": info.context if info is not None and info.version_id else None,
    }
    data = [{"id": MODEL, "root": MODEL, "parent": None, **common}] if version.id else []
    data += [
        {"id": f"{MODEL}:{name}", "root": MODEL, "parent": MODEL, "specialist": name, **common}
        for name in version.specialists
    ]
    return {"object": "list", "data": data}


# ---- one choice ----------------------------------------------------------------------------------


@dataclass
class Choice:
    """One choice's stream, read as it comes."""

    index: int
    prompt: str | list[int]
    request: inference_pb2.GenerateRequest
    messages: AsyncIterator[inference_pb2.GenerateResponse]
    first: inference_pb2.GenerateResponse | None = None
    last: inference_pb2.GenerateResponse | None = None
    text: list[str] = field(default_factory=list)
    entries: list[inference_pb2.TokenLogprob] = field(default_factory=list)
    prompt_entries: list[inference_pb2.TokenLogprob] = field(default_factory=list)
    completion_tokens: int = 0

    def take(self, message: inference_pb2.GenerateResponse) -> None:
        self.text.append(message.text)
        self.entries.extend(message.logprobs)
        self.prompt_entries.extend(message.prompt_logprobs)
        self.completion_tokens += len(message.token_ids)
        if message.finish_reason:
            self.last = message

    @property
    def finish_reason(self) -> str | None:
        return FINISH.get(self.last.finish_reason) if self.last else None

    @property
    def prompt_tokens(self) -> int:
        return self.last.usage.prompt_tokens if self.last else 0


async def _start(gw: Gateway, choices: list[Choice]) -> None:
    """Every choice's first message (bad parameters fail here, before any reply is sent);
    all the streams close if one fails."""
    firsts = await asyncio.gather(*(anext(c.messages) for c in choices), return_exceptions=True)
    failed = [f for f in firsts if isinstance(f, BaseException)]
    if failed:
        await _close(choices)
        raise failed[0]
    for c, first in zip(choices, firsts, strict=True):
        assert isinstance(first, inference_pb2.GenerateResponse)
        c.first = first


async def _close(choices: list[Choice]) -> None:
    for c in choices:
        with contextlib.suppress(Exception):
            await c.messages.aclose()  # type: ignore[attr-defined]


async def _drain(choice: Choice) -> None:
    assert choice.first is not None
    choice.take(choice.first)
    async for message in choice.messages:
        choice.take(message)


async def _drain_all(choices: list[Choice], request: Request) -> None:
    """Read every choice to its end; the first failure cancels the others, and so does the
    client going away (their decode slots free at once, not when they would have ended)."""
    tasks = [asyncio.create_task(_drain(c)) for c in choices]
    try:
        pending: set[asyncio.Task] = set(tasks)
        while pending:
            done, pending = await asyncio.wait(
                pending, timeout=DISCONNECT_POLL_S, return_when=asyncio.FIRST_EXCEPTION
            )
            for task in done:
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            if pending and await request.is_disconnected():
                raise OpenAIError(499, "the client closed the request")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await _close(choices)
    for c in choices:
        if c.last is None:
            raise OpenAIError(502, "a generation stream ended before its last message")


async def _prompt_text(gw: Gateway, prompt: str | list[int]) -> str:
    if isinstance(prompt, str):
        return prompt
    reply = await gw.backends.inference.Detokenize(
        inference_pb2.DetokenizeRequest(token_ids=prompt), timeout=RPC_TIMEOUT
    )
    return reply.text


def _choices(
    gw: Gateway, request: Request, prompts: list[str | list[int]], n: int, make: Callable
) -> list[Choice]:
    client = client_of(request)
    out = []
    for p, prompt in enumerate(prompts):
        for i in range(n):
            generate = make(prompt, i)
            out.append(Choice(p * n + i, prompt, generate, stream_generation(gw, generate, client)))
    return out


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _merged(choices: list[Choice]) -> AsyncIterator[tuple[Choice, object]]:
    """Every choice's messages as they arrive, the first ones first; a failure ends them all."""
    # bounded: a slow reader holds the streams back (the inference server then merges their
    # deltas) instead of the gateway buffering them
    queue: asyncio.Queue[tuple[Choice, object]] = asyncio.Queue(maxsize=4 * len(choices))
    done = object()

    async def pump(choice: Choice) -> None:
        try:
            assert choice.first is not None
            await queue.put((choice, choice.first))
            async for message in choice.messages:
                await queue.put((choice, message))
            await queue.put((choice, done))
        except Exception as exc:
            await queue.put((choice, exc))

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        running = len(choices)
        while running:
            choice, item = await queue.get()
            if item is done:
                running -= 1
                continue
            if isinstance(item, Exception):
                raise item
            yield choice, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await _close(choices)


def _stream_error(exc: Exception) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return _sse(error_body(http_status(exc.code()), exc.details() or "generation failed"))
    if isinstance(exc, OpenAIError):
        return _sse(error_body(exc.status, exc.message, exc.param, exc.code))
    return _sse(error_body(500, str(exc) or "generation failed"))


class _Streamed(StreamingResponse):
    """An SSE reply that closes its choices' streams however it ends: also when the client
    goes before the first chunk, and the body was never read."""

    def __init__(self, events: AsyncIterator[str], choices: list[Choice]) -> None:
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.events, self.choices = events, choices

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with contextlib.suppress(Exception):
                await self.events.aclose()  # type: ignore[attr-defined]
            await _close(self.choices)


# ---- completions ---------------------------------------------------------------------------------


@router.post("/v1/completions", responses={200: EVENT_STREAM, **ERRORS}, response_model=None)
async def completions(
    gw: GatewayDep, body: CompletionBody, request: Request
) -> dict | StreamingResponse:
    """Text completion, OpenAI's legacy API; `echo` with `logprobs` (and `max_tokens` 0)
    scores a text, as vLLM does."""
    body.check_supported()
    await gw.require_generation()
    specialists = list(gw.serving.version.specialists)
    echo = bool(body.echo)

    def make(prompt: str | list[int], i: int) -> inference_pb2.GenerateRequest:
        return body.request(prompt, body.limit(), specialists, body.logprobs, echo, i)

    choices = _choices(gw, request, body.prompts(), body.n or 1, make)
    await _start(gw, choices)
    rid, created = new_id("cmpl"), now()
    head = {"id": rid, "object": "text_completion", "created": created, "model": body.model}
    if body.stream:
        return _Streamed(_completion_events(gw, body, choices, head), choices)
    await _drain_all(choices, request)
    out = []
    for c in choices:
        prompt = await _prompt_text(gw, c.prompt) if echo else ""
        entry: dict = {
            "index": c.index,
            "text": prompt + "".join(c.text),
            "logprobs": None,
            "finish_reason": c.finish_reason,
            "gate_weights": gate_weights(c.last),
        }
        if body.logprobs is not None:
            scored = (c.prompt_entries if echo else []) + c.entries
            entry["logprobs"] = completion_logprobs(scored, TextOffsets())
        out.append(entry)
    return {
        **head,
        "system_fingerprint": _fingerprint(choices),
        "choices": out,
        "usage": _usage(choices, body.n or 1),
    }


def _completion_events(
    gw: Gateway, body: CompletionBody, choices: list[Choice], head: dict
) -> AsyncIterator[str]:
    offsets = {c.index: TextOffsets() for c in choices}

    async def entry(choice: Choice, message: inference_pb2.GenerateResponse, first: bool) -> dict:
        text, scored = message.text, list(message.logprobs)
        if first and body.echo:
            text = await _prompt_text(gw, choice.prompt) + text
            scored = list(message.prompt_logprobs) + scored
        logprobs = None
        if body.logprobs is not None:
            logprobs = completion_logprobs(scored, offsets[choice.index])
        return {"text": text, "logprobs": logprobs}

    return _events(body, choices, head, entry)


async def _events(
    body: ChatBody | CompletionBody,
    choices: list[Choice],
    head: dict,
    entry: Callable[[Choice, inference_pb2.GenerateResponse, bool], Awaitable[dict]],
) -> AsyncIterator[str]:
    """The SSE chunks of a streamed reply: one per message of any choice (`entry` says what
    it adds: text or delta, and log-probabilities), the last of each with its finish reason
    and gate weights; then the usage, if asked for, and `[DONE]`."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    extra = {"usage": None} if include_usage else {}
    started: set[int] = set()
    try:
        async with contextlib.aclosing(_merged(choices)) as merged:
            async for choice, message in merged:
                assert isinstance(message, inference_pb2.GenerateResponse)
                choice.take(message)
                first = choice.index not in started
                started.add(choice.index)
                added = await entry(choice, message, first)
                finish = FINISH.get(message.finish_reason) if message.finish_reason else None
                part = {"index": choice.index, **added, "finish_reason": finish}
                if finish:
                    part["gate_weights"] = gate_weights(message)
                chunk = {**head, "system_fingerprint": message.version_id, "choices": [part]}
                yield _sse({**chunk, **extra})
        if any(c.last is None for c in choices):
            raise OpenAIError(502, "a generation stream ended before its last message")
        if include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(choices, body.n or 1)})
    except Exception as exc:
        yield _stream_error(exc)
    yield _sse("[DONE]")


def _usage(choices: list[Choice], n: int) -> dict:
    """Prompt tokens once per prompt (its `n` choices read the same), completion tokens of all."""
    prompt = sum(c.prompt_tokens for c in choices if c.index % n == 0)
    return usage_of(prompt, sum(c.completion_tokens for c in choices))


def _fingerprint(choices: list[Choice]) -> str | None:
    """The model version that served (the `system_fingerprint` OpenAI gives its backend)."""
    return next((c.last.version_id for c in choices if c.last is not None), None)


# ---- chat ----------------------------------------------------------------------------------------


@router.post("/v1/chat/completions", responses={200: EVENT_STREAM, **ERRORS}, response_model=None)
async def chat_completions(
    gw: GatewayDep, body: ChatBody, request: Request
) -> dict | StreamingResponse:
    """Chat: the messages become a prompt by the serving version's chat template (docs)."""
    body.check_supported()
    info = await gw.require_generation()
    specialists = list(gw.serving.version.specialists)
    prompt = render_chat(info.chat_template, body.messages, info.eos_token)
    tokens = await gw.backends.inference.Tokenize(
        inference_pb2.TokenizeRequest(text=prompt), timeout=RPC_TIMEOUT
    )
    ids, context = list(tokens.token_ids), tokens.context
    limit = body.limit()
    if limit is None:  # the rest of the context, as vLLM gives a chat that names no limit
        limit = context - max(len(ids), 1)  # an empty prompt is one token (end of text)
        if limit < 1:
            raise OpenAIError(
                400,
                f"the messages are {len(ids)} tokens, the model's whole context of {context}",
                "messages",
                "context_length_exceeded",
            )
    logprobs = body.token_logprobs()

    def make(p: str | list[int], i: int) -> inference_pb2.GenerateRequest:
        return body.request(p, limit, specialists, logprobs, False, i)

    choices = _choices(gw, request, [ids], body.n or 1, make)
    await _start(gw, choices)
    rid, created = new_id("chatcmpl"), now()
    head = {"id": rid, "object": "chat.completion", "created": created, "model": body.model}
    if body.stream:
        head["object"] = "chat.completion.chunk"
        return _Streamed(_chat_events(body, choices, head), choices)
    await _drain_all(choices, request)
    out = [
        {
            "index": c.index,
            "message": {"role": "assistant", "content": "".join(c.text), "refusal": None},
            "logprobs": {"content": chat_logprobs(c.entries), "refusal": None}
            if logprobs is not None
            else None,
            "finish_reason": c.finish_reason,
            "gate_weights": gate_weights(c.last),
        }
        for c in choices
    ]
    return {
        **head,
        "system_fingerprint": _fingerprint(choices),
        "choices": out,
        "usage": _usage(choices, body.n or 1),
    }


def _chat_events(body: ChatBody, choices: list[Choice], head: dict) -> AsyncIterator[str]:
    async def entry(choice: Choice, message: inference_pb2.GenerateResponse, first: bool) -> dict:
        delta = (
            {"role": "assistant", "content": message.text} if first else {"content": message.text}
        )
        logprobs = None
        if body.logprobs:
            logprobs = {"content": chat_logprobs(list(message.logprobs))}
        return {"delta": delta, "logprobs": logprobs}

    return _events(body, choices, head, entry)


# ---- the tokenizer -------------------------------------------------------------------------------


@router.post("/tokenize", responses=ERRORS)
async def tokenize(gw: GatewayDep, body: TokenizeBody) -> dict:
    """A prompt (or chat messages, as the chat template renders them) as token ids."""
    info = await gw.require_generation()
    if (body.prompt is None) == (body.messages is None):
        raise OpenAIError(400, "give `prompt` or `messages`", "prompt")
    text = body.prompt
    if body.messages is not None:
        text = render_chat(
            info.chat_template, body.messages, info.eos_token, body.add_generation_prompt
        )
    reply = await gw.backends.inference.Tokenize(
        inference_pb2.TokenizeRequest(text=text or ""), timeout=RPC_TIMEOUT
    )
    out: dict = {
        "count": len(reply.token_ids),
        "max_model_len": reply.context,
        "tokens": list(reply.token_ids),
    }
    if body.return_token_strs:
        out["token_strs"] = list(reply.tokens)
    return out


@router.post("/detokenize", responses=ERRORS)
async def detokenize(gw: GatewayDep, body: DetokenizeBody) -> dict:
    await gw.require_generation()
    reply = await gw.backends.inference.Detokenize(
        inference_pb2.DetokenizeRequest(token_ids=body.tokens), timeout=RPC_TIMEOUT
    )
    return {"prompt": reply.text}


@router.get("/tokenizer_info", responses=ERRORS)
async def tokenizer_info(gw: GatewayDep) -> dict:
    """The tokenizer's configuration, as vLLM reports it (what evaluation harnesses read to
    use the server's tokenizer without one of their own)."""
    info = await gw.require_generation()
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": info.eos_token,
        "bos_token": None,
        "pad_token": None,
        "unk_token": None,
        "model_max_length": info.context,
        "vocab_size": info.vocab_size,
        "chat_template": info.chat_template,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
    }
