"""A pretrained generalist, imported, against `transformers` running the same checkpoint, in
one run: held-out perplexity and bits per byte per demo domain, and decode speed.

    python -m bench.pretrained CHECKPOINT --home HOME [--device cuda] [--json]

CHECKPOINT is a Hugging Face directory or a GGUF file (`transformers` reads GGUF files too,
with `accelerate` installed). HOME's demo corpus is built if it has none; the checkpoint is
imported there (`sma import`) and becomes its current version.

- **Perplexity**: both models score the same windows of each domain's held-out split (`sma
  eval`'s choice of `--windows` evenly spaced windows of `--window` tokens), under the same autocast
  (bfloat16 on a GPU). Bits per byte: the windows' summed loss over the UTF-8 bytes they
  predict.
- **Decode**: our serving engine (the inference server's dtype, CUDA graphs on a GPU) against
  `transformers`' `generate` with its static cache in the same dtype, greedy, the same prompts,
  at batch 1, 16 and 64 (1 on a CPU); median tokens/s of alternating runs.
- **Growing** (`--grow`): the demo's specialists added one at a time on the base (`sma
  add-specialist`, with the `--profile`'s settings), each add timed; then each domain's
  held-out perplexity with them against the base's, the routing, and greedy completions of a
  few prompts by the base alone and by the model with its specialists.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from bench.decode import _timed_pair, ours_decode
from gateway.openai import render_chat
from gateway.schemas import ChatMessage
from shiftable_lib import checkpoint, jobs
from shiftable_lib.config import Settings
from shiftable_lib.corpus import GENERAL
from shiftable_lib.demo_corpus import DEMO_DOMAINS, build_demo_corpus
from shiftable_lib.errors import DriftTooLarge
from shiftable_lib.evaluate import held_out_windows, row_losses
from shiftable_lib.generate import Engine, complete
from shiftable_lib.sampling import Routing, SamplingParams, is_plain

WINDOWS = 32
# what the completions continue: raw text for a model without a chat template of its own, else
# a question each (an instruct model closes its turn at once after raw text)
PROMPTS = ("import numpy as np\n\n", "loss = criterion(output, target)\n", "The os module")
QUESTIONS = (
    "How do I compute the mean of each column of a numpy array?",
    "Write a PyTorch training step: forward, loss, backward and the optimizer.",
    "What does Python's os module do?",
)


def load_reference(path: Path, device: torch.device, dtype: torch.dtype):
    """The checkpoint as `transformers` loads it."""
    import transformers

    if path.is_dir():
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype
        )
    return model.to(device).eval()


def import_into(
    checkpoint_path: Path, home: Path, device_name: str, profile: str | None
) -> tuple[Settings, torch.device, jobs.Imported, checkpoint.ModelVersion]:
    """HOME's settings and device, the checkpoint imported there (its demo corpus built first
    if it has no general text), and that version loaded."""
    settings = Settings(home=home, device=device_name, **({"profile": profile} if profile else {}))
    device = jobs.configure_torch(settings)
    if not (settings.data_dir / GENERAL).is_dir():
        build_demo_corpus(settings.data_dir)
    imported = jobs.import_base(settings, checkpoint_path)
    version = checkpoint.load_version(settings.models_dir, imported.version, device)
    return settings, device, imported, version


def predicted_bytes(tok, rows: torch.Tensor) -> int:
    return sum(
        len(tok.decode(row[1:].tolist(), skip_special_tokens=False).encode()) for row in rows
    )


def measure(
    checkpoint_path: Path,
    home: Path,
    device_name: str,
    window: int,
    count: int = WINDOWS,
    grow: bool = False,
    profile: str | None = None,
) -> dict:
    settings, device, imported, version = import_into(checkpoint_path, home, device_name, profile)
    served = checkpoint.serving_dtype("auto", device, checkpoint.weight_bytes(version.model))
    ours, tok = version.model, version.tokenizer
    theirs = load_reference(checkpoint_path, device, torch.float32)
    base = Routing()

    domains = {}
    data = jobs.tokenize_domains(settings, tok, list(DEMO_DOMAINS), version.stop_tokens)
    for name, d in data.items():
        rows = held_out_windows(d.heldout, window, count)
        # each row predicts as many tokens: the mean of the rows' means is the mean loss
        mine = row_losses(lambda x: ours(x, base)[0], rows, device).double()
        reference = row_losses(lambda x: theirs(x).logits, rows, device).double()
        nats = mine.sum().item() * (rows.shape[1] - 1)
        domains[name] = {
            "windows": len(rows),
            "ppl": math.exp(mine.mean().item()),
            "transformers_ppl": math.exp(reference.mean().item()),
            "difference": math.exp((mine - reference).mean().item()) - 1,
            "bits_per_byte": nats / math.log(2) / predicted_bytes(tok, rows),
        }

    # decode: both in the serving dtype
    ours = ours.to(served)
    theirs = theirs.to(served)
    batches = (1, 16, 64) if device.type == "cuda" else (1,)
    new_tokens = 128 if device.type == "cuda" else 32
    prompt_ids = [row[:32].tolist() for row in held_out_windows(data["general"].heldout, 32, 64)]
    prompts = [tok.decode(p) for p in prompt_ids]
    decode = {}
    for batch in batches:
        ours_run = ours_decode(ours, tok, batch, new_tokens, prompts)
        ids = [tok.encode(p).ids[:32] for p in prompts[:batch]]
        width = min(len(i) for i in ids)
        theirs_run = _reference_decode(theirs, [i[:width] for i in ids], new_tokens, device)
        rate, reference = _timed_pair(ours_run, theirs_run, repeats=3)
        decode[batch] = {"ours": rate, "transformers": reference, "ratio": rate / reference}
    result = {
        "checkpoint": imported.source,
        "version": imported.version,
        "device": str(device),
        "window": window,
        "dtype": str(served).removeprefix("torch."),
        "domains": domains,
        "decode": decode,
    }
    if grow:
        del ours, theirs
        result["grown"] = grow_specialists(settings)
    return result


def grow_specialists(settings: Settings) -> dict:
    """Add each demo specialist to the imported base, timing each add; then the model's
    evaluation (`sma eval`'s figures) and greedy completions with and without them."""
    adds = {}
    for name in DEMO_DOMAINS[1:]:
        started = time.perf_counter()
        try:
            done = jobs.add_specialist(settings, name)
            adds[name] = {"seconds": time.perf_counter() - started, "version": done.version}
        except DriftTooLarge as exc:  # reported, not published: the figures say why
            adds[name] = {"seconds": time.perf_counter() - started, "refused": str(exc)}
    device = jobs.configure_torch(settings)
    current = jobs.load_current(settings, device)
    size = checkpoint.weight_bytes(current.model)
    served = current.model.to(checkpoint.serving_dtype("auto", device, size))
    if is_plain(current.chat_template):
        shown, prompts = list(PROMPTS), list(PROMPTS)
    else:
        shown = list(QUESTIONS)
        chats = [[ChatMessage(role="user", content=q)] for q in QUESTIONS]
        eos = (current.stop_tokens or ("",))[0]
        prompts = [render_chat(current.chat_template, chat, eos) for chat in chats]
    completions = {}
    for routing, label in ((Routing(force=(GENERAL,)), "base"), (Routing(), "specialists")):
        engine = Engine(
            served, current.tokenizer, max_batch=len(prompts), stop_tokens=current.stop_tokens
        )
        new = min(64, current.model.cfg.context // 2)
        params = SamplingParams(max_new_tokens=new, temperature=0, routing=routing)
        seqs = complete(engine, prompts, params)
        completions[label] = [current.tokenizer.decode(s.output_ids) for s in seqs]
    return {
        "version": current.id,
        "adds": adds,
        "metrics": current.metrics.get("domains", {}),
        "completions": dict(zip(shown, zip(*completions.values(), strict=True), strict=True)),
    }


def _reference_decode(model, ids: list[list[int]], new_tokens: int, device: torch.device):
    prompt = torch.tensor(ids, device=device)

    @torch.inference_mode()
    def run() -> int:
        out = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            cache_implementation="static",
            pad_token_id=0,
        )
        return (out.shape[1] - prompt.shape[1]) * prompt.shape[0]

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--window", type=int, default=512, help="tokens a scored window holds")
    parser.add_argument(
        "--windows", type=int, default=WINDOWS, help="windows scored per domain (fewer on a CPU)"
    )
    parser.add_argument("--grow", action="store_true", help="then add the demo's specialists")
    parser.add_argument("--profile", help="the specialists' training settings (with --grow)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(
        args.checkpoint, args.home, args.device, args.window, args.windows, args.grow, args.profile
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['checkpoint']['name']} on {result['device']}, {result['window']}-token windows")
    print("| domain | ppl | transformers | difference | bits/byte |")
    print("|---|---|---|---|---|")
    for name, d in result["domains"].items():
        print(
            f"| {name} | {d['ppl']:.3f} | {d['transformers_ppl']:.3f} | "
            f"{100 * d['difference']:+.3f}% | {d['bits_per_byte']:.3f} |"
        )
    print(f"decode ({result['dtype']}), tokens/s")
    print("| batch | ours | transformers (static cache) | ratio |")
    print("|---|---|---|---|")
    for batch, d in result["decode"].items():
        print(f"| {batch} | {d['ours']:.0f} | {d['transformers']:.0f} | {d['ratio']:.2f} |")
    if "grown" in result:
        grown = result["grown"]
        print(f"grown to {grown['version']}")
        for name, add in grown["adds"].items():
            print(f"  add {name}: {add['seconds']:.1f} s {add.get('refused', '')}")
        print("| domain | ppl with specialists | base | ratio | routing |")
        print("|---|---|---|---|---|")
        for name, d in grown["metrics"].items():
            print(
                f"| {name} | {d['model_ppl']:.3f} | {d['generalist_ppl']:.3f} | "
                f"{d['ratio']:.3f} | {d.get('routing', float('nan')):.2f} |"
            )
        for prompt, (base, grown_text) in grown["completions"].items():
            print(f"{prompt!r}\n  base:        {base!r}\n  specialists: {grown_text!r}")


if __name__ == "__main__":
    main()
