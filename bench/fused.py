"""What the decode step's fused kernels and its steps launched ahead each bring, on one GPU.

    python -m bench.fused [--home HOME] [--json]

The model is HOME's current version (an imported SmolLM2, say) in the serving dtype, or,
without HOME, a model of SmolLM2-135M's shape with random weights: a step's time does not
depend on what its weights are. Three tables, each thing measured with the fused kernels
off and on in the same run (`fused.enabled`):

- **products**: each of the first layer's four products with what rides in it (the norm
  before, the activation and the residual add after), alone, as PyTorch's operations and as
  one fused kernel, at 1, 4 and 16 rows; microseconds a call, from a CUDA graph of
  `CALLS` calls replayed;
- **replay**: one decode step's CUDA graph as the engine captures it, at batch 1, 4, 16 and
  64, every row at position `SPAN`; milliseconds a replay;
- **engine**: tokens/s of the serving engine, `PROMPT` tokens of prompt and `NEW` new tokens
  a row, greedy, at batch 1, 16 and 64: plain, fused kernels, steps launched ahead, both;
  the best of three runs.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers

from shiftable_lib import fused, jobs
from shiftable_lib.checkpoint import serving_dtype
from shiftable_lib.config import Settings
from shiftable_lib.errors import ShiftableError
from shiftable_lib.generate import DecodeGraphs, Engine
from shiftable_lib.model import ModelConfig, ShiftableLM
from shiftable_lib.sampling import SamplingParams

# SmolLM2-135M's shape (its config.json)
SMOLLM2 = ModelConfig(
    vocab_size=49152,
    context=2048,
    n_layer=30,
    n_head=9,
    n_kv_head=3,
    d_model=576,
    d_ff=1536,
    norm="rmsnorm",
    positions="rope",
    rope_theta=1e5,
    mlp="swiglu",
    tied=True,
)
CALLS = 20  # product calls in one captured graph
SPAN = 128  # the cached position every replayed row decodes at
PROMPT, NEW = 32, 128
PRODUCT_ROWS = (1, 4, 16)
REPLAY_BATCHES = (1, 4, 16, 64)
ENGINE_BATCHES = (1, 16, 64)


def graph_us(fn: Callable[[], object], calls: int = CALLS, replays: int = 50) -> float:
    """Microseconds a call of fn, from a CUDA graph of `calls` calls, replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # compiles Triton's kernels, initialises cuBLAS
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (replays * calls)


def products(model: ShiftableLM, rows: int) -> dict[str, tuple[float, float]]:
    """(PyTorch, fused) microseconds of the first layer's four products at `rows` rows."""
    block, cfg = model.blocks[0], model.cfg
    dev, dtype = model.wte.weight.device, model.wte.weight.dtype
    x = torch.randn(rows, cfg.d_model, device=dev, dtype=dtype)
    hidden = torch.randn(rows, cfg.hidden, device=dev, dtype=dtype)
    qkv_w, qkv_b = block.attn.projection([block.attn.experts["general"]], "qkv")
    proj_w, proj_b = block.attn.projection([block.attn.experts["general"]], "proj")
    proj_b = None if proj_b is None else proj_b[0]
    mlp = block.mlp
    act = "swiglu" if mlp.swiglu else "gelu_tanh"

    def activation(h: torch.Tensor) -> torch.Tensor:
        if mlp.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        return F.gelu(h, approximate="tanh")

    cases: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
        "norm + qkv": (
            lambda: F.linear(block.ln_1(x), qkv_w, qkv_b),
            lambda: fused.linear(x, qkv_w, qkv_b, norm=block.ln_1),
        ),
        f"norm + up + {act}": (
            lambda: activation(F.linear(block.ln_2(x), mlp.fc.weight, mlp.fc.bias)),
            lambda: fused.linear(x, mlp.fc.weight, mlp.fc.bias, norm=block.ln_2, act=act),
        ),
        "output projection + residual": (
            lambda: x + F.linear(x, proj_w, proj_b),
            lambda: fused.linear(x, proj_w, proj_b, residual=x),
        ),
        "down projection + residual": (
            lambda: x + F.linear(hidden, mlp.proj.weight, mlp.proj.bias),
            lambda: fused.linear(hidden, mlp.proj.weight, mlp.proj.bias, residual=x),
        ),
    }
    return {name: (graph_us(plain), graph_us(one)) for name, (plain, one) in cases.items()}


def replay_ms(model: ShiftableLM, batches: tuple[int, ...], reps: int = 200) -> dict[int, float]:
    """Milliseconds a replay of the engine's decode graph, per batch, every row at `SPAN`."""
    cache = model.new_cache(max(batches))
    graphs = DecodeGraphs(model, cache, max(batches))
    out = {}
    for batch in batches:
        tokens = torch.ones(batch, dtype=torch.long, device=cache.lengths.device)
        for _ in range(3):
            cache.lengths.fill_(SPAN - 1)
            graphs.decode(tokens, SPAN)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            cache.lengths.fill_(SPAN - 1)
            graphs.decode(tokens, SPAN)
        end.record()
        torch.cuda.synchronize()
        out[batch] = start.elapsed_time(end) / reps
    return out


def engine_rate(
    model: ShiftableLM, tok: Tokenizer, batch: int, look_ahead: bool, prompts: list[list[int]]
) -> float:
    """Best tokens/s of three runs of `batch` greedy rows through the serving engine."""
    engine = Engine(model, tok, max_batch=batch, look_ahead=look_ahead)
    params = SamplingParams(max_new_tokens=NEW, temperature=0, ignore_eos=True)
    best = 0.0
    for _ in range(3):
        seqs = [engine.submit(p, params) for p in prompts[:batch]]
        torch.cuda.synchronize()
        start = time.perf_counter()
        while engine.has_work():
            engine.step()
        torch.cuda.synchronize()
        best = max(best, sum(len(s.output_ids) for s in seqs) / (time.perf_counter() - start))
    return best


def word_tokenizer(vocab: int) -> Tokenizer:
    """A tokenizer of `vocab` words, for a model of random weights."""
    words = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def load(home: Path | None) -> tuple[ShiftableLM, Tokenizer, str]:
    device = torch.device("cuda")
    dtype = serving_dtype("auto", device)
    if home is None:
        torch.manual_seed(0)
        model = ShiftableLM(SMOLLM2)
        return (
            model.to(device, dtype).eval(),
            word_tokenizer(SMOLLM2.vocab_size),
            "SmolLM2-135M shape, random weights",
        )
    version = jobs.load_current(Settings(home=home), device)
    return version.model.to(dtype), version.tokenizer, f"{home.name}'s {version.id}"


def measure(home: Path | None = None) -> dict:
    if not (torch.cuda.is_available() and fused.available()):
        raise ShiftableError("bench.fused needs a CUDA GPU and Triton")
    model, tok, what = load(home)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, model.cfg.vocab_size, (max(ENGINE_BATCHES), PROMPT), generator=gen)
    result: dict = {"model": what, "device": torch.cuda.get_device_name(), "products": {}}
    try:
        with torch.inference_mode():
            for rows in PRODUCT_ROWS:
                result["products"][rows] = products(model, rows)
            replay = {}
            for on in (False, True):
                fused.enabled = on
                replay[on] = replay_ms(model, REPLAY_BATCHES)
            result["replay"] = {b: (replay[False][b], replay[True][b]) for b in REPLAY_BATCHES}
        result["engine"] = {}
        for batch in ENGINE_BATCHES:
            row = []
            for on, ahead in ((False, False), (True, False), (False, True), (True, True)):
                fused.enabled = on
                row.append(engine_rate(model, tok, batch, ahead, prompts.tolist()))
            result["engine"][batch] = row
    finally:
        fused.enabled = True
    return result


def print_tables(result: dict) -> str:
    lines = [f"{result['model']} on {result['device']}", ""]
    lines += ["| product (µs a call) | rows | PyTorch | fused | ratio |", "|---|---|---|---|---|"]
    for rows, cases in result["products"].items():
        for name, (plain, one) in cases.items():
            lines.append(f"| {name} | {rows} | {plain:.2f} | {one:.2f} | {plain / one:.2f}x |")
    lines += ["", "| decode graph replay (ms) | unfused | fused | ratio |", "|---|---|---|---|"]
    for batch, (plain, one) in result["replay"].items():
        lines.append(f"| batch {batch} | {plain:.3f} | {one:.3f} | {plain / one:.2f}x |")
    lines += [
        "",
        "| engine (tokens/s) | plain | fused | steps ahead | both | both / plain |",
        "|---|---|---|---|---|---|",
    ]
    for batch, (plain, one, ahead, both) in result["engine"].items():
        lines.append(
            f"| batch {batch} | {plain:,.0f} | {one:,.0f} | {ahead:,.0f} | {both:,.0f} "
            f"| {both / plain:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fused", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--home", type=Path, help="time this home's current version")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    try:
        result = measure(args.home)
    except ShiftableError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(json.dumps(result, indent=2) if args.json else print_tables(result))


if __name__ == "__main__":
    main()
