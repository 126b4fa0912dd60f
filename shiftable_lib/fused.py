"""Fused kernels for the decode step on a GPU, where Triton is installed; elsewhere (a CPU, or
no Triton) nothing here applies and the model runs its PyTorch operations.

With one new token per row, a layer of a small model is some twenty kernels of a few
microseconds each, and their launches, not the arithmetic, bound the step (docs/benchmarks.md).
Here a norm rides in the matrix product that reads its output, an activation and a residual
add in the product that makes their input; the split of the fused qkv into heads, with rotary
positions and the cache write, is one kernel, and attention over each row's own cached length
another (`triton_decode`).

Up to `MAX_ROWS` rows the products are ours; with more, cuBLAS's are the faster and the step
keeps PyTorch's operations.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
from torch import Tensor, nn

try:
    from shiftable_lib import triton_decode as _kernels
except ImportError:  # no Triton (a CPU-only install): nothing here applies
    _kernels = None

# one switch for the whole process: benchmarks and tests compare both paths with it
enabled = True
MAX_ROWS = 16  # past this many rows cuBLAS's products are the faster (docs/benchmarks.md)
ATTENTION_BLOCK = 64  # cached positions a decode attention program reads at a time


def available() -> bool:
    """Whether Triton's kernels are importable here (a GPU is another matter)."""
    return _kernels is not None


def applies(x: Tensor, rows: int) -> bool:
    """Whether a decode step of `rows` rows on x's device runs the fused kernels."""
    return (
        enabled and available() and x.is_cuda and rows <= MAX_ROWS and not torch.is_grad_enabled()
    )


def linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    norm: nn.Module | None = None,
    act: Literal["identity", "swiglu", "gelu_tanh"] = "identity",
    residual: Tensor | None = None,
) -> Tensor:
    """act(norm(x) @ weight.T + bias) + residual in one kernel, for x (..., K) of a few rows.

    `norm` is an `nn.RMSNorm` or `nn.LayerNorm` over K; with `swiglu` the weight's first half
    of rows is the gate and its second half the up projection, and the result silu(gate) * up.
    """
    assert _kernels is not None
    *lead, K = x.shape
    rows, weight = x.reshape(-1, K).contiguous(), weight.contiguous()
    M = rows.shape[0]
    N = weight.shape[0] // 2 if act == "swiglu" else weight.shape[0]
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    kind, eps, norm_w, norm_b = _norm_args(norm, x)
    res = residual.reshape(M, N).contiguous() if residual is not None else out
    flags = dict(
        NORM=kind,
        ACT=getattr(_kernels, act.upper()).value,  # IDENTITY, SWIGLU or GELU_TANH
        HAS_NORM_B=norm_b is not norm_w,
        HAS_B=bias is not None,
        HAS_RES=residual is not None,
    )
    args = (rows, norm_w, norm_b, weight, bias if bias is not None else weight, res, out)
    kernel, block_n, block_k, warps, stages = CONFIG.get((M, N, K, act), _config(M, N, K))
    tiles = dict(BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    with _on(x.device):
        if kernel == "rows":
            grid = (M, _cdiv(N, block_n))
            _kernels.row_linear[grid](*args, M, N, K, eps, **flags, **tiles)
        else:
            grid = (_cdiv(M, 16), _cdiv(N, block_n))
            _kernels.small_linear[grid](
                *args, M, N, K, eps, **flags, PRECISION=_precision(x), BLOCK_M=16, **tiles
            )
    return out.view(*lead, N)


def rope_store(
    qkv: Tensor,
    experts: int,
    n_head: int,
    kv_heads: int,
    rotary: tuple[Tensor, Tensor] | None,
    pos: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    first: int = 0,
) -> Tensor:
    """One new position per row: the fused qkv (n, 1, E * (H + 2 H_kv) * hd) split into heads,
    q and k rotated with `rotary` (cos and signed sin at each row's position, n rows of hd),
    keys and values written into the head-major cache (slots, heads, context, hd) at `pos`,
    from its head `first` on. Returns the queries (n, E * H, 1, hd)."""
    assert _kernels is not None
    n = qkv.shape[0]
    hd = k_cache.shape[-1]
    q = torch.empty(n, experts * n_head, 1, hd, device=qkv.device, dtype=qkv.dtype)
    cos, sin = (r.reshape(n, hd) for r in rotary) if rotary is not None else (q, q)
    grid = (n, experts * (n_head + 2 * kv_heads))
    with _on(qkv.device):
        _kernels.rope_store[grid](
            qkv.contiguous(),
            cos,
            sin,
            pos,
            q,
            k_cache[:, first],
            v_cache[:, first],
            k_cache.shape[2],
            k_cache.stride(0),
            H=n_head,
            HKV=kv_heads,
            HD=hd,
            BLOCK=max(16, 1 << (hd - 1).bit_length()),
            ROTARY=rotary is not None,
            num_warps=1,
        )
    return q


def attend(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor, kv_heads: int, first: int = 0
) -> Tensor:
    """Attention of one query per row and head, q (n, kv_heads * G, 1, hd), over `kv_heads`
    heads of the head-major cache from its head `first` on (grouped-query: each serves G
    consecutive query heads), slots 0..n-1, each row over its positions 0..pos."""
    assert _kernels is not None
    n, q_heads, _, hd = q.shape
    group = q_heads // kv_heads
    out = torch.empty_like(q)
    with _on(q.device):
        _kernels.decode_attention[(n, kv_heads)](
            q,
            k_cache[:, first],
            v_cache[:, first],
            out,
            pos,
            k_cache.stride(0),
            k_cache.shape[2],
            hd**-0.5,
            G=group,
            G_PAD=max(16, 1 << (group - 1).bit_length()),
            HD=hd,
            BLOCK_D=max(16, 1 << (hd - 1).bit_length()),
            BLOCK_S=ATTENTION_BLOCK,
            PRECISION=_precision(q),
            num_warps=4,
        )
    return out


def _precision(x: Tensor) -> str:
    """Tensor-core products in float32 as float32 ("ieee"), not TF32; other types as they are."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it x's, where it is another."""
    if device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def _norm_args(norm: nn.Module | None, x: Tensor) -> tuple[int, float, Tensor, Tensor]:
    """The kernel's norm kind, epsilon, weight and bias (x where there is none)."""
    assert _kernels is not None
    if norm is None:
        return _kernels.NONE.value, 0.0, x, x
    if isinstance(norm, nn.RMSNorm):
        eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
        return _kernels.RMS.value, eps, norm.weight, norm.weight
    assert isinstance(norm, nn.LayerNorm)
    bias = norm.bias if norm.bias is not None else norm.weight
    return _kernels.LAYER.value, norm.eps, norm.weight, bias


# (M, N, K, act) -> (kernel, BLOCK_N, BLOCK_K, warps, stages) in place of `_config`'s choice,
# for timing other tiles on a GPU
CONFIG: dict[tuple[int, int, int, str], tuple[str, int, int, int, int]] = {}


def _config(M: int, N: int, K: int) -> tuple[str, int, int, int, int]:
    """The kernel, BLOCK_N, BLOCK_K, warps and pipeline stages for an (M, N, K) product,
    chosen by timing SmolLM2's four products on an H200 (docs/benchmarks.md): up to 4 rows,
    one row per program on the vector units; past that, tensor-core tiles of 16 rows."""
    if M <= 4:
        return "rows", 4, 512, 8, 2
    return "dot", 32 if N >= 1024 else 16, 128 if K >= 1024 else 64, 4, 3
