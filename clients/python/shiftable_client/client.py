"""`Client` (blocking) and `AsyncClient` (asyncio) over the `sma.v1` stubs.

Both build the same requests and read the same replies (`_Requests`, `_read_*`); only the
channel and how calls are awaited differ. Errors are `grpc.RpcError`s with the services' status
codes (INVALID_ARGUMENT for a bad value, NOT_FOUND, UNAVAILABLE before a model serves, ...).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import grpc

from sma.v1 import (
    inference_pb2,
    inference_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)

_MODES = {
    "soft": inference_pb2.ROUTING_MODE_SOFT,
    "top1": inference_pb2.ROUTING_MODE_TOP1,
    "topk": inference_pb2.ROUTING_MODE_TOPK,
}
_FINISH = {
    inference_pb2.FINISH_REASON_LENGTH: "length",
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_EOS: "eos",
    inference_pb2.FINISH_REASON_CANCELLED: "cancelled",
}
_ENDED = {"succeeded", "failed", "cancelled"}


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float | None  # None for a prompt's first token
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Delta:
    """One message of a generation stream: text it adds (maybe empty while a character is
    incomplete) and its tokens; the last one has `finish_reason`, `usage` and `gate_means`."""

    text: str
    token_ids: tuple[int, ...]
    version: str
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    gate_means: dict[str, float] | None = None  # mean gate weight per expert over the output
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class GateReport:
    version: str
    experts: tuple[str, ...]
    tokens: tuple[str, ...]
    means: list[dict[str, float]]  # per layer: expert -> mean weight over the prompt


@dataclass(frozen=True)
class Specialist:
    name: str
    state: str  # training, ready, failed, deleting
    error: str = ""


@dataclass(frozen=True)
class OperationUpdate:
    """An operation as the registry records it, at one moment."""

    id: str
    kind: str  # initialize, add_specialist, delete_specialist
    target: str
    state: str  # pending, running, succeeded, failed, cancelled
    phase: str
    fraction: float  # of the whole operation, in [0, 1]
    eta_s: float
    message: str
    error: str
    version: str
    raw: registry_pb2.Operation = field(repr=False, compare=False)

    @property
    def done(self) -> bool:
        return self.state in _ENDED


class _Requests:
    """The requests both clients send."""

    @staticmethod
    def generate(
        prompt: str | Sequence[int],
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int = 0,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        mode: str = "soft",
        force: Sequence[str] = (),
        exclude: Sequence[str] = (),
        logprobs: int | None = None,
        score_prompt: bool = False,
    ) -> inference_pb2.GenerateRequest:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {sorted(_MODES)}")
        request = inference_pb2.GenerateRequest(
            top_k=top_k,
            stop=list(stop),
            routing=inference_pb2.Routing(
                mode=_MODES[mode], force=list(force), exclude=list(exclude)
            ),
            prompt_logprobs=score_prompt,
        )
        if isinstance(prompt, str):
            request.prompt = prompt
        else:
            request.prompt_token_ids.extend(prompt)
        for name, value in (
            ("max_new_tokens", max_new_tokens),
            ("temperature", temperature),
            ("top_p", top_p),
            ("seed", seed),
            ("logprobs", logprobs),
        ):
            if value is not None:
                setattr(request, name, value)
        return request


def _read_logprob(entry: inference_pb2.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(
        entry.token_id,
        entry.token,
        entry.logprob if entry.HasField("logprob") else None,
        tuple((t.token, t.logprob) for t in entry.top),
    )


def _read_delta(m: inference_pb2.GenerateResponse) -> Delta:
    last = bool(m.finish_reason)
    return Delta(
        text=m.text,
        token_ids=tuple(m.token_ids),
        version=m.version_id,
        finish_reason=_FINISH.get(m.finish_reason) if last else None,
        usage={
            "prompt_tokens": m.usage.prompt_tokens,
            "completion_tokens": m.usage.completion_tokens,
            "truncated_prompt_tokens": m.usage.truncated_prompt_tokens,
        }
        if m.HasField("usage")
        else None,
        gate_means={w.expert: w.weight for w in m.gate_means} if last else None,
        logprobs=tuple(_read_logprob(e) for e in m.logprobs),
        prompt_logprobs=tuple(_read_logprob(e) for e in m.prompt_logprobs),
    )


def _read_gates(reply: inference_pb2.InspectGatesResponse) -> GateReport:
    experts = tuple(reply.experts)
    return GateReport(
        version=reply.version_id,
        experts=experts,
        tokens=tuple(reply.tokens),
        means=[dict(zip(experts, layer.mean, strict=True)) for layer in reply.layers],
    )


def _enum(value: int, enum, prefix: str) -> str:
    return enum.Name(value).removeprefix(prefix).lower()


def _read_specialists(reply: registry_pb2.ListSpecialistsResponse) -> list[Specialist]:
    return [
        Specialist(
            s.name,
            _enum(s.state, registry_pb2.SpecialistState, "SPECIALIST_STATE_"),
            s.error,
        )
        for s in reply.specialists
    ]


def _read_operation(op: registry_pb2.Operation) -> OperationUpdate:
    return OperationUpdate(
        id=op.id,
        kind=_enum(op.kind, registry_pb2.OperationKind, "OPERATION_KIND_"),
        target=op.target,
        state=_enum(op.state, registry_pb2.OperationState, "OPERATION_STATE_"),
        phase=op.progress.phase,
        fraction=op.progress.fraction,
        eta_s=op.progress.eta_s,
        message=op.message,
        error=op.error,
        version=op.version_id,
        raw=op,
    )


def _metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


class Client:
    """Blocking client. `inference` and `registry` are gRPC targets (`host:port`); `api_key`
    is sent as `authorization: Bearer ...` when the services require one; `credentials` (from
    `grpc.ssl_channel_credentials`) makes the channels TLS."""

    def __init__(
        self,
        inference: str = "127.0.0.1:50053",
        registry: str = "127.0.0.1:50051",
        api_key: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = 30.0,
    ) -> None:
        def channel(target: str) -> grpc.Channel:
            if credentials is None:
                return grpc.insecure_channel(target)
            return grpc.secure_channel(target, credentials)

        self._channels = [channel(inference), channel(registry)]
        self.inference = inference_pb2_grpc.InferenceStub(self._channels[0])
        self.registry = registry_pb2_grpc.RegistryStub(self._channels[1])
        self.metadata = _metadata(api_key)
        self.timeout = timeout  # for unary calls; streams run as long as they need

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        for c in self._channels:
            c.close()

    def generate(self, prompt: str | Sequence[int], **params) -> Iterator[Delta]:
        """Stream a completion (see `_Requests.generate` for the parameters); leaving the loop
        early cancels the generation."""
        call = self.inference.Generate(_Requests.generate(prompt, **params), metadata=self.metadata)
        try:
            for message in call:
                yield _read_delta(message)
        finally:
            call.cancel()

    def complete(self, prompt: str | Sequence[int], **params) -> Delta:
        """The whole completion as one `Delta` (its text and tokens, the last one's summary)."""
        return _joined(list(self.generate(prompt, **params)))

    def inspect_gates(self, prompt: str, mode: str = "soft") -> GateReport:
        request = inference_pb2.InspectGatesRequest(
            prompt=prompt, routing=inference_pb2.Routing(mode=_MODES[mode])
        )
        reply = self.inference.InspectGates(request, timeout=self.timeout, metadata=self.metadata)
        return _read_gates(reply)

    def model_info(self) -> inference_pb2.GetModelInfoResponse:
        return self.inference.GetModelInfo(
            inference_pb2.GetModelInfoRequest(), timeout=self.timeout, metadata=self.metadata
        )

    def tokenize(self, text: str) -> list[int]:
        reply = self.inference.Tokenize(
            inference_pb2.TokenizeRequest(text=text), timeout=self.timeout, metadata=self.metadata
        )
        return list(reply.token_ids)

    def specialists(self) -> list[Specialist]:
        reply = self.registry.ListSpecialists(
            registry_pb2.ListSpecialistsRequest(), timeout=self.timeout, metadata=self.metadata
        )
        return _read_specialists(reply)

    def watch_operation(self, operation_id: str) -> Iterator[OperationUpdate]:
        """Each change of an operation (an add, a delete, a first start) until it ends."""
        call = self.registry.WatchOperation(
            registry_pb2.WatchOperationRequest(id=operation_id), metadata=self.metadata
        )
        try:
            for reply in call:
                update = _read_operation(reply.operation)
                yield update
                if update.done:
                    return
        finally:
            call.cancel()


class AsyncClient:
    """`Client` for asyncio: the same methods, awaited (streams are async iterators)."""

    def __init__(
        self,
        inference: str = "127.0.0.1:50053",
        registry: str = "127.0.0.1:50051",
        api_key: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = 30.0,
    ) -> None:
        def channel(target: str) -> grpc.aio.Channel:
            if credentials is None:
                return grpc.aio.insecure_channel(target)
            return grpc.aio.secure_channel(target, credentials)

        self._channels = [channel(inference), channel(registry)]
        self.inference = inference_pb2_grpc.InferenceStub(self._channels[0])
        self.registry = registry_pb2_grpc.RegistryStub(self._channels[1])
        self.metadata = _metadata(api_key)
        self.timeout = timeout

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        for c in self._channels:
            await c.close()

    async def generate(self, prompt: str | Sequence[int], **params) -> AsyncIterator[Delta]:
        call = self.inference.Generate(_Requests.generate(prompt, **params), metadata=self.metadata)
        try:
            async for message in call:
                yield _read_delta(message)
        finally:
            call.cancel()

    async def complete(self, prompt: str | Sequence[int], **params) -> Delta:
        return _joined([d async for d in self.generate(prompt, **params)])

    async def inspect_gates(self, prompt: str, mode: str = "soft") -> GateReport:
        request = inference_pb2.InspectGatesRequest(
            prompt=prompt, routing=inference_pb2.Routing(mode=_MODES[mode])
        )
        reply = await self.inference.InspectGates(
            request, timeout=self.timeout, metadata=self.metadata
        )
        return _read_gates(reply)

    async def model_info(self) -> inference_pb2.GetModelInfoResponse:
        return await self.inference.GetModelInfo(
            inference_pb2.GetModelInfoRequest(), timeout=self.timeout, metadata=self.metadata
        )

    async def tokenize(self, text: str) -> list[int]:
        reply = await self.inference.Tokenize(
            inference_pb2.TokenizeRequest(text=text), timeout=self.timeout, metadata=self.metadata
        )
        return list(reply.token_ids)

    async def specialists(self) -> list[Specialist]:
        reply = await self.registry.ListSpecialists(
            registry_pb2.ListSpecialistsRequest(), timeout=self.timeout, metadata=self.metadata
        )
        return _read_specialists(reply)

    async def watch_operation(self, operation_id: str) -> AsyncIterator[OperationUpdate]:
        call = self.registry.WatchOperation(
            registry_pb2.WatchOperationRequest(id=operation_id), metadata=self.metadata
        )
        try:
            async for reply in call:
                update = _read_operation(reply.operation)
                yield update
                if update.done:
                    return
        finally:
            call.cancel()


def _joined(deltas: list[Delta]) -> Delta:
    if not deltas:
        raise RuntimeError("the stream ended without a message")
    last = deltas[-1]
    return Delta(
        text="".join(d.text for d in deltas),
        token_ids=tuple(t for d in deltas for t in d.token_ids),
        version=last.version,
        finish_reason=last.finish_reason,
        usage=last.usage,
        gate_means=last.gate_means,
        logprobs=tuple(e for d in deltas for e in d.logprobs),
        prompt_logprobs=deltas[0].prompt_logprobs,
    )
