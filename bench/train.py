"""Training throughput of a profile's generalist phase: tokens/s and MFU, on 1 or N processes.

The real training loop (`train.run_phase` over `language_model_phase`: AdamW, bf16 autocast on
CUDA, gradient clipping, DDP under torchrun) on random tokens, since speed does not depend on
the text. Timed after warm-up steps, from a synchronised start to a synchronised end.

    python -m bench.train --profile gpt2-small [--steps 40] [--json]
    python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        -m bench.train --profile gpt2-small                # 2 GPUs of one host

MFU is the model FLOPs per token (6 x matmul parameters, the tied head included, plus the
attention's 12 x layers x context x d_model) times tokens/s, over the GPUs' dense bf16 peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from shiftable_lib import distributed
from shiftable_lib.config import get_profile
from shiftable_lib.model import ModelConfig, ShiftableLM
from shiftable_lib.sampling import Routing
from shiftable_lib.train import (
    DomainTokens,
    generalist_params,
    language_model_phase,
    pick_device,
    run_phase,
)

PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}  # dense, per GPU


def flops_per_token(cfg: ModelConfig) -> float:
    d, layers = cfg.d_model, cfg.n_layer
    matmul = layers * 12 * d * d + cfg.vocab_size * d  # attention 4d^2, MLP 8d^2, tied head
    return 6 * matmul + 12 * layers * cfg.context * d


def peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def measure(profile_name: str, steps: int, warmup: int = 5, device: str = "auto") -> dict:
    """Tokens/s (the global batch) of `steps` generalist steps after `warmup` ones, and MFU
    where the GPU's peak is known; under torchrun, of every rank together."""
    dev = distributed.init(pick_device(device))
    world = distributed.world()
    profile = get_profile(profile_name)
    cfg = ModelConfig(
        profile.vocab_size, profile.context, profile.n_layer, profile.n_head, profile.d_model,
        dropout=profile.dropout,
    )  # fmt: skip
    torch.manual_seed(0)
    model = ShiftableLM(cfg).to(dev)
    tokens = torch.randint(
        0, cfg.vocab_size, (4_000_000,), generator=torch.Generator().manual_seed(1)
    )
    data = DomainTokens("general", tokens, tokens[:10_000], [])
    params = generalist_params(model)

    def phase(n: int):
        lm = language_model_phase(
            "bench", model, data, params, n, profile.generalist_lr, Routing(), 0, profile, dev,
        )  # fmt: skip
        return dataclasses.replace(lm, evaluate=None)

    run_phase(phase(warmup), model, profile, dev, lambda _: None)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    world.barrier()
    start = time.perf_counter()
    run_phase(phase(steps), model, profile, dev, lambda _: None)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    world.barrier()
    seconds = time.perf_counter() - start
    rate = steps * profile.batch_size * profile.context / seconds  # the global batch
    gpu_peak = peak(dev)
    return {
        "profile": profile.name,
        "processes": world.size,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "parameters": sum(p.numel() for p in model.parameters()),
        "global_batch": [profile.batch_size, profile.context],
        "steps": steps,
        "tokens_per_s": round(rate),
        "mfu": None
        if gpu_peak is None
        else round(flops_per_token(cfg) * rate / (gpu_peak * world.size), 4),
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="gpt2-small")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    result = measure(args.profile, args.steps, args.warmup, args.device)
    if distributed.world().main:
        if args.json:
            print(json.dumps(result))
        else:
            for key, value in result.items():
                print(f"{key:>14}: {value}")
    distributed.shutdown()


if __name__ == "__main__":
    main()
