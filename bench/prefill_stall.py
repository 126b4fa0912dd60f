"""How long one longest-possible prompt stalls the streams decoding beside it.

The decode loop tokenises and prefills a new request between two decode steps, so the streams
already running wait for both. This measures that wait at its worst: 7 streams decoding, then a
prompt of MAX_PROMPT_CHARS characters (left-truncated to the context) joins them. It reports the
ordinary step time and the step that admitted the long prompt, split into tokenising and the
step itself (prefill plus the decode of all eight).

    python -m bench.prefill_stall --profile cpu
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from bench.decode import _bench_tokenizer
from shiftable_lib.config import get_profile
from shiftable_lib.generate import Engine
from shiftable_lib.model import ModelConfig, ShiftableLM
from shiftable_lib.sampling import MAX_PROMPT_CHARS, SamplingParams
from shiftable_lib.train import pick_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(profile: str, device: str, rounds: int = 5) -> dict:
    torch.manual_seed(0)
    dev = pick_device(device)
    p = get_profile(profile)
    tok = _bench_tokenizer(p.vocab_size)
    cfg = ModelConfig(tok.get_vocab_size(), p.context, p.n_layer, p.n_head, p.d_model)
    model = ShiftableLM(cfg)
    model.add_specialist("a")
    model.add_specialist("b")
    model = model.to(dev).eval()
    engine = Engine(model, tok, max_batch=8)
    words = [w for w in tok.get_vocab() if w.isalpha()]
    rng = random.Random(0)
    long_prompt = " ".join(rng.choice(words) for _ in range(MAX_PROMPT_CHARS))[:MAX_PROMPT_CHARS]
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


if __name__ == "__main__":
    main()
