"""`sma bench`: our decode and training speed against Hugging Face GPT-2 of the same size.

    sma bench [--profile cpu] [--quick] [--json]        # or: python -m bench.decode

Both models get the profile's dimensions and random weights (speed does not depend on what
they learned), run on the same device in the same process, one after the other, with the same
thread count. Reported as tokens/s and the ratio ours / reference. Our decode goes through the
serving engine (continuous-batching step, sampling, streaming detokenisation); GPT-2's through
`generate` with its KV cache, which returns ids only — so the comparison favours the reference.
The reference needs `transformers` (`pip install 'shiftable[bench]'`); `reference=False`
(`--no-reference`) runs our half alone, so that it can be checked where transformers is not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from shiftable_lib.config import PROFILES, get_profile
from shiftable_lib.errors import ShiftableError
from shiftable_lib.generate import Engine
from shiftable_lib.model import ModelConfig, ShiftableLM
from shiftable_lib.sampling import SamplingParams
from shiftable_lib.tokenizer import train_tokenizer
from shiftable_lib.train import make_optimizer, pick_device

PROMPT_TOKENS = 32


def _timed_pair(ours: Callable[[], int], reference: Callable[[], int] | None, repeats: int):
    """Median tokens/s of each (None for an absent reference), after a warm-up of each; the two
    alternate, so that whatever else the machine does in the meantime falls on both alike."""
    fns = [ours] if reference is None else [ours, reference]
    for fn in fns:
        fn()
    rates: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, rates, strict=True):
            start = time.perf_counter()
            tokens = fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            out.append(tokens / (time.perf_counter() - start))
    medians = [statistics.median(r) for r in rates]
    return medians[0], (medians[1] if reference is not None else None)


def _bench_tokenizer(vocab_size: int):
    from pydoc_data.topics import topics  # stdlib text: offline and the same everywhere

    return train_tokenizer([topics[k] for k in sorted(topics)], vocab_size)


def _gpt2(cfg: ModelConfig, device):
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:  # an optional extra: say which, not a traceback
        raise ShiftableError(
            "the GPT-2 reference needs transformers: pip install 'shiftable[bench]'"
        ) from None

    hf = GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.context,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        loss_type="ForCausalLMLoss",
    )
    return GPT2LMHeadModel(hf).to(device).eval()


def ours_decode(
    model: ShiftableLM, tok, batch: int, new_tokens: int, prompts, cuda_graphs: bool = True
) -> Callable:
    engine = Engine(model, tok, max_batch=batch, cuda_graphs=cuda_graphs)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)

    def run() -> int:
        seqs = [engine.submit(p, params) for p in prompts[:batch]]
        while engine.has_work():
            engine.step()
        return sum(len(s.output_ids) for s in seqs)

    return run


def gpt2_decode(model, batch: int, new_tokens: int, prompts, device) -> Callable:
    ids = torch.tensor(prompts[:batch], device=device)
    mask = torch.ones_like(ids)

    @torch.inference_mode()
    def run() -> int:
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
        )
        return (out.shape[1] - ids.shape[1]) * batch

    return run


def _train_step(params, loss_fn: Callable[[], torch.Tensor], device, steps: int) -> Callable:
    opt = make_optimizer(params, 1e-4, 0.1, device)
    autocast = torch.device(device).type == "cuda"

    def run() -> int:
        tokens = 0
        for _ in range(steps):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                loss, n = loss_fn()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens += n
        return tokens

    return run


def run_bench(
    profile: str = "cpu",
    quick: bool = False,
    device: str = "auto",
    cuda_graphs: bool = True,
    reference: bool = True,
) -> dict:
    """Ours vs GPT-2, side by side; `cuda_graphs` (on a GPU) as the inference server has it.

    Without `reference`, GPT-2 is neither built nor timed: each row's `reference` and `ratio`
    are None.
    """
    torch.manual_seed(0)
    dev = pick_device(device)
    p = get_profile(profile)
    tok = _bench_tokenizer(p.vocab_size)
    cfg = ModelConfig(tok.get_vocab_size(), p.context, p.n_layer, p.n_head, p.d_model)
    new_tokens = 16 if quick else min(128, p.context - PROMPT_TOKENS)
    repeats, train_steps = (1, 2) if quick else (7, 5)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, cfg.vocab_size, (16, PROMPT_TOKENS), generator=gen).tolist()

    ours = ShiftableLM(cfg).to(dev).eval()
    shiftable = ShiftableLM(cfg).to(dev).eval()
    shiftable.add_specialist("a")
    shiftable.add_specialist("b")
    shiftable.wake_specialists(["a", "b"])  # live gate: every branch is computed
    gpt2 = _gpt2(cfg, dev) if reference else None

    rows = []

    def reference_decode(batch: int) -> Callable | None:
        return None if gpt2 is None else gpt2_decode(gpt2, batch, new_tokens, prompts, dev)

    def row(name: str, ours_fn: Callable, ref_fn: Callable | None) -> None:
        ours_rate, ref_rate = _timed_pair(ours_fn, ref_fn, repeats)
        ratio = None if ref_rate is None else ours_rate / ref_rate
        rows.append({"name": name, "ours": ours_rate, "reference": ref_rate, "ratio": ratio})

    for batch in (1, 16):
        row(
            f"decode tokens/s, generalist, batch {batch}",
            ours_decode(ours, tok, batch, new_tokens, prompts, cuda_graphs),
            reference_decode(batch),
        )
    row(
        "decode tokens/s, shiftable 2 specialists, batch 1",
        ours_decode(shiftable, tok, 1, new_tokens, prompts, cuda_graphs),
        reference_decode(1),
    )

    batch = torch.randint(0, cfg.vocab_size, (p.batch_size, p.context + 1), generator=gen).to(dev)
    ours.train()
    gpt2_train = None
    if gpt2 is not None:
        gpt2.train()
        gpt2_train = _train_step(
            list(gpt2.parameters()),
            lambda: (
                gpt2(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss,
                batch[:, 1:].numel(),
            ),
            dev,
            train_steps,
        )
    row(
        f"training tokens/s, generalist, batch {p.batch_size}x{p.context}",
        _train_step(
            list(ours.parameters()),
            lambda: (ours.loss(batch[:, :-1], batch[:, 1:]), batch[:, 1:].numel()),
            dev,
            train_steps,
        ),
        gpt2_train,
    )
    return {
        "machine": _machine(dev, cuda_graphs),
        "profile": profile,
        "new_tokens": new_tokens,
        "rows": rows,
    }


def _machine(dev: torch.device, cuda_graphs: bool) -> dict:
    info = {
        "device": str(dev),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
        info["decode"] = "CUDA graphs" if cuda_graphs else "eager"
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def print_table(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"machine: {m.get('gpu', m['cpu'])}, {m['cores']} cores, {m['torch_threads']} torch "
        f"threads, torch {m['torch']}, transformers {m.get('transformers', '?')}",
        f"profile {result['profile']}, {result['new_tokens']} new tokens per sequence"
        + (f", our decode: {m['decode']}" if "decode" in m else ""),
        "",
        f"| {'benchmark':<52} | {'ours':>10} | {'GPT-2 (HF)':>10} | {'ratio':>6} |",
        f"|{'-' * 54}|{'-' * 12}|{'-' * 12}|{'-' * 8}|",
    ]
    for r in result["rows"]:
        ref = "-" if r["reference"] is None else f"{r['reference']:,.0f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(f"| {r['name']:<52} | {r['ours']:>10,.0f} | {ref:>10} | {ratio:>6} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu", choices=list(PROFILES))
    parser.add_argument("--quick", action="store_true", help="fewer tokens (smoke test)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-reference", action="store_true", help="ours only, no GPT-2")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run_bench(args.profile, args.quick, args.device, reference=not args.no_reference)
    print(json.dumps(result, indent=2) if args.json else print_table(result))


if __name__ == "__main__":
    main()
