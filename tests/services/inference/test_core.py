"""The inference core in-process: continuous batching, cancellation, back-pressure, hot swap,
gate inspection, and the worker process behind it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from services.inference.messages import Chunk, Usage
from services.inference.worker import TOKENIZE_APART_CHARS
from shiftable_lib.errors import NotFound, Overloaded, Unavailable
from shiftable_lib.sampling import Routing, SamplingParams
from tests.services.inference.conftest import (
    EXPERTS,
    GENERALIST,
    GREEDY,
    LONG,
    PROMPTS,
    SHIFTABLE,
    collect,
    eventually,
    joined,
    reference,
    running_core,
)


def test_a_greedy_stream_equals_the_library_completion_and_ends_with_a_summary(models):
    long_prompt = "the list of values " * 40

    async def scenario() -> tuple[list[Chunk], list[Chunk], object]:
        async with running_core(models) as core:
            chunks = await collect(core.generate(PROMPTS[0], GREEDY))
            truncated = await collect(core.generate(long_prompt, GREEDY))
            return chunks, truncated, core.info()

    chunks, truncated, info = asyncio.run(scenario())
    ref = reference(models, SHIFTABLE, PROMPTS[0], GREEDY)
    assert joined(chunks) == (ref.text, ref.output_ids)
    assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason == "length"
    assert last.usage == Usage(len(ref.prompt_ids), GREEDY.max_new_tokens, 0)
    assert last.gate_means is not None and tuple(last.gate_means) == EXPERTS
    expected = dict(zip(EXPERTS, ref.gate_mean.mean(0).tolist(), strict=True))
    assert last.gate_means == pytest.approx(expected, abs=1e-5)
    assert sum(last.gate_means.values()) == pytest.approx(1.0, abs=1e-5)
    assert {c.version_id for c in chunks} == {SHIFTABLE}

    long_ref = reference(models, SHIFTABLE, long_prompt, GREEDY)
    assert long_ref.truncated > 0
    assert truncated[-1].usage == Usage(64 - GREEDY.max_new_tokens, 24, long_ref.truncated)
    assert joined(truncated) == (long_ref.text, long_ref.output_ids)

    assert (info.version_id, info.specialists, info.profile) == (SHIFTABLE, ("dl", "ds"), "tiny")
    assert (info.context, info.n_layer, info.d_model) == (64, 2, 32)
    assert (info.requests_total, info.tokens_generated, info.active_streams) == (2, 48, 0)


def test_bad_requests_are_refused_before_anything_is_queued(models):
    async def scenario() -> None:
        async with running_core(models, version=None) as core:
            with pytest.raises(Unavailable, match="no model"):
                await anext(core.generate("the", GREEDY))
            with pytest.raises(Unavailable):
                await core.inspect_gates("the", Routing())
            await core.load(SHIFTABLE)
            for params, error in [
                (SamplingParams(max_new_tokens=64), ValueError),
                (SamplingParams(max_new_tokens=8, top_p=0), ValueError),
                (SamplingParams(max_new_tokens=8, routing=Routing(force=("nope",))), NotFound),
                (SamplingParams(max_new_tokens=8, routing=Routing(mode="top3")), ValueError),
            ]:
                with pytest.raises(error):
                    await anext(core.generate("the", params))
            assert core.info().requests_total == 0

    asyncio.run(scenario())


def test_concurrent_streams_advance_together_and_match_requests_run_alone(models):
    async def scenario() -> tuple[list[list[Chunk]], object]:
        async with running_core(models, max_batch=4) as core:
            streams = [collect(core.generate(p, GREEDY)) for p in PROMPTS]
            return list(await asyncio.gather(*streams)), core.info()

    results, info = asyncio.run(scenario())
    for prompt, chunks in zip(PROMPTS, results, strict=True):
        ref = reference(models, SHIFTABLE, prompt, GREEDY)
        assert joined(chunks) == (ref.text, ref.output_ids)
    assert info.tokens_generated == len(PROMPTS) * GREEDY.max_new_tokens
    # one step advances every active stream; requests submitted a moment apart join a step late
    assert info.steps <= GREEDY.max_new_tokens + len(PROMPTS) - 1
    assert info.steps >= GREEDY.max_new_tokens and info.decode_seconds > 0


def test_closing_a_stream_early_cancels_its_sequence_and_frees_the_slot(models):
    async def scenario() -> None:
        async with running_core(models, max_batch=1, max_queue=0) as core:
            stream = core.generate(PROMPTS[0], LONG)
            await anext(stream)
            await stream.aclose()  # what a disconnecting client does
            await eventually(lambda: core.info().active_streams == 0)
            assert core.info().tokens_generated < LONG.max_new_tokens
            # the slot and the admission count are both free again
            chunks = await collect(core.generate(PROMPTS[1], GREEDY))
            assert chunks[-1].finish_reason == "length"

            before = core.info().tokens_generated
            task = asyncio.create_task(collect(core.generate(PROMPTS[2], LONG)))
            await eventually(lambda: core.info().tokens_generated > before)
            task.cancel()  # a cancelled reader, the other way a stream is abandoned
            await eventually(lambda: core.info().active_streams == 0)
            assert core.info().tokens_generated < before + LONG.max_new_tokens

    asyncio.run(scenario())


def test_closing_the_core_ends_running_streams_as_cancelled(models):
    async def scenario() -> None:
        async with running_core(models) as core:
            stream = core.generate(PROMPTS[0], LONG)
            first = await anext(stream)
            await asyncio.to_thread(core.close)
            rest = await collect(stream)
            assert rest[-1].finish_reason == "cancelled"
            assert rest[-1].usage is not None
            assert rest[-1].usage.completion_tokens == len(joined([first, *rest])[1])
            with pytest.raises(Unavailable, match="shutting down"):
                await anext(core.generate(PROMPTS[0], GREEDY))

    asyncio.run(scenario())


def test_more_requests_than_slots_and_queue_are_refused_as_overloaded(models):
    async def scenario() -> None:
        async with running_core(models, max_batch=1, max_queue=1) as core:
            running, waiting = core.generate(PROMPTS[0], LONG), core.generate(PROMPTS[1], LONG)
            await anext(running)
            pending = asyncio.create_task(anext(waiting))
            await asyncio.sleep(0)  # the second request is admitted and waits for its first token
            with pytest.raises(Overloaded):
                await anext(core.generate(PROMPTS[2], GREEDY))
            await running.aclose()
            await pending
            await waiting.aclose()
            chunks = await collect(core.generate(PROMPTS[2], GREEDY))
            assert chunks[-1].finish_reason == "length"

    asyncio.run(scenario())


def test_a_hot_swap_finishes_running_streams_on_the_old_version_and_serves_new_ones_on_the_new(
    models,
):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(16)]

    async def scenario() -> tuple[list[list[Chunk]], list[Chunk], int, int, object]:
        async with running_core(models, GENERALIST, max_batch=2) as core:
            old = [asyncio.create_task(collect(core.generate(p, LONG))) for p in prompts]
            await eventually(lambda: core.info().tokens_generated > 0)
            await core.load(SHIFTABLE)
            running_at_swap = sum(not task.done() for task in old)
            new = await collect(core.generate(PROMPTS[0], GREEDY))
            running_after_new = sum(not task.done() for task in old)
            return (
                list(await asyncio.gather(*old)),
                new,
                running_at_swap,
                running_after_new,
                (core.info()),
            )

    old, new, running_at_swap, running_after_new, info = asyncio.run(scenario())
    assert running_at_swap > 0 and running_after_new > 0  # the new version did not wait for them
    for prompt, chunks in zip(prompts, old, strict=True):
        ref = reference(models, GENERALIST, prompt, LONG)
        assert joined(chunks) == (ref.text, ref.output_ids)
        assert {c.version_id for c in chunks} == {GENERALIST}
        assert tuple(chunks[-1].gate_means or ()) == ("general",)
    ref = reference(models, SHIFTABLE, PROMPTS[0], GREEDY)
    assert joined(new) == (ref.text, ref.output_ids)
    assert {c.version_id for c in new} == {SHIFTABLE}
    assert tuple(new[-1].gate_means or ()) == EXPERTS
    assert (info.version_id, info.specialists, info.swapping) == (SHIFTABLE, ("dl", "ds"), False)
    assert info.active_streams == info.queued == 0


def test_a_long_prompt_is_tokenised_apart_and_joins_the_version_it_was_sent_to(models):
    """A prompt past TOKENIZE_APART_CHARS is tokenised in a helper thread: it generates what it
    would inline, under the version that was serving when it arrived (a swap meanwhile does not
    change it), and one closed while it is tokenised is forgotten."""
    long_prompt = " ".join(PROMPTS) * (2 * TOKENIZE_APART_CHARS // len(" ".join(PROMPTS)))
    assert len(long_prompt) > TOKENIZE_APART_CHARS

    async def scenario() -> tuple[list[Chunk], list[Chunk], list[Chunk], object]:
        async with running_core(models, GENERALIST, max_batch=4) as core:
            beside = asyncio.create_task(collect(core.generate(PROMPTS[0], LONG)))
            await eventually(lambda: core.info().tokens_generated > 0)
            # the longest prompt there is, closed while it is tokenised (~50 ms)
            closed = asyncio.create_task(collect(core.generate("x " * 50_000, LONG)))
            old = asyncio.create_task(collect(core.generate(long_prompt, GREEDY)))
            await asyncio.sleep(0.005)
            closed.cancel()
            await core.load(SHIFTABLE)  # while the long prompt may still be tokenised
            new = await collect(core.generate(long_prompt, GREEDY))
            return await beside, await old, new, core.info()

    beside, old, new, info = asyncio.run(scenario())
    # nothing was generated for the closed one
    assert info.tokens_generated == sum(len(joined(c)[1]) for c in (beside, old, new))
    ref = reference(models, GENERALIST, PROMPTS[0], LONG)
    assert joined(beside) == (ref.text, ref.output_ids)
    for chunks, version in [(old, GENERALIST), (new, SHIFTABLE)]:
        ref = reference(models, version, long_prompt, GREEDY)
        assert joined(chunks) == (ref.text, ref.output_ids)
        assert {c.version_id for c in chunks} == {version}
        assert chunks[-1].usage == ref_usage(ref)
    assert info.active_streams == info.queued == 0


def ref_usage(seq) -> Usage:
    return Usage(len(seq.prompt_ids), len(seq.output_ids), seq.truncated)


def test_a_failed_load_keeps_the_old_version_serving(models):
    async def scenario() -> None:
        async with running_core(models, GENERALIST) as core:
            with pytest.raises(NotFound):
                await core.load("v0099")
            info = core.info()
            assert info.version_id == GENERALIST and "v0099" in info.load_error
            chunks = await collect(core.generate(PROMPTS[0], GREEDY))
            assert chunks[-1].version_id == GENERALIST
            await core.load(SHIFTABLE)
            assert core.info().load_error == ""

    asyncio.run(scenario())


def test_inspect_gates_reports_weights_per_layer_position_and_expert(models):
    async def scenario() -> list:
        async with running_core(models) as core:
            return [
                await core.inspect_gates(PROMPTS[1], Routing()),
                await core.inspect_gates(PROMPTS[1], Routing(force=("ds",))),
                await core.inspect_gates("numpy array " * 60, Routing()),
            ]

    soft, forced, long = asyncio.run(scenario())
    assert soft.experts == EXPERTS and soft.version_id == SHIFTABLE
    assert "".join(soft.tokens) == PROMPTS[1] and soft.truncated_prompt_tokens == 0
    n = len(soft.tokens)
    assert len(soft.means) == len(soft.per_position) == 2
    for means, positions in zip(soft.means, soft.per_position, strict=True):
        assert len(means) == len(EXPERTS) and sum(means) == pytest.approx(1.0, abs=1e-5)
        assert len(positions) == n and all(len(p) == len(EXPERTS) for p in positions)
        assert means == pytest.approx(
            [sum(col) / n for col in zip(*positions, strict=True)], abs=1e-6
        )
    assert all(p == [0.0, 0.0, 1.0] for layer in forced.per_position for p in layer)
    assert len(long.tokens) == 64 and long.truncated_prompt_tokens > 0


def test_a_worker_that_dies_fails_its_streams_and_is_replaced(models):
    async def scenario() -> None:
        async with running_core(models) as core:
            stream = core.generate(PROMPTS[0], LONG)
            await anext(stream)
            core._process.kill()  # the decode worker process crashes mid-stream
            with pytest.raises(Unavailable, match="worker process died"):
                await collect(stream)
            # a new worker takes over, serving the same version
            deadline = time.monotonic() + 60
            while True:
                try:
                    chunks = await collect(core.generate(PROMPTS[1], GREEDY))
                    break
                except Unavailable:
                    assert time.monotonic() < deadline, "no new worker came up"
                    await asyncio.sleep(0.1)
            ref = reference(models, SHIFTABLE, PROMPTS[1], GREEDY)
            assert joined(chunks) == (ref.text, ref.output_ids)
            assert chunks[-1].version_id == SHIFTABLE

    asyncio.run(scenario())


def test_a_process_that_never_closes_its_core_still_exits(tmp_path):
    """An unhandled error in the server process must not leave it hanging at exit, waiting for
    a worker that waits for it: the core closes itself then."""
    script = (
        "import asyncio, contextlib\n"
        "from pathlib import Path\n"
        "from services.inference.core import InferenceCore\n"
        f"core = InferenceCore(Path({str(tmp_path)!r}), 'cpu')\n"
        "with contextlib.suppress(Exception):  # answered by the worker: it is up and running\n"
        "    asyncio.run(core.load('v0001'))\n"
        "raise SystemExit('an error nobody caught')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[3],  # the repository root
    )
    assert done.returncode == 1 and "an error nobody caught" in done.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["graphs", "eager"])
def test_the_worker_serves_on_cuda_with_or_without_graphs(models, cuda_graphs):
    async def scenario() -> None:
        async with running_core(models, device="cuda", cuda_graphs=cuda_graphs) as core:
            assert core.cuda_graphs is cuda_graphs
            streams = [collect(core.generate(p, GREEDY)) for p in PROMPTS]
            for prompt, chunks in zip(PROMPTS, await asyncio.gather(*streams), strict=True):
                ref = reference(models, SHIFTABLE, prompt, GREEDY)  # the CPU library's
                assert joined(chunks) == (ref.text, ref.output_ids)

    asyncio.run(scenario())
