"""How long one longest-possible prompt stalls the streams decoding beside it.

7 streams decode when a prompt of MAX_PROMPT_CHARS characters (left-truncated to the context)
joins them. Two measurements:

- the library's engine alone, with the prompt already tokenised: the ordinary step time, and
  the longest step while the prompt is prefilled, whole in one step or a chunk of
  `PREFILL_CHUNK` tokens per step; and how long tokenising it takes;
- the inference worker, as it serves (tokenising apart, prefilling in chunks): the gaps between
  the running streams' tokens, ordinarily and in the 0.5 s after the long prompt arrives.

`--context` gives the model a longer context than its profile's, as a pretrained base has.

    python -m bench.prefill_stall --profile gpu --device cuda [--context 4096]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import torch
from tokenizers import Tokenizer

from bench.decode import _bench_tokenizer
from services.inference.core import InferenceCore
from shiftable_lib import checkpoint
from shiftable_lib.config import Profile, available_cpus, get_profile
from shiftable_lib.generate import PREFILL_CHUNK, Engine
from shiftable_lib.model import ModelConfig, ShiftableLM
from shiftable_lib.sampling import MAX_PROMPT_CHARS, SamplingParams
from shiftable_lib.tokenizer import encode_apart
from shiftable_lib.train import pick_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model(profile: str, context: int = 0) -> tuple[Profile, Tokenizer, ShiftableLM]:
    """The profile's shape (with `context` if given) and two specialists, untrained: timing
    needs no trained weights."""
    torch.manual_seed(0)
    p = get_profile(profile)
    p = dataclasses.replace(p, context=context) if context else p
    tok = _bench_tokenizer(p.vocab_size)
    cfg = ModelConfig(tok.get_vocab_size(), p.context, p.n_layer, p.n_head, p.d_model)
    model = ShiftableLM(cfg)
    model.add_specialist("a")
    model.add_specialist("b")
    return p, tok, model


def _timed_step(engine: Engine, dev: torch.device) -> float:
    _sync(dev)
    start = time.perf_counter()
    engine.step()
    _sync(dev)
    return time.perf_counter() - start


def measure(profile: str, device: str, context: int = 0, rounds: int = 5) -> dict:
    dev = pick_device(device)
    p, tok, model = _model(profile, context)
    model = model.to(dev).eval()
    long_prompt = _long_prompt(tok)
    tokenise = []
    for _ in range(rounds):
        start = time.perf_counter()
        ids = encode_apart(tok, long_prompt)
        tokenise.append(time.perf_counter() - start)
    result = {"profile": profile, "device": str(dev), "context": p.context}
    result["tokenise_ms"] = 1e3 * statistics.median(tokenise)
    for name, chunk in [("whole", p.context), ("chunked", PREFILL_CHUNK)]:
        engine = Engine(model, tok, max_batch=8, prefill_chunk=chunk)
        steady, prefilling = [], []
        for _ in range(rounds):
            runners = [
                engine.submit("the", SamplingParams(max_new_tokens=p.context // 2, ignore_eos=True))
                for _ in range(7)
            ]
            for _ in range(5):  # admitted and warm
                engine.step()
            steady += [_timed_step(engine, dev) for _ in range(10)]
            seq = engine.submit(ids, SamplingParams(max_new_tokens=8, ignore_eos=True))
            while not seq.output_ids:
                prefilling.append(_timed_step(engine, dev))
            result["prompt_tokens"] = len(seq.prompt_ids)
            for s in [*runners, seq]:
                engine.cancel(s)
        result[f"{name}_steady_ms"] = 1e3 * statistics.median(steady)
        result[f"{name}_worst_ms"] = 1e3 * max(prefilling)
    return result


async def _worker_gaps(profile: str, device: str, context: int = 0, rounds: int = 5) -> dict:
    """The worker's token gaps: median while 7 streams decode, and the longest in the 0.5 s
    after a longest prompt arrives (over `rounds` arrivals)."""
    p, tok, model = _model(profile, context)
    with tempfile.TemporaryDirectory() as home:
        models = Path(home)
        version = checkpoint.save_version(models, model, tok, p, {})
        dev = str(pick_device(device))
        core = InferenceCore(models, dev, max_batch=8, threads=max(1, available_cpus() - 1))
        try:
            await core.load(version)
            arrivals: list[float] = []
            gaps_before: list[float] = []
            gaps_after: list[float] = []
            long_prompt = _long_prompt(tok)

            async def runner() -> None:
                params = SamplingParams(max_new_tokens=p.context // 2, ignore_eos=True)
                while True:
                    last = None
                    async for _ in core.generate("the", params):
                        now = time.perf_counter()
                        if last is not None:
                            after = [a for a in arrivals if a <= now <= a + 0.5]
                            (gaps_after if after else gaps_before).append(now - last)
                        last = now

            runners = [asyncio.create_task(runner()) for _ in range(7)]
            await asyncio.sleep(1.0)
            for _ in range(rounds):
                arrivals.append(time.perf_counter())
                await _drain(core.generate(long_prompt, SamplingParams(max_new_tokens=8)))
                await asyncio.sleep(1.0)
            for task in runners:
                task.cancel()
            await asyncio.gather(*runners, return_exceptions=True)
        finally:
            await asyncio.to_thread(core.close)
    return {
        "device": dev,
        "steady_gap_ms": 1e3 * statistics.median(gaps_before),
        "worst_gap_ms": 1e3 * max(gaps_after),
    }


async def _drain(stream: AsyncIterator) -> None:
    async for _ in stream:
        pass


def _long_prompt(tok: Tokenizer) -> str:
    words = [w for w in tok.get_vocab() if w.isalpha()]
    rng = random.Random(0)
    return " ".join(rng.choice(words) for _ in range(MAX_PROMPT_CHARS))[:MAX_PROMPT_CHARS]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--context", type=int, default=0, help="instead of the profile's")
    args = parser.parse_args(argv)
    r = measure(args.profile, args.device, args.context)
    w = asyncio.run(_worker_gaps(args.profile, args.device, args.context))
    print(
        "| profile | device | context | prompt tokens kept | tokenising | engine step, steady "
        "| longest step prefilling it whole | the same, a chunk per step "
        "| worker token gap, steady | worker's longest gap after it arrives |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {r['profile']} | {r['device']} | {r['context']} | {r['prompt_tokens']} "
        f"| {r['tokenise_ms']:.1f} ms | {r['whole_steady_ms']:.1f} ms "
        f"| {r['whole_worst_ms']:.1f} ms | {r['chunked_worst_ms']:.1f} ms "
        f"| {w['steady_gap_ms']:.1f} ms "
        f"| {w['worst_gap_ms']:.1f} ms |"
    )


if __name__ == "__main__":
    main()
