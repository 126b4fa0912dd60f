"""Evaluation: held-out perplexity, with the base expert alone and with the gated mixture, and
how often the gate routes a held-out document to its own domain's expert."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from shiftable_lib.config import Profile
from shiftable_lib.corpus import GENERAL
from shiftable_lib.model import ShiftableLM
from shiftable_lib.sampling import Routing


class HeldOut(Protocol):
    """A domain's held-out split as token ids (`train.DomainTokens` is one)."""

    heldout: Tensor  # 1-D, documents each followed by EOS
    heldout_docs: list[Tensor]


def autocast(device: torch.device | str):
    """bf16 autocast on CUDA; nothing on a CPU."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def perplexity(
    model: ShiftableLM, tokens: Tensor, context: int, windows: int, routing: Routing, device
) -> float:
    """Perplexity on up to `windows` evenly spaced, non-overlapping windows of `tokens`."""
    rows = held_out_windows(tokens, context, windows)
    if not len(rows):
        return float("nan")
    return math.exp(window_losses(model, rows, routing, device).double().mean().item())


def held_out_windows(tokens: Tensor, length: int, count: int) -> Tensor:
    """Up to `count` evenly spaced, non-overlapping windows of `tokens`, each `length` tokens
    (fewer when `tokens` is shorter) and the one after them: (k, length + 1), k = 0 when
    `tokens` holds no window. What `sma eval` scores, and the benchmarks that compare with it."""
    T = min(length, tokens.numel() - 1)
    n = (tokens.numel() - 1) // T if T > 0 else 0
    if n == 0:
        return tokens.new_zeros((0, max(T, 0) + 1))
    picks = torch.linspace(0, n - 1, min(count, n)).round().long().unique()
    return torch.stack([tokens[i * T : i * T + T + 1] for i in picks.tolist()])


@torch.no_grad()
def window_losses(model: ShiftableLM, rows: Tensor, routing: Routing, device) -> Tensor:
    """Each row's mean next-token loss under `routing` (rows: (n, T + 1) windows; on the CPU)."""
    model.eval()
    return row_losses(lambda idx: model(idx, routing)[0], rows, device)


@torch.no_grad()
def row_losses(forward: Callable[[Tensor], Tensor], rows: Tensor, device) -> Tensor:
    """Each row's mean next-token loss, `forward` giving the logits of a batch of inputs (any
    causal LM: ours, or a reference run on the same windows)."""
    out = []
    for chunk in rows.split(16):
        chunk = chunk.to(device)
        with autocast(device):
            logits = forward(chunk[:, :-1])
        ce = F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="none")
        out.append(ce.view(len(chunk), -1).mean(-1).cpu())
    return torch.cat(out)


@torch.no_grad()
def routing_accuracy(
    model: ShiftableLM, docs: dict[str, list[Tensor]], context: int, limit: int, device
) -> dict[str, float]:
    """Per domain: share of held-out documents whose mean gate weight (over layers and the
    document's first `context` tokens) is highest for the domain's own expert."""
    model.eval()
    experts = model.experts
    result = {}
    for name, doc_list in docs.items():
        if name not in experts:
            continue
        own, hits, total = experts.index(name), 0, 0
        for batch in _batched(doc_list[:limit], 16):
            docs_t = [d[:context] for d in batch]
            lengths = torch.tensor([len(d) for d in docs_t], device=device)
            idx = torch.nn.utils.rnn.pad_sequence(docs_t, batch_first=True).to(device)
            with autocast(device):
                _, gates = model(idx, return_gates=True)
            valid = (torch.arange(idx.shape[1], device=device) < lengths[:, None]).float()
            g = torch.stack(gates).float().mean(0)  # (n, T, E), averaged over layers
            mean = (g * valid[..., None]).sum(1) / lengths[:, None]
            hits += int((mean.argmax(-1) == own).sum())
            total += len(batch)
        result[name] = hits / total if total else float("nan")
    return result


def _batched(items: list, n: int) -> Iterable[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def evaluate(model: ShiftableLM, data: dict[str, HeldOut], profile: Profile, device) -> dict:
    """Held-out perplexity of the generalist (base expert alone) and of the model, per domain,
    and gate routing accuracy on held-out documents."""
    base = Routing(force=(GENERAL,))
    domains = {}
    for name, d in data.items():
        gen_ppl = perplexity(model, d.heldout, profile.context, profile.eval_windows, base, device)
        ppl = perplexity(model, d.heldout, profile.context, profile.eval_windows, Routing(), device)
        domains[name] = {"generalist_ppl": gen_ppl, "model_ppl": ppl, "ratio": ppl / gen_ppl}
    routing = routing_accuracy(
        model,
        {n: d.heldout_docs for n, d in data.items()},
        profile.context,
        profile.routing_documents,
        device,
    )
    for name, acc in routing.items():
        domains[name]["routing"] = acc
    scored = [v for v in routing.values() if not math.isnan(v)]
    return {
        "domains": domains,
        "routing_accuracy": sum(scored) / len(scored) if scored else None,
        "routing_min": min(scored) if scored else None,
    }


@torch.no_grad()
def changes(
    before: ShiftableLM, metrics: dict, data: dict[str, HeldOut], profile: Profile, device
) -> dict[str, dict[str, float]]:
    """Per domain of `metrics` (an `evaluate` of the model after a change): held-out perplexity
    of the model `before` it and after, on the same windows, and the relative change (+0.01 =
    1% worse). A domain the model before had no branch for (the one just added) is scored on
    its mixture too: the change is then the new branch's gain."""
    out = {}
    for name, scores in metrics["domains"].items():
        held = data[name].heldout
        old = perplexity(before, held, profile.context, profile.eval_windows, Routing(), device)
        new = scores["model_ppl"]
        out[name] = {"before": old, "after": new, "change": new / old - 1}
    return out
