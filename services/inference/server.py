"""`sma.v1.Inference`: a thin gRPC face over `InferenceCore`, and `main`, which serves it and
follows the registry's serving pointer (`services.inference.follower`).

The servicer only translates messages; the core does the work. Client cancellation and expired
deadlines both cancel the handler task, which closes the core's stream and so cancels the
sequence in the engine at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from services.common import Server, Service, rpc, run, serve
from services.inference.core import InferenceCore
from services.inference.follower import follow_registry
from services.inference.messages import Chunk
from services.metrics import ServerMetrics, expose
from shiftable_lib import jobs
from shiftable_lib.config import Settings
from shiftable_lib.generate import Logprob
from shiftable_lib.sampling import (
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K_EXPERTS,
    DEFAULT_TOP_P,
    Routing,
    SamplingParams,
    default_max_new_tokens,
)
from shiftable_lib.tokenizer import Vocabulary
from sma.v1 import inference_pb2, inference_pb2_grpc

log = logging.getLogger("sma.inference")
SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
# Clients keep one connection per replica for as long as it lives, so a replica added later
# would get no calls until something reconnects. Ending each connection after a minute (new
# calls move to a new one, calls in flight get ten minutes to finish) makes clients resolve the
# replicas' name again and pick the newcomers up.
CONNECTION_AGE = (
    ("grpc.max_connection_age_ms", 60_000),
    ("grpc.max_connection_age_grace_ms", 600_000),
)

_MODES = {
    inference_pb2.ROUTING_MODE_UNSPECIFIED: "soft",
    inference_pb2.ROUTING_MODE_SOFT: "soft",
    inference_pb2.ROUTING_MODE_TOP1: "top1",
    inference_pb2.ROUTING_MODE_TOPK: "topk",
}
_FINISH = {
    "length": inference_pb2.FINISH_REASON_LENGTH,
    "stop": inference_pb2.FINISH_REASON_STOP,
    "eos": inference_pb2.FINISH_REASON_EOS,
    "cancelled": inference_pb2.FINISH_REASON_CANCELLED,
}


def routing_from_proto(message: inference_pb2.Routing) -> Routing:
    mode = _MODES.get(message.mode)
    if mode is None:
        raise ValueError(f"unknown routing mode {message.mode}")
    return Routing(
        mode=mode,
        k=message.top_k_experts or DEFAULT_TOP_K_EXPERTS,
        force=tuple(message.force),
        exclude=tuple(message.exclude),
    )


def sampling_params(request: inference_pb2.GenerateRequest, context: int) -> SamplingParams:
    """The request's parameters, with the documented defaults for fields left unset."""
    return SamplingParams(
        max_new_tokens=request.max_new_tokens
        if request.HasField("max_new_tokens")
        else default_max_new_tokens(context),
        temperature=request.temperature if request.HasField("temperature") else DEFAULT_TEMPERATURE,
        top_k=request.top_k,
        top_p=request.top_p if request.HasField("top_p") else DEFAULT_TOP_P,
        seed=request.seed if request.HasField("seed") else None,
        stop=tuple(request.stop),
        routing=routing_from_proto(request.routing),
        ignore_eos=request.ignore_eos,
        logprobs=request.logprobs if request.HasField("logprobs") else None,
        prompt_logprobs=request.prompt_logprobs,
        truncate=not request.no_truncation,
    )


def prompt_of(request: inference_pb2.GenerateRequest) -> str | list[int]:
    if request.prompt and request.prompt_token_ids:
        raise ValueError("give the prompt as text or as token ids, not both")
    return list(request.prompt_token_ids) or request.prompt


def token_logprob(
    vocabulary: Vocabulary, token_id: int, score: Logprob | None
) -> inference_pb2.TokenLogprob:
    """A token with its text and bytes, and its log-probability and the alternatives there
    when it was scored (each alternative an entry of its own, with no alternatives)."""
    entry = inference_pb2.TokenLogprob(
        token_id=token_id,
        token=vocabulary.texts[token_id],
        token_bytes=vocabulary.bytes[token_id],
    )
    if score is not None:
        entry.logprob = score.logprob
        entry.top.extend(token_logprob(vocabulary, t, Logprob(t, v)) for t, v in score.top)
    return entry


def generate_response(chunk: Chunk, vocabulary: Vocabulary) -> inference_pb2.GenerateResponse:
    response = inference_pb2.GenerateResponse(
        text=chunk.text, token_ids=chunk.token_ids, version_id=chunk.version_id
    )
    response.logprobs.extend(token_logprob(vocabulary, s.token_id, s) for s in chunk.logprobs)
    response.prompt_logprobs.extend(
        token_logprob(vocabulary, t, s)
        for t, s in zip(chunk.prompt, chunk.prompt_logprobs, strict=True)
    )
    if chunk.finish_reason is not None:
        response.finish_reason = _FINISH[chunk.finish_reason]
    if chunk.usage is not None:
        response.usage.CopyFrom(
            inference_pb2.Usage(
                prompt_tokens=chunk.usage.prompt_tokens,
                completion_tokens=chunk.usage.completion_tokens,
                truncated_prompt_tokens=chunk.usage.truncated_prompt_tokens,
            )
        )
    if chunk.gate_means is not None:
        response.gate_means.extend(
            inference_pb2.ExpertWeight(expert=e, weight=w) for e, w in chunk.gate_means.items()
        )
    return response


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, core: InferenceCore) -> None:
        self.core = core

    @rpc
    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        params = sampling_params(request, self.core.info().context)
        # aclosing: however the handler ends (cancelled, deadline, write failed), the core's
        # stream is closed now, not at garbage collection, so the slot frees at once
        async with contextlib.aclosing(self.core.generate(prompt_of(request), params)) as chunks:
            async for chunk in chunks:
                if chunk.usage is not None:  # the last: one line a generation
                    log.info(
                        "generated %d tokens after %d prompt tokens (%s) with %s",
                        chunk.usage.completion_tokens,
                        chunk.usage.prompt_tokens,
                        chunk.finish_reason,
                        chunk.version_id,
                    )
                yield generate_response(chunk, self.core.vocabulary(chunk.version_id))

    @rpc
    async def InspectGates(
        self, request: inference_pb2.InspectGatesRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.InspectGatesResponse:
        report = await self.core.inspect_gates(request.prompt, routing_from_proto(request.routing))
        return inference_pb2.InspectGatesResponse(
            experts=report.experts,
            tokens=report.tokens,
            layers=[
                inference_pb2.LayerGates(
                    mean=mean, per_position=[w for position in positions for w in position]
                )
                for mean, positions in zip(report.means, report.per_position, strict=True)
            ],
            version_id=report.version_id,
            truncated_prompt_tokens=report.truncated_prompt_tokens,
        )

    @rpc
    async def GetModelInfo(
        self, request: inference_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.GetModelInfoResponse:
        info = self.core.info()
        return inference_pb2.GetModelInfoResponse(
            version_id=info.version_id,
            specialists=info.specialists,
            device=info.device,
            profile=info.profile,
            context=info.context,
            n_layer=info.n_layer,
            d_model=info.d_model,
            vocab_size=info.vocab_size,
            max_batch=info.max_batch,
            max_queue=info.max_queue,
            active_streams=info.active_streams,
            queued=info.queued,
            tokens_generated=info.tokens_generated,
            requests_total=info.requests_total,
            swapping=info.swapping,
            load_error=info.load_error,
            decode_steps=info.steps,
            decode_seconds=info.decode_seconds,
            eos_token=info.eos_token,
            chat_template=info.chat_template,
            dtype=info.dtype,
            threads=info.threads,
        )

    @rpc
    async def Tokenize(
        self, request: inference_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.TokenizeResponse:
        ids, vocabulary = self.core.tokenize(request.text)
        info = self.core.info()
        return inference_pb2.TokenizeResponse(
            token_ids=ids,
            tokens=[vocabulary.texts[i] for i in ids],
            version_id=info.version_id,
            context=info.context,
        )

    @rpc
    async def Detokenize(
        self, request: inference_pb2.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.DetokenizeResponse:
        text = self.core.vocabulary().decode(request.token_ids)
        return inference_pb2.DetokenizeResponse(text=text, version_id=self.core.info().version_id)


class InferenceCollector:
    """This replica's load and running totals, read from the core at scrape time."""

    def __init__(self, core: InferenceCore) -> None:
        self.core = core

    def collect(self) -> list[Metric]:
        info = self.core.info()
        counter, gauge = CounterMetricFamily, GaugeMetricFamily
        version = gauge(
            "sma_inference_loaded_version",
            "1 for the version this replica serves",
            labels=["version"],
        )
        if info.version_id:
            version.add_metric([info.version_id], 1)
        return [
            counter("sma_inference_requests", "generations accepted", value=info.requests_total),
            counter(
                "sma_inference_generated_tokens", "tokens generated", value=info.tokens_generated
            ),
            counter("sma_inference_decode_steps", "decode steps run", value=info.steps),
            counter(
                "sma_inference_decode_seconds", "time in decode steps", value=info.decode_seconds
            ),
            gauge("sma_inference_active_streams", "sequences decoding", value=info.active_streams),
            gauge(
                "sma_inference_queued_requests", "requests waiting for a slot", value=info.queued
            ),
            gauge("sma_inference_max_batch", "decode slots", value=info.max_batch),
            gauge("sma_inference_max_queue", "requests that may wait", value=info.max_queue),
            gauge("sma_inference_swapping", "1 while a version loads", value=int(info.swapping)),
            gauge(
                "sma_inference_model_loaded",
                "1 when a version serves",
                value=int(bool(version.samples)),
            ),
            version,
        ]


def main(settings: Settings) -> None:
    """`sma serve inference`: serve on the inference port, following the registry."""
    device = jobs.configure_torch(settings)
    core = InferenceCore(
        settings.models_dir,
        device,
        settings.max_batch,
        settings.max_queue,
        threads=settings.decode_threads(),
        cuda_graphs=settings.cuda_graphs,
        dtype=settings.serve_dtype,
        bf16_threads=settings.decode_threads(bandwidth_bound=True),
    )
    service = Service(
        SERVICE_NAME, inference_pb2_grpc.add_InferenceServicer_to_server, InferenceServicer(core)
    )

    tls, keys = settings.tls(), settings.keys()
    metrics = ServerMetrics()
    metrics.add(InferenceCollector(core))
    expose(metrics, settings, "inference")

    async def start(server: Server) -> None:
        await follow_registry(
            core, settings.grpc_target("registry"), server, settings.replica(), keys, tls
        )

    async def stop() -> None:
        await asyncio.to_thread(core.close)

    run(
        serve(
            settings.grpc_bind("inference"),
            [service],
            start=start,
            stop=stop,
            options=CONNECTION_AGE,
            keys=keys,
            tls=tls,
            metrics=metrics,
        )
    )
