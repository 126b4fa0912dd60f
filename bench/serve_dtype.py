"""Decode speed in float32 and in bfloat16 on this machine, by model size: where `auto` should
serve bfloat16 (`checkpoint.serving_dtype`, `CPU_BF16_MIN_BYTES`).

    python -m bench.serve_dtype [--device cpu] [--home HOME] [--threads N] [--json]

Each model (random weights of the shapes in `SHAPES`, and HOME's current version if given)
decodes greedy rows through the serving engine in both dtypes, the two alternating, at batch
1; median tokens/s of `REPEATS` runs after a warm-up. Both dtypes on one thread count: the
inference server's for float32 (`Settings.decode_threads`: every core but one), unless
`--threads` says otherwise (the server gives a version it serves in bfloat16 on the CPU every
core). With one thread, float32 decode attention is the compiled loop (`kernels.py`), which
bfloat16 does not have.
A decode step reads every weight once: past the caches it is bound by memory bandwidth, which
bfloat16 halves, where the processor computes in bfloat16 natively.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from bench.decode import _bench_tokenizer, _timed_pair, ours_decode
from shiftable_lib import checkpoint, jobs
from shiftable_lib.config import Settings
from shiftable_lib.model import ModelConfig, ShiftableLM

SHAPES = ((4, 128), (4, 256), (6, 384), (8, 512), (12, 768))  # (layers, width)
VOCAB, CONTEXT, PROMPT = 8192, 512, 32
REPEATS = 3


def rates(model: ShiftableLM, tok, device: torch.device, new_tokens: int) -> dict:
    """Tokens/s at batch 1 in float32 and bfloat16, alternating, and the model's size."""
    model = model.to(device, torch.float32).eval()
    size = checkpoint.weight_bytes(model)
    prompts = [list(range(10, 10 + PROMPT))]
    f32 = ours_decode(model, tok, 1, new_tokens, prompts)
    bf16 = ours_decode(copy.deepcopy(model).to(torch.bfloat16), tok, 1, new_tokens, prompts)
    fp, bf = _timed_pair(f32, bf16, REPEATS)
    assert bf is not None
    auto = checkpoint.serving_dtype("auto", device, size)
    return {"mib": size / 2**20, "float32": fp, "bfloat16": bf, "auto": str(auto).split(".")[-1]}


def measure(
    device_name: str = "cpu",
    home: Path | None = None,
    shapes: tuple[tuple[int, int], ...] = SHAPES,
    new_tokens: int = 48,
    threads: int = 0,
) -> dict:
    device = torch.device(device_name)
    torch.set_num_threads(threads or Settings().decode_threads())
    tok = _bench_tokenizer(VOCAB)
    rows = {}
    for layers, width in shapes:
        torch.manual_seed(0)
        cfg = ModelConfig(tok.get_vocab_size(), CONTEXT, layers, max(2, width // 64), width)
        rows[f"{layers} x {width}"] = rates(ShiftableLM(cfg), tok, device, new_tokens)
    if home is not None:
        version = jobs.load_current(Settings(home=home))
        rows[f"{home.name} {version.id}"] = rates(
            version.model, version.tokenizer, device, new_tokens
        )
    return {
        "device": device_name,
        "cpu_has_bf16": checkpoint.cpu_has_bf16(),
        "threads": torch.get_num_threads(),
        "models": rows,
    }


def print_table(result: dict) -> str:
    lines = [
        f"{result['device']}, {result['threads']} threads, bfloat16 instructions: "
        f"{'yes' if result['cpu_has_bf16'] else 'no'}",
        "",
        "| model | float32 weights | float32, tokens/s | bfloat16, tokens/s | ratio | auto |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in result["models"].items():
        lines.append(
            f"| {name} | {r['mib']:.0f} MiB | {r['float32']:.0f} | {r['bfloat16']:.0f} "
            f"| {r['bfloat16'] / r['float32']:.2f}x | {r['auto']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.serve_dtype", description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--home", type=Path, help="time this home's current version too")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (the server's)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    result = measure(args.device, args.home, threads=args.threads)
    print(json.dumps(result, indent=2) if args.json else print_table(result))


if __name__ == "__main__":
    main()
