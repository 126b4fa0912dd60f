"""The fused decode kernels (Triton, on a GPU) compute what the model's PyTorch operations do.

Everything here but the first test needs a CUDA device and Triton, and is skipped without them
(CI has neither); in float32 the fused and unfused paths agree to rounding.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shiftable_lib import fused
from shiftable_lib.cache import Decode
from shiftable_lib.model import ModelConfig, ShiftableLM
from shiftable_lib.routing import RouteTable
from shiftable_lib.sampling import Routing

GPU = pytest.mark.skipif(
    not torch.cuda.is_available() or fused._kernels is None, reason="needs CUDA and Triton"
)
LLAMA = ModelConfig(
    vocab_size=256, context=64, n_layer=2, n_head=4, d_model=64, n_kv_head=2, d_ff=96,
    norm="rmsnorm", positions="rope", mlp="swiglu", tied=False, qkv_bias=True,
)  # fmt: skip
GPT = ModelConfig(
    vocab_size=256, context=64, n_layer=2, n_head=4, d_model=64,
    qkv_bias=True, proj_bias=True, mlp_bias=True,
)  # fmt: skip


def test_a_decode_step_off_a_gpu_runs_the_models_own_operations():
    model = ShiftableLM(LLAMA)
    cache = model.new_cache(2)
    routes = RouteTable.from_rows([[True]] * 2, [0] * 2, torch.device("cpu"))
    with torch.inference_mode():
        step = Decode(cache, torch.tensor([1, 2]), routes, None)
        assert not step.fused and step.rows is not None  # the cache is written by index
        logits, _ = model.decode(cache, torch.tensor([1, 2]), routes)
    assert logits.shape == (2, LLAMA.vocab_size) and cache.lengths.tolist() == [1, 1]


def _reference(x, weight, bias, norm, act, residual):
    h = norm(x) if norm is not None else x
    y = F.linear(h, weight, bias)
    if act == "swiglu":
        gate, up = y.chunk(2, -1)
        y = F.silu(gate) * up
    elif act == "gelu_tanh":
        y = F.gelu(y, approximate="tanh")
    return y if residual is None else y + residual


@GPU
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("act", ["identity", "swiglu", "gelu_tanh"])
@pytest.mark.parametrize("norm_kind", [None, "rms", "layer"])
def test_a_fused_product_equals_norm_product_activation_and_residual(rows, act, norm_kind):
    torch.manual_seed(0)
    K, N = 200, 72  # not multiples of any block: every edge is masked
    x = torch.randn(rows, 1, K, device="cuda")
    weight = torch.randn(2 * N if act == "swiglu" else N, K, device="cuda") / K**0.5
    norm = {None: None, "rms": nn.RMSNorm(K, eps=1e-6), "layer": nn.LayerNorm(K)}[norm_kind]
    if norm is not None:
        norm = norm.cuda()
        with torch.no_grad():
            for p in norm.parameters():
                p.uniform_(0.5, 1.5)
    for bias in (None, torch.randn(weight.shape[0], device="cuda")):
        for residual in (None, torch.randn(rows, 1, N, device="cuda")):
            with torch.inference_mode():
                got = fused.linear(x, weight, bias, norm=norm, act=act, residual=residual)
                want = _reference(x, weight, bias, norm, act, residual)
            assert got.shape == want.shape == (rows, 1, N)
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def _model(cfg: ModelConfig, specialists: tuple[str, ...], rank: int) -> ShiftableLM:
    torch.manual_seed(1)
    model = ShiftableLM(replace(cfg, branch_rank=rank))
    for name in specialists:
        model.add_specialist(name)
    model.wake_specialists(list(specialists))
    with torch.no_grad():  # branches and gates unlike the base's, as after training
        for name, p in model.named_parameters():
            if ("experts." in name and "general" not in name) or "gate" in name:
                p.add_(torch.randn_like(p) * 0.05)
            elif p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model.cuda().eval()


def _decode(
    model: ShiftableLM, rows: int, routing: Routing, on: bool, steps: int = 6
) -> torch.Tensor:
    """Logits and gates of `steps` decode steps after a prefill, the fused kernels on or off."""
    fused.enabled = on
    try:
        torch.manual_seed(2)
        cache = model.new_cache(rows)
        idx = torch.randint(1, model.cfg.vocab_size, (rows, 9), device="cuda")
        lengths = torch.tensor([9 - i % 4 for i in range(rows)], device="cuda")
        routes = RouteTable.for_batch(model.experts, routing, rows, torch.device("cuda"))
        slots = torch.arange(rows, device="cuda")
        seen = []
        with torch.inference_mode():
            logits, _, _ = model.prefill(cache, slots, idx, lengths, routes)
            for _ in range(steps):
                step = Decode(cache, logits.argmax(-1), routes, None)
                assert step.fused == (on and rows <= fused.MAX_ROWS)
                logits, gates = model.decode(cache, logits.argmax(-1), routes)
                seen.append(torch.cat([logits, gates.transpose(0, 1).flatten(1)], -1))
        return torch.stack(seen)
    finally:
        fused.enabled = True


@GPU
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize(
    "cfg,specialists,rank",
    [(LLAMA, (), 0), (LLAMA, ("ds", "dl"), 0), (LLAMA, ("ds", "dl"), 4), (GPT, ("ds",), 0)],
    ids=["llama", "llama+2", "llama+2-rank4", "gpt+1"],
)
def test_fused_decoding_equals_the_models_operations(cfg, specialists, rank, rows):
    """Logits and gate weights of every step, soft-mixed, with one expert forced, and (with
    specialists) with one excluded or the top one only: the fused kernels' cache writes are
    read by later steps."""
    model = _model(cfg, specialists, rank)
    routings = [Routing(), Routing(force=("general",))]
    if specialists:
        routings += [
            Routing(force=(specialists[0],)),
            Routing(exclude=(specialists[-1],)),
            Routing(mode="top1"),
        ]
    for routing in routings:
        torch.testing.assert_close(
            _decode(model, rows, routing, on=True),
            _decode(model, rows, routing, on=False),
            atol=1e-4,
            rtol=1e-4,
        )


@GPU
def test_fused_decoding_in_bfloat16_differs_only_by_rounding():
    """bfloat16 rounds the unfused path's intermediate results where the kernels keep float32:
    one step's logits and gates differ by that rounding alone."""
    model = _model(LLAMA, ("ds",), 0).to(torch.bfloat16)
    on, off = (_decode(model, 3, Routing(), on=flag, steps=1) for flag in (True, False))
    torch.testing.assert_close(on.float(), off.float(), atol=0.05, rtol=0.05)


@GPU
@pytest.mark.parametrize("block", [16, 64])
def test_fused_attention_over_rows_of_many_blocks_equals_sdpa(block, monkeypatch):
    """Each row attends over its own length, block after block with a running softmax, over
    the cache's heads from an offset (one expert of several), each key/value head serving a
    group of query heads."""
    monkeypatch.setattr(fused, "ATTENTION_BLOCK", block)
    torch.manual_seed(3)
    n, kv_heads, group, hd, context, first = 3, 2, 3, 64, 300, 2
    k, v = (torch.randn(4, first + kv_heads + 1, context, hd, device="cuda") for _ in "kv")
    q = torch.randn(n, kv_heads * group, 1, hd, device="cuda")
    pos = torch.tensor([0, 150, 299], device="cuda")
    with torch.inference_mode():
        got = fused.attend(q, k, v, pos, kv_heads, first)
    for r, p in enumerate(pos.tolist()):
        keys, values = (c[r, first : first + kv_heads, : p + 1] for c in (k, v))
        want = F.scaled_dot_product_attention(
            q[r], keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
        )
        torch.testing.assert_close(got[r], want, atol=1e-5, rtol=1e-5)


@GPU
def test_fused_decoding_of_long_rows_equals_the_models_operations(monkeypatch):
    """Rows whose caches span many attention blocks, and the rotary table far from 0."""
    monkeypatch.setattr(fused, "ATTENTION_BLOCK", 16)
    model = _model(replace(LLAMA, context=256), ("ds",), 4)
    seen = []
    for on in (True, False):
        monkeypatch.setattr(fused, "enabled", on)
        torch.manual_seed(4)
        cache = model.new_cache(2)
        idx = torch.randint(1, LLAMA.vocab_size, (2, 150), device="cuda")
        routes = RouteTable.for_batch(model.experts, Routing(), 2, torch.device("cuda"))
        steps = []
        with torch.inference_mode():
            lengths = torch.tensor([150, 97], device="cuda")
            slots = torch.arange(2, device="cuda")
            logits, _, _ = model.prefill(cache, slots, idx, lengths, routes)
            for _ in range(40):
                logits, _ = model.decode(cache, logits.argmax(-1), routes)
                steps.append(logits)
        seen.append(torch.stack(steps))
    torch.testing.assert_close(seen[0], seen[1], atol=1e-4, rtol=1e-4)
