"""Decode speed of two versions of `shiftable_lib/model.py`, in one process, same weights.

Separate processes on a VM whose speed drifts cannot resolve a few percent; this alternates
the two in rounds and reports the median of the per-round ratios. The engine and everything
else are today's; only the model module differs. To compare against an earlier commit:

    git show COMMIT:shiftable_lib/model.py > /tmp/model_old.py
    .venv/bin/python scripts/ab_decode.py /tmp/model_old.py shiftable_lib/model.py \
        --home sma-home --batch 32 [--threads 1] [--rounds 12] [--tokens 128]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

from shiftable_lib import jobs
from shiftable_lib.config import Settings
from shiftable_lib.generate import Engine
from shiftable_lib.sampling import SamplingParams

PROMPT = "The list of files in the module"


def load_module(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        sys.exit(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    if not hasattr(module.KVCache, "position_major"):  # older: one layout, head-major
        module.KVCache.position_major = False
    return module


def steps_per_second(engine: Engine, batch: int, tokens: int) -> float:
    params = SamplingParams(max_new_tokens=tokens, temperature=0.0, ignore_eos=True)
    for _ in range(batch):
        engine.submit(PROMPT, params)
    engine.step()  # the prefill
    start, steps = time.perf_counter(), 0
    while engine.has_work():
        engine.step()
        steps += 1
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="the baseline model.py")
    parser.add_argument("b", type=Path, help="the model.py to compare with it")
    parser.add_argument("--home", type=Path, required=True, help="whose serving model to use")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    version = jobs.load_current(Settings(home=args.home.resolve()), "cpu")
    engines = {}
    for label, path in (("A", args.a), ("B", args.b)):
        model = load_module(path, f"ab_model_{label}").ShiftableLM(version.model.cfg)
        model.load_state_dict(version.model.state_dict())
        engines[label] = Engine(model.eval(), version.tokenizer, max(32, args.batch))
    rates: dict[str, list[float]] = {"A": [], "B": []}
    for round_ in range(args.rounds + 1):  # round 0 warms both up
        for label in "AB" if round_ % 2 else "BA":
            rate = steps_per_second(engines[label], args.batch, args.tokens)
            if round_:
                rates[label].append(rate)
    ratio = statistics.median(b / a for a, b in zip(rates["A"], rates["B"], strict=True))
    a, b = (statistics.median(rates[label]) * args.batch for label in "AB")
    print(
        f"batch {args.batch}, {args.threads} thread(s), {args.rounds} rounds: "
        f"A {a:.0f} tok/s, B {b:.0f} tok/s, B/A {ratio:.3f} (median of per-round ratios)"
    )


if __name__ == "__main__":
    main()
