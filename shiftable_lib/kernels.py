"""Decode attention on the CPU as one compiled loop (numba), not as PyTorch ops.

A decode step attends one new query per row and head over that row's cached keys and values.
PyTorch runs that as two batched matrix products of (1 x hd) @ (hd x span) matrices, or as the
fused SDPA kernel: each pays a fixed cost per (row, head) pair, and on a CPU that cost, not the
memory traffic, sets the speed. This loop reads each row's keys and values once, in cache
order, and keeps the scores of all heads in a small buffer: with the cache laid out
position-major (slots, context, heads, hd), a row's keys for every head are one contiguous
block, which the hardware prefetchers stream at full speed (docs/benchmarks.md).

The loop runs in the calling thread, so it serves decoding with one torch thread (the
inference worker's default on machines of up to 2 cores); with more, PyTorch's attention over
a head-major cache spreads the rows over the threads and wins (`supports`).

numba compiles the loop (LLVM, no C compiler needed) the first time a process calls it;
`warm_up()` does that ahead of the first request.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger("sma.kernels")


def _attend(q, k, v, h0, group, pos, out):  # pragma: no cover - runs compiled (numba)
    """out[s, h] = softmax(q[s, h] . k[s, :L, c] / sqrt(hd)) @ v[s, :L, c], with L = pos[s] + 1
    and c = h0 + h // group (grouped-query attention: `group` query heads share a key/value
    head); q, out (n, H, hd); k, v (slots, context, all heads, hd)."""
    n, H, hd = q.shape
    scale = np.float32(1.0 / math.sqrt(hd))
    scores = np.empty((H, k.shape[1]), dtype=np.float32)
    top = np.empty(H, dtype=np.float32)
    total = np.empty(H, dtype=np.float32)
    acc = np.empty((H, hd), dtype=np.float32)
    for s in range(n):
        span = max(1, min(pos[s] + 1, k.shape[1]))  # the engine keeps pos in range
        qs = q[s]
        for t in range(span):  # scores, keeping each head's maximum
            kt = k[s, t]
            for h in range(H):
                kh, qh = kt[h0 + h // group], qs[h]
                dot = np.float32(0.0)
                for j in range(hd):
                    dot += qh[j] * kh[j]
                dot *= scale
                scores[h, t] = dot
                if t == 0 or dot > top[h]:
                    top[h] = dot
        for h in range(H):  # softmax numerators and their sums
            z = np.float32(0.0)
            for t in range(span):
                p = np.exp(scores[h, t] - top[h])
                scores[h, t] = p
                z += p
            total[h] = z
        acc[:] = 0.0
        for t in range(span):  # the weighted sum of the values
            vt = v[s, t]
            for h in range(H):
                p, vh, ah = scores[h, t], vt[h0 + h // group], acc[h]
                for j in range(hd):
                    ah[j] += p * vh[j]
        for h in range(H):
            inv = np.float32(1.0) / total[h]
            for j in range(hd):
                out[s, h, j] = acc[h, j] * inv


@functools.cache
def _kernel() -> Callable | None:
    """The compiled loop; None where numba cannot be imported (a broken or partial install),
    and decoding then takes PyTorch's attention."""
    try:
        import numba  # imported on first use: only CPU decoding needs it
    except ImportError:
        log.warning("numba is not installed: CPU decode attention runs in PyTorch (slower)")
        return None
    # no 'nnan'/'ninf' (a max starting from -inf would be undefined); reassociation lets LLVM
    # vectorise the dot products. nogil: the inference worker's other threads keep running.
    flags = {"reassoc", "contract", "arcp"}
    return numba.njit(nogil=True, fastmath=flags, boundscheck=False)(_attend)


def supports(t: Tensor) -> bool:
    """Whether the compiled loop serves attention over tensors like `t` (a query, or a cache
    about to be made): CPU, float32, no autograd, one torch thread, numba installed.

    The loop runs in one thread. With more torch threads, PyTorch's attention spreads the rows
    over them and is faster; with one, the loop is at least as fast (docs/benchmarks.md)."""
    return (
        t.device.type == "cpu"
        and t.dtype == torch.float32
        and not t.requires_grad
        and torch.get_num_threads() == 1
        and _kernel() is not None
    )


def decode_attention(q: Tensor, k: Tensor, v: Tensor, heads: slice, pos: Tensor) -> Tensor:
    """Attention of one query per row, q (n, H, 1, hd), over a position-major cache layer
    k, v (slots, context, all heads, hd): row s attends to positions 0..pos[s] of slot s, with
    the cache's heads `heads` (H of them, or H / G with grouped-query attention, each serving
    G consecutive query heads). Returns (n, H, 1, hd), as SDPA would."""
    n, H, _, hd = q.shape
    whole = isinstance(heads.start, int) and isinstance(heads.stop, int)
    kv_heads = heads.stop - heads.start if whole else 0
    group = H // kv_heads if kv_heads > 0 else 0
    # the loop runs without bounds checks: whatever it is given must fit
    if not (
        k.shape == v.shape
        and n <= k.shape[0]
        and pos.shape == (n,)
        and hd == k.shape[3]
        and heads.step is None
        and heads.start >= 0
        and group > 0
        and group * kv_heads == H
        and heads.stop <= k.shape[2]
    ):
        raise ValueError(f"{n} rows and heads {heads} do not fit a cache of {tuple(k.shape)}")
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("numba is not installed")
    out = torch.empty(n, H, hd, dtype=torch.float32)
    kernel(
        q.reshape(n, H, hd).contiguous().numpy(),
        k.numpy(),
        v.numpy(),
        heads.start,
        group,
        pos.contiguous().numpy(),
        out.numpy(),
    )
    return out.view(n, H, 1, hd)


def warm_up() -> None:
    """Compile the loop now (once per process) rather than in the first decode step that
    needs it."""
    q, cache = torch.zeros(1, 1, 1, 8), torch.zeros(1, 2, 1, 8)
    decode_attention(q, cache, cache, slice(0, 1), torch.zeros(1, dtype=torch.long))
