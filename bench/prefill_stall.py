"""How long one longest-possible prompt stalls the streams decoding beside it.

Two measurements, each with 7 streams decoding when a prompt of MAX_PROMPT_CHARS characters
(left-truncated to the context) joins them:

- the library's engine alone, tokenising in the loop: the ordinary step time, and the step that
  admits the long prompt split into tokenising and the step itself (prefill plus the decode of
  all eight);
- the inference worker, as it serves (a long prompt is tokenised in a helper thread): the gaps
  between the running streams' tokens, ordinarily and around the long prompt's arrival.

    python -m bench.prefill_stall --profile cpu
"""

from __future__ import annotations

import argparse
import asyncio
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
from shiftable_lib.generate import Engine
from shiftable_lib.model import ModelConfig, ShiftableLM
from shiftable_lib.sampling import MAX_PROMPT_CHARS, SamplingParams
from shiftable_lib.train import pick_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model(profile: str) -> tuple[Profile, Tokenizer, ShiftableLM]:
    """The profile's shape with two specialists, untrained: timing needs no trained weights."""
    torch.manual_seed(0)
    p = get_profile(profile)
    tok = _bench_tokenizer(p.vocab_size)
    cfg = ModelConfig(tok.get_vocab_size(), p.context, p.n_layer, p.n_head, p.d_model)
    model = ShiftableLM(cfg)
    model.add_specialist("a")
    model.add_specialist("b")
    return p, tok, model


def measure(profile: str, device: str, rounds: int = 5) -> dict:
    dev = pick_device(device)
    p, tok, model = _model(profile)
    model = model.to(dev).eval()
    engine = Engine(model, tok, max_batch=8)
    long_prompt = _long_prompt(tok)
    steady, tokenise, admit = [], [], []
    for _ in range(rounds):
        long_params = SamplingParams(max_new_tokens=8, ignore_eos=True)
        runners = [
            engine.submit("the", SamplingParams(max_new_tokens=p.context // 2, ignore_eos=True))
            for _ in range(7)
        ]
        for _ in range(5):  # admitted and warm
            engine.step()
        for _ in range(10):
            _sync(dev)
            start = time.perf_counter()
            engine.step()
            _sync(dev)
            steady.append(time.perf_counter() - start)
        start = time.perf_counter()
        seq = engine.submit(long_prompt, long_params)  # tokenises here, in the decode loop
        tokenised = time.perf_counter()
        engine.step()  # prefills it, and decodes everyone
        _sync(dev)
        tokenise.append(tokenised - start)
        admit.append(time.perf_counter() - tokenised)
        for s in [*runners, seq]:
            engine.cancel(s)
    return {
        "profile": profile,
        "device": str(dev),
        "context": p.context,
        "prompt_tokens": len(seq.prompt_ids),
        "steady_step_ms": 1e3 * statistics.median(steady),
        "tokenise_ms": 1e3 * statistics.median(tokenise),
        "admit_step_ms": 1e3 * statistics.median(admit),
        "stall_ms": 1e3 * max(t + a for t, a in zip(tokenise, admit, strict=True)),
    }


async def _worker_gaps(profile: str, device: str, rounds: int = 5) -> dict:
    """The worker's token gaps: median while 7 streams decode, and the longest in the 0.5 s
    after a longest prompt arrives (over `rounds` arrivals)."""
    p, tok, model = _model(profile)
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
    args = parser.parse_args(argv)
    r = measure(args.profile, args.device)
    print(
        "| profile | device | context | prompt tokens kept | steady step | tokenise "
        "100,000 chars | admitting step | worst stall |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {r['profile']} | {r['device']} | {r['context']} | {r['prompt_tokens']} "
        f"| {r['steady_step_ms']:.1f} ms | {r['tokenise_ms']:.1f} ms | {r['admit_step_ms']:.1f} ms "
        f"| {r['stall_ms']:.1f} ms |"
    )
    w = asyncio.run(_worker_gaps(args.profile, args.device))
    print()
    print("| profile | worker device | token gap, steady (median) | longest gap after it arrives |")
    print("|---|---|---|---|")
    print(
        f"| {args.profile} | {w['device']} | {w['steady_gap_ms']:.1f} ms "
        f"| {w['worst_gap_ms']:.1f} ms |"
    )


if __name__ == "__main__":
    main()
