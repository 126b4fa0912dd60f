"""How a specialist branch on a pretrained base is best parameterised: a full copy of the
base attention against low-rank deltas on it, in one run.

    python -m bench.branches CHECKPOINT --home HOME [--domain datascience]
        [--variants full@6e-4,r16@2e-3,r64@2e-3] [--steps N] [--device cuda] [--json]

CHECKPOINT is imported into HOME (its demo corpus built if it has none), as `bench.pretrained`
does. Each variant is one fresh branch of the domain, grown on the same base: `full` trains
copies of every layer's q/k/v and output projections (and their biases); `rN` trains only
rank-N factors of a delta on the frozen base weights, W = W0 + B A, with B starting at zero
so that the branch starts as the base (`ModelConfig.branch_rank`, which `sma import` sets).
The `@lr` is the variant's peak learning rate. Every variant trains as an add trains a
branch: the profile's batches, schedule and number of steps (`--steps` sets another), the
gate forced to the branch, a share of general text in each batch, the best held-out
checkpoint kept. The table gives the parameters trained, the seconds taken, and the domain's
and the general text's held-out perplexity through the branch against the base's.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from bench.pretrained import import_into
from shiftable_lib import checkpoint, jobs, train
from shiftable_lib.corpus import GENERAL
from shiftable_lib.evaluate import perplexity
from shiftable_lib.model import ShiftableLM
from shiftable_lib.plan import specialist_steps
from shiftable_lib.sampling import Routing

DEFAULT_VARIANTS = "full@6e-4,r16@2e-3,r64@2e-3,r256@1e-3"
PROBE = "probe"


@dataclass(frozen=True)
class Variant:
    rank: int  # 0: a full copy
    lr: float

    @property
    def name(self) -> str:
        return f"{'full' if not self.rank else f'rank {self.rank}'} @ {self.lr:g}"

    @classmethod
    def parse(cls, spec: str) -> Variant:
        kind, _, lr = spec.partition("@")
        if kind != "full" and not (kind.startswith("r") and kind[1:].isdigit()):
            raise ValueError(f"a variant is full@LR or rN@LR, not {spec!r}")
        return cls(0 if kind == "full" else int(kind[1:]), float(lr))


def branch(model: ShiftableLM, variant: Variant, name: str = PROBE) -> list[nn.Parameter]:
    """Add branch `name`, parameterised as `variant` says, and return what trains in it."""
    model.cfg = replace(model.cfg, branch_rank=variant.rank)  # the import's choice, overridden
    model.add_specialist(name)
    return [p for b in model.blocks for p in train.branch_params(b.attn.experts[name])]


def measure(
    checkpoint_path: Path,
    home: Path,
    device_name: str,
    domain: str,
    variants: list[Variant],
    steps: int = 0,
    profile: str | None = None,
) -> dict:
    settings, device, imported, version = import_into(checkpoint_path, home, device_name, profile)
    tok, prof = version.tokenizer, version.profile
    data = jobs.tokenize_domains(settings, tok, [GENERAL, domain], version.stop_tokens)
    steps = steps or specialist_steps(data[domain].train.numel(), prof)
    fixed = replace(prof, specialist_min_steps=steps, specialist_max_steps=steps)
    windows = (prof.context, prof.eval_windows)

    def ppl(model: ShiftableLM, name: str, routing: Routing) -> float:
        return perplexity(model, data[name].heldout, *windows, routing, device)

    base = {name: ppl(version.model, name, Routing()) for name in (domain, GENERAL)}
    rows = {}
    for variant in variants:
        model = checkpoint.load_version(settings.models_dir, imported.version, device).model
        params = branch(model, variant, domain)  # trained as an add trains its branch
        forced = Routing(force=(domain,))
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        trained = train.train_branch(
            model, data[domain], data[GENERAL], replace(fixed, specialist_lr=variant.lr), device,
            lambda _: None,
        )  # fmt: skip
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        got = {name: ppl(model, name, forced) for name in (domain, GENERAL)}
        rows[variant.name] = {
            "rank": variant.rank,
            "lr": variant.lr,
            "parameters": sum(p.numel() for p in params),
            "seconds": seconds,
            "steps": steps,
            "ratio": got[domain] / base[domain],
            "general_ratio": got[GENERAL] / base[GENERAL],
            "loss_curve": trained["loss_curve"],
        }
        del model
    return {
        "checkpoint": imported.source,
        "device": str(device),
        "domain": domain,
        "base_parameters": sum(p.numel() for p in version.model.parameters()),
        "base_ppl": base,
        "batch": [prof.batch_size, prof.context],
        "variants": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--domain", default="datascience")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="full@LR,rN@LR,...")
    parser.add_argument("--steps", type=int, default=0, help="0: as many as an add trains")
    parser.add_argument("--profile", help="the training settings (default: the home's)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    variants = [Variant.parse(v) for v in args.variants.split(",")]
    result = measure(
        args.checkpoint, args.home, args.device, args.domain, variants, args.steps, args.profile
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return
    b, t = result["batch"]
    print(
        f"{result['checkpoint']['name']} on {result['device']}: a {result['domain']} branch, "
        f"{b}x{t}-token batches; base perplexity {result['base_ppl'][result['domain']]:.3f}"
    )
    print("| branch | parameters | share of the base | steps | seconds | ratio | general ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, row in result["variants"].items():
        share = row["parameters"] / result["base_parameters"]
        print(
            f"| {name} | {row['parameters'] / 1e6:.2f}M | {100 * share:.1f}% | {row['steps']} | "
            f"{row['seconds']:.1f} | {row['ratio']:.3f} | {row['general_ratio']:.3f} |"
        )


if __name__ == "__main__":
    main()
