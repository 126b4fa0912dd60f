"""Generation: the KV cache, continuous batching, sampling controls and stop strings."""

from __future__ import annotations

import copy
import re
from dataclasses import replace

import pytest
import torch

from shiftable_lib.cache import BATCHED_DECODE_ROWS, KVCache, decode_attention, visible
from shiftable_lib.generate import Engine, complete, stream
from shiftable_lib.routing import RouteTable
from shiftable_lib.sampling import SOFT, Routing, SamplingParams
from shiftable_lib.tokenizer import encode

GREEDY = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)


# every decode attention path: the compiled loop (position-major cache, one thread), SDPA and
# the batched products (head-major: several threads, or a GPU for SDPA), and PyTorch's
# attention over a position-major cache (the thread count changed after the cache was made)
PATHS = ["compiled", "sdpa", "batched", "position-major-torch"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("routing", [Routing(), Routing(mode="top1"), Routing(force=("ds",))])
def test_kv_cache_decoding_equals_full_recomputation_on_a_ragged_batch(
    shiftable, routing, path, monkeypatch
):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1 if path == "compiled" else 2)
    if path == "batched":
        monkeypatch.setattr("shiftable_lib.cache.BATCHED_DECODE_ROWS", 1)
    cache = shiftable.new_cache(slots=3)
    if path == "position-major-torch":
        monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
        cache = shiftable.new_cache(slots=3)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert cache.position_major == path.startswith(("compiled", "position-major"))
    gen = torch.Generator().manual_seed(3)
    full_idx = torch.randint(0, shiftable.cfg.vocab_size, (3, 30), generator=gen)
    with torch.no_grad():
        full, full_gates = shiftable(full_idx, routing, return_gates=True)
    lengths = torch.tensor([4, 11, 7])
    routes = RouteTable.build(shiftable.experts, [routing] * 3, "cpu")
    with torch.no_grad():
        logits, _, _ = shiftable.prefill(cache, torch.arange(3), full_idx[:, :11], lengths, routes)
        for i in range(3):
            torch.testing.assert_close(logits[i], full[i, lengths[i] - 1], rtol=0, atol=1e-5)
        for _ in range(15):
            pos = cache.lengths.clone()
            logits, gates = shiftable.decode(cache, full_idx[torch.arange(3), pos], routes)
            for i in range(3):
                torch.testing.assert_close(logits[i], full[i, pos[i]], rtol=0, atol=1e-5)
                for layer in range(shiftable.cfg.n_layer):
                    torch.testing.assert_close(
                        gates[layer, i], full_gates[layer][i, pos[i]], rtol=0, atol=1e-6
                    )


@pytest.mark.parametrize("layout", ["head-major", "position-major"])
@pytest.mark.parametrize("routing", [Routing(), Routing(mode="top1"), Routing(force=("ds",))])
def test_a_prompt_prefilled_in_chunks_equals_one_prefilled_whole(
    shiftable, routing, layout, monkeypatch
):
    """Chunk after chunk into one slot (each going on from the cached part of the prompt) leaves
    the cache as one whole prefill does, and scores the last token the same."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1 if layout == "position-major" else 2)
    whole, chunked = shiftable.new_cache(slots=3), shiftable.new_cache(slots=3)
    assert whole.position_major == (layout == "position-major")
    gen = torch.Generator().manual_seed(5)
    idx = torch.randint(0, shiftable.cfg.vocab_size, (1, 37), generator=gen)
    routes = RouteTable.build(shiftable.experts, [routing], "cpu")
    slot = torch.tensor([2])
    with torch.no_grad():
        logits, gates, _ = shiftable.prefill(whole, slot, idx, torch.tensor([37]), routes)
        for start in range(0, 37, 16):  # 16 + 16 + 5
            chunk = idx[:, start : start + 16]
            length = torch.tensor([chunk.shape[1]])
            last, last_gates, _ = shiftable.prefill(chunked, slot, chunk, length, routes, start)
    torch.testing.assert_close(last, logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(last_gates, gates, rtol=0, atol=1e-6)
    assert chunked.lengths.tolist() == whole.lengths.tolist() == [0, 0, 37]
    for layer in range(shiftable.cfg.n_layer):
        for ours, theirs in [
            (chunked.k[layer], whole.k[layer]),
            (chunked.v[layer], whole.v[layer]),
            (chunked.gate_state[layer], whole.gate_state[layer]),
        ]:
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2], ids=["compiled", "torch"])
def test_a_long_prompt_fills_a_chunk_per_step_while_the_batch_decodes(
    shiftable, tokenizer, threads, monkeypatch
):
    """Past `prefill_chunk` tokens a prompt is prefilled a chunk per step: the sequences running
    meanwhile get a token every step, and every sequence gets the tokens it gets alone."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    long = " ".join(["numpy array mean of the list", "tensor gradient"] * 4)
    prompts = ["the list of", long, "tensor gradient", long + " more"]
    alone = [
        complete(Engine(shiftable, tokenizer, max_batch=1), [p], GREEDY)[0].output_ids
        for p in prompts
    ]
    engine = Engine(shiftable, tokenizer, max_batch=3, prefill_chunk=16)
    first = engine.submit(prompts[0], GREEDY)
    engine.step()
    rest = [engine.submit(p, GREEDY) for p in prompts[1:]]
    assert len(first.prompt_ids) <= 16 and len(rest[0].prompt_ids) > 2 * 16  # 3 chunks
    steps_filling = 0
    while engine.has_work():
        filling = engine.filling is not None
        events = engine.step()
        steps_filling += filling
        if filling and first.finish_reason is None:
            assert any(e.seq is first for e in events)  # not held up by the long prompt
    assert steps_filling >= 2 * 2  # two long prompts, a step for each chunk after the first
    assert [s.output_ids for s in (first, *rest)] == alone
    assert engine.filling is None and not engine.active and not engine.queue


def test_a_long_prompt_cancelled_while_it_fills_frees_its_slot(shiftable, tokenizer):
    long = " ".join(["numpy array mean of the list"] * 8)
    engine = Engine(shiftable, tokenizer, max_batch=2, prefill_chunk=16)
    running = engine.submit("the list of", GREEDY)
    engine.step()
    filling = engine.submit(long, GREEDY)
    engine.step()
    assert engine.filling is filling
    engine.cancel(filling)
    assert engine.filling is None and filling.finish_reason == "cancelled"
    after = engine.submit("tensor gradient", GREEDY)
    while engine.has_work():
        engine.step()
    alone = complete(Engine(shiftable, tokenizer, max_batch=1), ["tensor gradient"], GREEDY)[0]
    assert after.output_ids == alone.output_ids and running.finish_reason == "length"


def test_batched_decode_attention_equals_sdpa_and_ignores_positions_past_each_row():
    gen = torch.Generator().manual_seed(0)
    rows, heads, span, hd = BATCHED_DECODE_ROWS + 1, 4, 13, 8  # the batched products
    q, keys, values = (torch.randn(rows, heads, t, hd, generator=gen) for t in (1, span, span))
    lengths = torch.randint(1, span + 1, (rows,), generator=gen)
    keep = (torch.arange(span) < lengths[:, None]).view(rows, 1, 1, span)

    def attend(k: torch.Tensor) -> torch.Tensor:
        cache = KVCache([k], [values], [], lengths)  # head-major
        mask = visible(lengths - 1, span, q.dtype)
        return decode_attention(q, cache, 0, slice(0, heads), lengths - 1, mask)

    batched = attend(keys)
    fused = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=keep)
    torch.testing.assert_close(batched, fused, rtol=0, atol=1e-5)
    garbage = keys.masked_fill(~keep.transpose(-1, -2), 1e4)  # what lies past a row's length
    torch.testing.assert_close(attend(garbage), batched)


@pytest.mark.parametrize("threads", [1, 2], ids=["compiled", "torch"])
def test_requests_joining_a_running_batch_get_the_same_tokens_as_alone(
    shiftable, tokenizer, threads, monkeypatch
):
    prompts = ["the list of", "numpy array mean", "tensor gradient"]
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # alone: PyTorch's attention
    alone = [
        complete(Engine(shiftable, tokenizer, max_batch=1), [p], GREEDY)[0].output_ids
        for p in prompts
    ]
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    engine = Engine(shiftable, tokenizer, max_batch=4)
    assert engine.cache.position_major == (threads == 1)
    first = engine.submit(prompts[0], GREEDY)
    for _ in range(3):
        engine.step()  # the first request is mid-generation when the others join
    rest = [engine.submit(p, GREEDY) for p in prompts[1:]]
    while engine.has_work():
        engine.step()
    assert [s.output_ids for s in (first, *rest)] == alone
    assert all(len(ids) == GREEDY.max_new_tokens for ids in alone)


def test_a_full_engine_queues_requests_until_a_slot_frees(shiftable, tokenizer):
    engine = Engine(shiftable, tokenizer, max_batch=2)
    seqs = [engine.submit(f"the list {i}", GREEDY) for i in range(5)]
    engine.step()
    assert len(engine.active) == 2 and len(engine.queue) == 3
    while engine.has_work():
        engine.step()
    assert all(s.finish_reason == "length" for s in seqs)


def test_cancelling_frees_the_slot_at_once(shiftable, tokenizer):
    engine = Engine(shiftable, tokenizer, max_batch=2)
    a = engine.submit("the list", GREEDY)
    b = engine.submit("numpy array", GREEDY)
    engine.step()
    engine.cancel(a)
    assert a.finish_reason == "cancelled"
    assert engine.active == [b]
    c = engine.submit("tensor", GREEDY)
    engine.step()
    assert c in engine.active
    while engine.has_work():
        engine.step()
    assert b.finish_reason == c.finish_reason == "length"


def test_greedy_is_deterministic_and_a_seed_makes_sampling_repeatable(shiftable, tokenizer):
    engine = Engine(shiftable, tokenizer, max_batch=2)
    greedy = [complete(engine, ["the list"], GREEDY)[0].output_ids for _ in range(2)]
    assert greedy[0] == greedy[1]
    sampled = SamplingParams(max_new_tokens=20, temperature=1.5, seed=7, ignore_eos=True)
    runs = [complete(engine, ["the list"], sampled)[0].output_ids for _ in range(2)]
    other = complete(engine, ["the list"], SamplingParams(**{**sampled.__dict__, "seed": 8}))
    assert runs[0] == runs[1]
    assert other[0].output_ids != runs[0]


def test_top_k_one_is_greedy(shiftable, tokenizer):
    engine = Engine(shiftable, tokenizer)
    top1 = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=1, seed=3, ignore_eos=True)
    assert complete(engine, ["the list"], top1)[0].output_ids == (
        complete(engine, ["the list"], GREEDY)[0].output_ids
    )


def test_tiny_top_p_is_greedy(shiftable, tokenizer):
    engine = Engine(shiftable, tokenizer)
    nucleus = SamplingParams(
        max_new_tokens=12, temperature=1.0, top_p=1e-6, seed=3, ignore_eos=True
    )
    assert complete(engine, ["the list"], nucleus)[0].output_ids == (
        complete(engine, ["the list"], GREEDY)[0].output_ids
    )


def test_streamed_text_concatenates_to_the_decoded_completion(shiftable, tokenizer):
    engine = Engine(shiftable, tokenizer)
    params = SamplingParams(max_new_tokens=30, temperature=1.0, seed=1, ignore_eos=True)
    events = list(stream(engine, "héllo 🚀", params))
    text = "".join(e.text for e in events)
    assert text == tokenizer.decode(events[-1].seq.output_ids)
    assert events[-1].finish_reason == "length" and events[-1].seq.text == text


def test_a_stop_string_ends_generation_and_is_not_emitted(shiftable, tokenizer):
    engine = Engine(shiftable, tokenizer)
    free = complete(engine, ["the list"], GREEDY)[0].text
    stop = free[5:8]  # some text the model is known to produce, possibly across tokens
    assert stop.strip(), "pick a non-blank stop string"
    params = SamplingParams(max_new_tokens=12, temperature=0, stop=(stop,), ignore_eos=True)
    events = list(stream(engine, "the list", params))
    streamed = "".join(e.text for e in events)
    assert events[-1].finish_reason == "stop"
    assert streamed == free[: free.index(stop)]


def test_an_over_long_prompt_is_left_truncated_and_reported(shiftable, tokenizer):
    engine = Engine(shiftable, tokenizer)
    prompt = " ".join(["the list of values"] * 40)
    n = len(encode(tokenizer, prompt))
    seq = complete(engine, [prompt], GREEDY)[0]
    room = shiftable.cfg.context - GREEDY.max_new_tokens
    assert seq.truncated == n - room > 0
    assert len(seq.prompt_ids) == room and seq.finish_reason == "length"


def test_gate_weights_of_the_completion_are_reported(shiftable, tokenizer):
    seq = complete(Engine(shiftable, tokenizer), ["numpy array"], GREEDY)[0]
    mean = seq.gate_mean
    assert mean.shape == (shiftable.cfg.n_layer, 3)
    torch.testing.assert_close(mean.sum(-1), torch.ones(shiftable.cfg.n_layer))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (SamplingParams(max_new_tokens=0), "max_new_tokens"),
        (SamplingParams(max_new_tokens=10_000), "max_new_tokens"),
        (SamplingParams(max_new_tokens=8, temperature=-1), "temperature"),
        (SamplingParams(max_new_tokens=8, temperature=float("nan")), "temperature"),
        (SamplingParams(max_new_tokens=8, top_k=-1), "top_k"),
        (SamplingParams(max_new_tokens=8, top_p=0), "top_p"),
        (SamplingParams(max_new_tokens=8, stop=("",)), "stop"),
        (SamplingParams(max_new_tokens=8, routing=Routing(force=("law",))), "law"),
        (SamplingParams(max_new_tokens=8, logprobs=21), "logprobs"),
        (SamplingParams(max_new_tokens=8, logprobs=-1), "logprobs"),
    ],
)
def test_bad_parameters_are_refused_before_anything_is_queued(
    shiftable, tokenizer, params, message
):
    engine = Engine(shiftable, tokenizer)
    with (
        pytest.raises(ValueError, match=message)
        if "law" not in message
        else pytest.raises(LookupError, match=message)
    ):
        engine.submit("the list", params)
    assert not engine.has_work()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sampling_and_batching_work_on_cuda(shiftable, tokenizer):
    model = shiftable.to("cuda")
    engine = Engine(model, tokenizer, max_batch=4)
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=20, top_p=0.9, seed=3)
    first = complete(engine, ["the list", "numpy array"], params)
    again = complete(engine, ["the list", "numpy array"], params)
    assert [s.output_ids for s in first] == [s.output_ids for s in again]
    greedy_gpu = complete(engine, ["tensor"], GREEDY)[0].output_ids
    greedy_cpu = complete(Engine(model.to("cpu"), tokenizer), ["tensor"], GREEDY)[0].output_ids
    assert greedy_gpu == greedy_cpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fused_kernels", [False, True])
def test_cuda_graph_decoding_matches_eager_as_requests_join_and_leave(
    shiftable, tokenizer, monkeypatch, fused_kernels
):
    from shiftable_lib import fused, generate

    # spans of 8, 16, 32 and the whole context: rows grow out of one into the next
    monkeypatch.setattr(generate, "MIN_SPAN", 8)
    monkeypatch.setattr(fused, "enabled", fused_kernels)
    model = shiftable.to("cuda")
    prompts = ["the list of", "numpy array mean", "tensor gradient", "def main", "import os"]
    lengths = [12, 3, 7, 10, 5]  # rows leave at different steps: the bucket shrinks as they go

    def run(engine: Engine, routing: Routing = SOFT) -> list[list[int]]:
        seqs = []
        for i, (prompt, n) in enumerate(zip(prompts, lengths, strict=True)):
            params = SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)
            seqs.append(engine.submit(prompt, replace(params, routing=routing)))
            if i % 2:
                engine.step()  # the next one joins a running batch
        while engine.has_work():
            engine.step()
        return [s.output_ids for s in seqs]

    graphed = Engine(model, tokenizer, max_batch=4, cuda_graphs=True)
    eager = Engine(model, tokenizer, max_batch=4, cuda_graphs=False)
    assert graphed.graphs is not None and graphed.graphs.buckets == [1, 2, 4]
    assert graphed.graphs.spans == [8, 16, 32, model.cfg.context]
    # where the fused kernels serve, a step reads each row's length: one graph a bucket
    spans = [model.cfg.context] if fused_kernels and fused.available() else graphed.graphs.spans
    assert graphed.graphs.captured == {b: spans for b in (1, 2, 4)}
    assert run(graphed) == run(eager)
    assert graphed.graphs.replays > 0
    replays = graphed.graphs.replays
    forced = Routing(force=("ds",))  # not captured: decoded eagerly, same cache
    assert run(graphed, forced) == run(eager, forced)
    assert graphed.graphs.replays == replays
    assert run(graphed) == run(eager)  # and the graphs still serve after eager steps


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_an_engine_captured_in_a_thread_while_another_decodes(shiftable, tokenizer):
    """A hot swap in the inference worker: a helper thread makes the new version's engine
    (capturing its graphs) while the step thread keeps decoding the old one."""
    import threading

    model = shiftable.to("cuda")
    old = Engine(model, tokenizer, max_batch=4)
    seqs = [old.submit(p, GREEDY) for p in ("the list of", "numpy array mean")]
    made: list[Engine] = []
    helper = threading.Thread(target=lambda: made.extend(Engine(model, tokenizer, 4) for _ in "ab"))
    helper.start()
    while old.has_work() or helper.is_alive():
        old.step()
    helper.join()
    eager = Engine(model, tokenizer, max_batch=4, cuda_graphs=False)
    alone = complete(eager, ["the list of", "numpy array mean"], GREEDY)
    assert [s.output_ids for s in seqs] == [s.output_ids for s in alone]
    assert all(engine.graphs is not None for engine in made)
    again = complete(made[0], ["the list of", "numpy array mean"], GREEDY)
    assert [s.output_ids for s in again] == [s.output_ids for s in alone]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_failed_capture_leaves_an_engine_that_decodes_eagerly(shiftable, tokenizer, monkeypatch):
    from shiftable_lib import generate

    def fail(*args):
        raise RuntimeError("out of memory during capture")

    monkeypatch.setattr(generate.DecodeGraphs, "_capture", fail)
    model = shiftable.to("cuda")
    engine = Engine(model, tokenizer, max_batch=4)
    assert engine.graphs is None
    got = complete(engine, ["the list of"], GREEDY)[0].output_ids
    monkeypatch.undo()
    assert got == complete(Engine(model, tokenizer, 4), ["the list of"], GREEDY)[0].output_ids


EXTREME = [
    SamplingParams(max_new_tokens=10, temperature=1e-40, ignore_eos=True),
    SamplingParams(max_new_tokens=10, temperature=5e-324, top_k=3, ignore_eos=True),
    SamplingParams(max_new_tokens=10, temperature=1e-30, top_p=1e-300, ignore_eos=True),
    SamplingParams(max_new_tokens=10, temperature=100.0, top_k=1_000_000, ignore_eos=True),
]


def test_any_admitted_sampling_value_samples_and_tiny_temperatures_are_greedy(shiftable, tokenizer):
    """However close to 0 a temperature is, the scores never overflow: the top token keeps all
    the weight, as with temperature 0."""
    engine = Engine(shiftable, tokenizer, max_batch=8)
    greedy = complete(engine, ["the list"], replace(GREEDY, max_new_tokens=10))[0]
    for params in EXTREME:
        params.validate(shiftable.cfg.context)
    seqs = complete(engine, ["the list"] * len(EXTREME), EXTREME[0])  # one batch of them all
    mixed = [engine.submit("the list", p) for p in EXTREME]
    while any(s.finish_reason is None for s in mixed):
        engine.step()
    for seq in [*seqs, *mixed]:
        assert seq.finish_reason == "length" and len(seq.output_ids) == 10
    assert all(s.output_ids == greedy.output_ids for s in [*seqs, *mixed[:3]])


@pytest.mark.parametrize("look_ahead", [False, True])
def test_a_sequence_whose_scores_go_bad_ends_alone(shiftable, tokenizer, monkeypatch, look_ahead):
    """A fault in one sequence's logits (as from a diverged model) ends that sequence with an
    error; the others in its batch decode on to their end. With steps launched ahead, the
    faulty row's next step is launched (from a stand-in token) before the host sees the fault,
    one token later, and is thrown away."""
    engine = Engine(shiftable, tokenizer, max_batch=4, look_ahead=look_ahead)
    params = replace(GREEDY, temperature=0.8, max_new_tokens=8)
    seqs = [engine.submit(p, params) for p in ("the list", "tensor", "array", "open the file")]
    decode = shiftable.decode

    def poisoned(cache, tokens, routes, span=None):
        logits, gates = decode(cache, tokens, routes, span)
        row = engine.active.index(seqs[1]) if seqs[1] in engine.active else None
        if row is not None and len(seqs[1].output_ids) == 3:
            logits[row] = float("nan")
        return logits, gates

    monkeypatch.setattr(shiftable, "decode", poisoned)
    events = []
    while engine.has_work():
        events += engine.step()
    assert seqs[1].finish_reason == "error" and len(seqs[1].output_ids) == 3 + look_ahead
    assert "non-finite" in seqs[1].error
    assert (engine.steps_ahead > 0) == look_ahead
    assert [e.finish_reason for e in events if e.seq is seqs[1]][-1] == "error"
    for seq in (seqs[0], seqs[2], seqs[3]):
        assert seq.finish_reason == "length" and len(seq.output_ids) == 8
    assert not engine.active  # the failed sequence's slot is free again


@pytest.mark.parametrize("chunk", [256, 7], ids=["whole", "in-chunks"])
@pytest.mark.parametrize("routing", [Routing(), Routing(force=("ds",))])
def test_scored_prompt_and_output_logprobs_equal_a_full_forwards_log_softmax(
    shiftable, tokenizer, chunk, routing
):
    """Each prompt token's log-probability given the ones before it, and each generated one's,
    are the log-softmax of one forward over the whole text, with the top alternatives, also
    beside another request in the batch and when the prompt is prefilled in chunks."""
    engine = Engine(shiftable, tokenizer, max_batch=2, prefill_chunk=chunk)
    params = replace(GREEDY, logprobs=3, prompt_logprobs=True, routing=routing, max_new_tokens=5)
    other = engine.submit("tensor gradient", replace(GREEDY, temperature=0.8, seed=1))
    seq = engine.submit("the list of numpy array mean values", params)
    events = []
    while engine.has_work():
        events += [e for e in engine.step() if e.seq is seq]
    assert other.finish_reason == "length"
    ids = seq.prompt_ids + seq.output_ids
    with torch.no_grad():
        logits, _ = shiftable(torch.tensor([ids]), routing)
    expected = logits[0].float().log_softmax(-1)
    assert seq.prompt_logprobs[0] is None and len(seq.prompt_logprobs) == len(seq.prompt_ids)
    scores = seq.prompt_logprobs[1:] + [e.logprob for e in events]
    assert [s.token_id for s in scores] == ids[1:]
    for p, score in enumerate(scores):  # position p predicts token p + 1
        assert score.logprob == pytest.approx(expected[p, ids[p + 1]].item(), abs=1e-4)
        top = expected[p].topk(3)
        assert [t for t, _ in score.top] == top.indices.tolist()
        assert [v for _, v in score.top] == pytest.approx(top.values.tolist(), abs=1e-4)
    # greedy: each generated token is the most likely one, with its own log-probability
    assert all(e.logprob.top[0] == (e.token_id, e.logprob.logprob) for e in events)


def test_a_prompt_scored_with_no_new_tokens_ends_after_its_prefill(shiftable, tokenizer):
    engine = Engine(shiftable, tokenizer)
    params = SamplingParams(max_new_tokens=0, temperature=0, prompt_logprobs=True)
    seq = engine.submit("the list of numpy", params)
    events = engine.step()
    assert [(e.token_id, e.text, e.finish_reason) for e in events] == [(None, "", "length")]
    assert not seq.output_ids and not engine.has_work()
    assert len(seq.prompt_logprobs) == len(seq.prompt_ids)
    assert all(s.top == () for s in seq.prompt_logprobs[1:])  # no alternatives asked for
    with pytest.raises(ValueError, match="only when the prompt is scored"):
        engine.submit("the list", replace(params, prompt_logprobs=False))


def test_a_versions_own_stop_tokens_end_its_generations(shiftable, tokenizer) -> None:
    """An imported model stops at its own end token (an instruct model's `<|im_end|>`), not
    ours: whatever token the version names ends a greedy generation where it comes, with
    finish reason "eos"; `ignore_eos` goes past it."""
    params = SamplingParams(max_new_tokens=6, temperature=0)
    (free,) = complete(Engine(shiftable, tokenizer, max_batch=2), ["the list of"], params)
    assert len(free.output_ids) == 6
    stop = tokenizer.id_to_token(free.output_ids[2])
    engine = Engine(shiftable, tokenizer, max_batch=2, stop_tokens=(stop,))
    (stopped,) = complete(engine, ["the list of"], params)
    first = free.output_ids.index(free.output_ids[2])  # where that token first comes
    assert stopped.output_ids == free.output_ids[: first + 1]
    assert stopped.finish_reason == "eos"
    (past,) = complete(engine, ["the list of"], replace(params, ignore_eos=True))
    assert past.output_ids == free.output_ids


def test_a_bfloat16_model_decodes_what_float32_does_within_its_precision(shiftable) -> None:
    """The inference server's weights and KV cache are bfloat16 on a GPU: every path of a
    decode step runs in it (here on the CPU, PyTorch's), with logits close to float32's."""
    half = copy.deepcopy(shiftable).to(torch.bfloat16)
    idx = torch.randint(
        0, shiftable.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0)
    )
    routes = RouteTable.for_batch(shiftable.experts, SOFT, 2, idx.device)
    with torch.no_grad():
        outs = []
        for model in (shiftable, half):
            cache = model.new_cache(2)
            assert cache.k[0].dtype == model.wte.weight.dtype
            model.prefill(cache, torch.arange(2), idx[:, :8], torch.tensor([8, 8]), routes)
            steps = [model.decode(cache, idx[:, t], routes)[0].float() for t in range(8, 12)]
            outs.append(torch.stack(steps))
    full, bf16 = outs
    assert (bf16 - full).abs().max() < 0.05 * full.abs().max()
    assert (bf16.argmax(-1) == full.argmax(-1)).float().mean() > 0.9


def _scripted(shiftable, tokenizer, look_ahead: bool, stop: str) -> tuple[list, dict, Engine]:
    """Requests of every kind joining, leaving and cancelled while a batch decodes."""
    engine = Engine(shiftable, tokenizer, max_batch=3, look_ahead=look_ahead)
    sampled = SamplingParams(
        max_new_tokens=9, temperature=0.9, top_k=20, top_p=0.9, seed=7, ignore_eos=True
    )
    plan = {
        0: [
            ("the list of", GREEDY),
            ("numpy array", sampled),
            ("tensor", replace(GREEDY, max_new_tokens=1)),
        ],
        2: [
            ("open the file", replace(GREEDY, stop=(stop,))),
            ("array mean", replace(sampled, seed=3, max_new_tokens=2)),
            ("the list", replace(GREEDY, routing=Routing(force=("ds",)))),
        ],
        5: [
            ("gradient", replace(GREEDY, logprobs=2, max_new_tokens=5)),
            ("x", replace(GREEDY, routing=Routing(exclude=("dl",)), max_new_tokens=6)),
            ("y", replace(sampled, routing=Routing(mode="top1"), seed=11)),
        ],
    }
    seqs, events = [], {}
    for step in range(200):
        seqs += [engine.submit(p, params) for p, params in plan.get(step, [])]
        if step == 7 and seqs[1].finish_reason is None:
            engine.cancel(seqs[1])
        for e in engine.step():
            events.setdefault(e.seq.id, []).append((e.token_id, e.text, e.finish_reason, e.logprob))
        if step > max(plan) and not engine.has_work():
            break
    return seqs, events, engine


def test_steps_launched_ahead_decode_what_steps_launched_in_turn_do(shiftable, tokenizer):
    """The next decode step launched before the host reads this one's tokens (what a GPU
    overlaps) changes nothing a request sees: tokens, text, how each ended, log-probabilities
    and gate weights, as requests join, end on a stop string or their length, and are
    cancelled."""
    free = complete(Engine(shiftable, tokenizer, max_batch=1), ["open the file"], GREEDY)[0]
    stop = re.findall(r"[a-z]{2,}", free.text)[0][:2]  # complete text, ended by a stop
    (before, seen, _), (ahead, seen_ahead, engine) = (
        _scripted(shiftable, tokenizer, flag, stop) for flag in (False, True)
    )
    assert engine.steps_ahead > 0 and not engine.active and engine._ahead is None
    ended = [s.finish_reason for s in before]
    assert ended[:5] == ["length", "cancelled", "length", "stop", "length"]
    assert seen_ahead == seen  # each request's events, log-probabilities included
    assert any(e[3] is not None for stream in seen.values() for e in stream)
    for a, b in zip(before, ahead, strict=True):
        assert (a.output_ids, a.text, a.finish_reason) == (b.output_ids, b.text, b.finish_reason)
        torch.testing.assert_close(a.gate_mean, b.gate_mean, rtol=0, atol=1e-6)


def test_a_sequence_that_ends_or_is_cancelled_with_a_step_ahead_is_cut_there(shiftable, tokenizer):
    """A full batch launches every step ahead: a row's stop string, read a step late, and a
    cancellation between steps end that row where they would have, and the rows moved into
    its slot decode on unharmed."""
    free = complete(Engine(shiftable, tokenizer, max_batch=1), ["open the file"], GREEDY)[0]
    stop = re.findall(r"[a-z]{2,}", free.text)[0][:2]
    sampled = replace(GREEDY, temperature=0.8, top_p=0.9, seed=5)
    asks = [("open the file", replace(GREEDY, stop=(stop,))), ("the list of", GREEDY)]
    asks += [("numpy array", sampled), ("tensor", replace(sampled, seed=6))]
    runs = []
    for look_ahead in (False, True):
        engine = Engine(shiftable, tokenizer, max_batch=4, look_ahead=look_ahead)
        seqs = [engine.submit(p, params) for p, params in asks]
        for _ in range(4):
            engine.step()
        engine.cancel(seqs[1])
        while engine.has_work():
            engine.step()
        runs.append((seqs, engine.steps_ahead))
    (before, _), (ahead, steps_ahead) = runs
    assert [s.finish_reason for s in ahead] == ["stop", "cancelled", "length", "length"]
    # every decode step but the last, and the one after each row leaves (the batch changed)
    assert steps_ahead == GREEDY.max_new_tokens - 1 - 1 - 2
    for a, b in zip(before, ahead, strict=True):
        assert (a.output_ids, a.text, a.finish_reason) == (b.output_ids, b.text, b.finish_reason)
        torch.testing.assert_close(a.gate_mean, b.gate_mean, rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_steps_launched_ahead_on_a_gpu_decode_what_steps_launched_in_turn_do(shiftable, tokenizer):
    """On a GPU (graphs, a pinned copy to the host and an event per step), the same script of
    requests as on the CPU gives the same events with and without steps launched ahead."""
    model = shiftable.to("cuda")
    free = complete(Engine(model, tokenizer, max_batch=1), ["open the file"], GREEDY)[0]
    stop = re.findall(r"[a-z]{2,}", free.text)[0][:2]
    (before, seen, _), (ahead, seen_ahead, engine) = (
        _scripted(model, tokenizer, flag, stop) for flag in (False, True)
    )
    assert engine.steps_ahead > 0 and engine.graphs is not None and engine.graphs.replays > 0
    assert seen_ahead == seen
    assert [s.output_ids for s in ahead] == [s.output_ids for s in before]
