"""The inference servicer over gRPC, driven by a real grpc.aio client, and the registry
follower."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import replace

import grpc
import pytest
import torch

from services.inference import follower
from shiftable_lib import checkpoint
from shiftable_lib.config import Settings
from shiftable_lib.tokenizer import encode
from sma.v1 import inference_pb2
from tests.services.inference.conftest import (
    EXPERTS,
    GREEDY,
    PROMPTS,
    SHIFTABLE,
    eventually,
    reference,
    running_core,
    serving,
)


def test_generate_streams_deltas_that_concatenate_to_the_completion(models):
    request = inference_pb2.GenerateRequest(
        prompt=PROMPTS[0], max_new_tokens=24, temperature=0, ignore_eos=True
    )

    async def scenario() -> tuple:
        async with running_core(models) as core, serving(core) as stub:
            messages = [m async for m in stub.Generate(request)]
            defaults = [
                m
                async for m in stub.Generate(
                    inference_pb2.GenerateRequest(prompt=PROMPTS[1], ignore_eos=True)
                )
            ]
            gates = await stub.InspectGates(inference_pb2.InspectGatesRequest(prompt=PROMPTS[1]))
            info = await stub.GetModelInfo(inference_pb2.GetModelInfoRequest())
            return messages, defaults, gates, info

    messages, defaults, gates, info = asyncio.run(scenario())
    ref = reference(models, SHIFTABLE, PROMPTS[0], GREEDY)
    assert "".join(m.text for m in messages) == ref.text
    assert [i for m in messages for i in m.token_ids] == ref.output_ids
    assert all(not m.HasField("usage") and not m.finish_reason for m in messages[:-1])
    last = messages[-1]
    assert last.finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(ref.prompt_ids), 24)
    assert [g.expert for g in last.gate_means] == list(EXPERTS)
    assert {m.version_id for m in messages} == {SHIFTABLE}
    # unset fields take the defaults: 64 new tokens, capped at half the context
    assert defaults[-1].usage.completion_tokens == 32

    assert list(gates.experts) == list(EXPERTS) and len(gates.layers) == 2
    assert all(len(layer.per_position) == len(gates.tokens) * 3 for layer in gates.layers)

    assert (info.version_id, list(info.specialists), info.context) == (SHIFTABLE, ["dl", "ds"], 64)
    assert (info.requests_total, info.tokens_generated, info.active_streams) == (2, 24 + 32, 0)
    # one step per token: the two calls ran one after the other
    assert info.decode_steps == 24 + 32 and info.decode_seconds > 0
    # a tiny model serves in float32, on the worker's threads (the tests' one)
    assert (info.dtype, info.threads) == ("float32", 1)


def test_errors_map_to_grpc_status_codes(models):
    def generate(**fields: object) -> inference_pb2.GenerateRequest:
        return inference_pb2.GenerateRequest(prompt="the", **fields)

    async def code(call: object) -> grpc.StatusCode:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            if isinstance(call, grpc.aio.UnaryStreamCall):
                async for _ in call:
                    pass
            else:
                await call
        return err.value.code()

    async def scenario() -> None:
        limits = {"max_batch": 1, "max_queue": 0}
        async with running_core(models, None, **limits) as core, serving(core) as stub:
            assert await code(stub.Generate(generate())) == grpc.StatusCode.UNAVAILABLE
            unloaded = await stub.GetModelInfo(inference_pb2.GetModelInfoRequest())
            assert unloaded.version_id == "" and unloaded.max_batch == 1
            await core.load(SHIFTABLE)
            for fields, expected in [
                ({"top_p": 2.0}, grpc.StatusCode.INVALID_ARGUMENT),
                ({"max_new_tokens": 500}, grpc.StatusCode.INVALID_ARGUMENT),
                ({"routing": {"mode": 9}}, grpc.StatusCode.INVALID_ARGUMENT),
                ({"routing": {"force": ["nope"]}}, grpc.StatusCode.NOT_FOUND),
                ({"logprobs": 21}, grpc.StatusCode.INVALID_ARGUMENT),
                ({"max_new_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT),
                ({"prompt_token_ids": [1]}, grpc.StatusCode.INVALID_ARGUMENT),  # and a text
            ]:
                assert await code(stub.Generate(generate(**fields))) == expected
            too_long = inference_pb2.GenerateRequest(prompt_token_ids=[1] * 60, max_new_tokens=8)
            too_long.no_truncation = True
            assert await code(stub.Generate(too_long)) == grpc.StatusCode.INVALID_ARGUMENT
            outside = inference_pb2.GenerateRequest(prompt_token_ids=[10**6])
            assert await code(stub.Generate(outside)) == grpc.StatusCode.INVALID_ARGUMENT
            bad_ids = inference_pb2.DetokenizeRequest(token_ids=[-1])
            assert await code(stub.Detokenize(bad_ids)) == grpc.StatusCode.INVALID_ARGUMENT
            busy = stub.Generate(generate(max_new_tokens=63, ignore_eos=True))
            await busy.read()
            assert await code(stub.Generate(generate())) == grpc.StatusCode.RESOURCE_EXHAUSTED
            busy.cancel()

    asyncio.run(scenario())


def test_client_cancellation_and_deadlines_stop_the_sequence(models):
    long = inference_pb2.GenerateRequest(
        prompt=PROMPTS[0], max_new_tokens=63, temperature=0, ignore_eos=True
    )

    async def scenario() -> None:
        async with running_core(models, max_batch=1, max_queue=1) as core, serving(core) as stub:

            async def info() -> inference_pb2.GetModelInfoResponse:
                return await stub.GetModelInfo(inference_pb2.GetModelInfoRequest())

            call = stub.Generate(long)
            await call.read()
            call.cancel()
            await eventually(lambda: core.info().active_streams == 0)
            cancelled = await info()
            assert cancelled.active_streams == 0 and cancelled.tokens_generated < 63

            blocker = stub.Generate(long)  # holds the only slot, so the next one waits
            await blocker.read()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Generate(long, timeout=0.01):
                    pass
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            while await blocker.read() != grpc.aio.EOF:
                pass
            await asyncio.sleep(0.2)  # time enough for an expired request that ran on to show
            after = await info()
            assert after.tokens_generated == cancelled.tokens_generated + 63
            assert after.active_streams == after.queued == 0

    asyncio.run(scenario())


def test_a_registry_not_up_yet_is_retried_quietly_until_start_up_takes_too_long(
    caplog, monkeypatch
):
    """The stack starts its servers together: a registry still coming up is no news."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once it is closed

    def retries() -> list[logging.LogRecord]:
        caplog.clear()
        with contextlib.suppress(TimeoutError):
            # no update ever arrives, so the core and server are never touched
            asyncio.run(asyncio.wait_for(follower.follow_registry(None, address, None, "r1"), 1.0))
        return [r for r in caplog.records if "not reached yet" in r.getMessage()]

    caplog.set_level(logging.DEBUG, logger="sma.inference")
    quiet = retries()
    assert len(quiet) >= 2 and {r.levelno for r in quiet} == {logging.DEBUG}
    assert "UNAVAILABLE" in quiet[0].getMessage()
    monkeypatch.setattr(follower, "STARTUP_GRACE_S", 0.0)
    assert {r.levelno for r in retries()} == {logging.WARNING}


def test_settings_switch_cuda_graphs_off_from_the_environment(monkeypatch):
    assert Settings().cuda_graphs is True
    monkeypatch.setenv("SMA_CUDA_GRAPHS", "false")
    assert Settings().cuda_graphs is False


def test_extreme_sampling_values_and_oversized_prompts_hurt_no_other_stream(models):
    """Eight concurrent streams, half of them asking for the most extreme values the API
    admits: all eight complete. What cannot be made safe is refused before it runs: an infinite
    temperature, a prompt over the length limit, a message over the size limit."""
    extreme = [
        {"temperature": 1e-40},
        {"temperature": 5e-324, "top_k": 3},
        {"temperature": 1e-30, "top_p": 1e-30},
        {"temperature": 100.0, "top_k": 1_000_000},
    ]

    async def stream(stub, **fields: object) -> tuple[int, int]:
        request = inference_pb2.GenerateRequest(
            prompt="the list", max_new_tokens=20, ignore_eos=True, **fields
        )
        tokens, reason = 0, 0
        async for reply in stub.Generate(request):
            tokens += len(reply.token_ids)
            reason = reply.finish_reason or reason
        return tokens, reason

    async def refused(stub, request: inference_pb2.GenerateRequest) -> grpc.StatusCode:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.Generate(request):
                pass
        return err.value.code()

    async def scenario() -> None:
        async with running_core(models, max_batch=8) as core, serving(core) as stub:
            normal = [{"temperature": 0.8, "seed": i} for i in range(4)]
            results = await asyncio.gather(*(stream(stub, **f) for f in extreme + normal))
            assert results == [(20, inference_pb2.FINISH_REASON_LENGTH)] * 8
            for request, code in [
                (inference_pb2.GenerateRequest(prompt="x", temperature=float("inf")), "INVALID"),
                (inference_pb2.GenerateRequest(prompt="x", temperature=float("nan")), "INVALID"),
                (inference_pb2.GenerateRequest(prompt="x" * 100_001), "INVALID"),
                (inference_pb2.GenerateRequest(prompt="x" * 2_000_000), "RESOURCE"),
            ]:
                assert (await refused(stub, request)).name.startswith(code), request.temperature
            assert await stream(stub) == (20, inference_pb2.FINISH_REASON_LENGTH)

    asyncio.run(scenario())


def test_logprobs_token_id_prompts_and_the_tokenizer_over_grpc(models):
    """A prompt given as token ids generates what its text does; the log-probabilities of the
    scored prompt and of the output are the library's full-forward log-softmax, with each
    token's text and bytes; Tokenize and Detokenize use the serving version's tokenizer."""

    async def scenario() -> tuple:
        async with running_core(models) as core, serving(core) as stub:
            tokens = await stub.Tokenize(inference_pb2.TokenizeRequest(text=PROMPTS[1]))
            back = await stub.Detokenize(
                inference_pb2.DetokenizeRequest(token_ids=tokens.token_ids)
            )
            request = inference_pb2.GenerateRequest(
                prompt_token_ids=tokens.token_ids,
                max_new_tokens=6,
                temperature=0,
                ignore_eos=True,
                logprobs=2,
                prompt_logprobs=True,
            )
            scored = [m async for m in stub.Generate(request)]
            only = inference_pb2.GenerateRequest(
                prompt=PROMPTS[1], max_new_tokens=0, prompt_logprobs=True
            )
            alone = [m async for m in stub.Generate(only)]
            info = await stub.GetModelInfo(inference_pb2.GetModelInfoRequest())
            return tokens, back, scored, alone, info

    tokens, back, scored, alone, info = asyncio.run(scenario())
    loaded = checkpoint.load_version(models, SHIFTABLE)
    assert list(tokens.token_ids) == encode(loaded.tokenizer, PROMPTS[1])
    assert "".join(tokens.tokens) == PROMPTS[1] and back.text == PROMPTS[1]
    assert (tokens.version_id, tokens.context) == (SHIFTABLE, loaded.model.cfg.context)
    ref = reference(models, SHIFTABLE, PROMPTS[1], replace(GREEDY, max_new_tokens=6))
    assert [i for m in scored for i in m.token_ids] == ref.output_ids
    prompt = list(scored[0].prompt_logprobs)
    assert [p.token_id for p in prompt] == list(tokens.token_ids)
    assert not prompt[0].HasField("logprob") and all(p.HasField("logprob") for p in prompt[1:])
    assert all(not m.prompt_logprobs for m in scored[1:])
    out = [e for m in scored for e in m.logprobs]
    assert [e.token_id for e in out] == ref.output_ids
    ids = list(tokens.token_ids) + ref.output_ids
    with torch.no_grad():
        logits, _ = loaded.model(torch.tensor([ids]))
    expected = logits[0].log_softmax(-1)
    for p, entry in enumerate(prompt[1:] + out):
        assert entry.logprob == pytest.approx(expected[p, ids[p + 1]].item(), abs=1e-4)
        assert [t.token_id for t in entry.top] == expected[p].topk(2).indices.tolist()
        assert entry.token_bytes.decode("utf-8", "backslashreplace") == entry.token
    # a prompt scored alone: one message, no new token, the same scores
    assert len(alone) == 1 and not alone[0].token_ids
    assert alone[0].finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert alone[0].usage.completion_tokens == 0
    assert [p.logprob for p in alone[0].prompt_logprobs[1:]] == pytest.approx(
        [p.logprob for p in prompt[1:]], abs=1e-5
    )
    assert info.eos_token == "<|endoftext|>" and "messages" in info.chat_template
