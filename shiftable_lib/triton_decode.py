"""Triton kernels for the decode step on a GPU (imported only where Triton is installed;
`fused.py` is the interface and says when they apply).

A small model's decode step is a few hundred tiny kernels, each costing a few microseconds of
latency whatever its arithmetic: a norm, a matrix-vector product, an activation and a residual
add are four launches where one suffices, and splitting the fused qkv into heads, rotating q and
k and writing k and v into the cache is eight. These kernels do each group in one.
"""

from __future__ import annotations

import triton
import triton.language as tl

# the norm applied to x first, and the activation after the product
NONE, RMS, LAYER = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
IDENTITY, SWIGLU, GELU_TANH = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _moments(
    x_ptr, rows, row_ok, K, eps, NORM: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr
):
    """Per row of x (M, K): the mean (LayerNorm; else 0) and the inverse of the standard
    deviation or root mean square (1 without a norm), in float32."""
    mean = tl.zeros([ROWS], dtype=tl.float32)
    rstd = tl.zeros([ROWS], dtype=tl.float32) + 1.0
    if NORM != NONE:
        ks = tl.arange(0, BLOCK_K)
        s1 = tl.zeros([ROWS], dtype=tl.float32)
        s2 = tl.zeros([ROWS], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x_mask = row_ok[:, None] & (k0 + ks < K)[None, :]
            x_at = x_ptr + rows[:, None] * K + (k0 + ks)[None, :]
            xk = tl.load(x_at, mask=x_mask, other=0.0).to(tl.float32)
            s1 += tl.sum(xk, axis=1)
            s2 += tl.sum(xk * xk, axis=1)
        if NORM == LAYER:
            mean = s1 / K
            rstd = 1.0 / tl.sqrt(tl.maximum(s2 / K - mean * mean, 0.0) + eps)
        else:
            rstd = 1.0 / tl.sqrt(s2 / K + eps)
    return mean, rstd


@triton.jit
def _normed(
    xk,
    k0,
    ks,
    k_ok,
    mean,
    rstd,
    norm_w_ptr,
    norm_b_ptr,
    NORM: tl.constexpr,
    HAS_NORM_B: tl.constexpr,
):
    """A chunk of x's columns (..., BLOCK_K), normalised with its rows' moments."""
    if NORM != NONE:
        g = tl.load(norm_w_ptr + k0 + ks, mask=k_ok, other=0.0).to(tl.float32)
        xk = (xk - mean) * rstd * g
        if HAS_NORM_B:
            xk += tl.load(norm_b_ptr + k0 + ks, mask=k_ok, other=0.0).to(tl.float32)
    return xk


@triton.jit
def _finish(
    y,
    y_up,
    rows,
    cols,
    M,
    N,
    b_ptr,
    res_ptr,
    out_ptr,
    ACT: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_RES: tl.constexpr,
):
    """Bias, activation and residual on the products (ROWS, BLOCK_N), then the store."""
    row_ok = rows < M
    col_ok = cols < N
    if HAS_B:
        y += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if ACT == SWIGLU:
            y_up += tl.load(b_ptr + N + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if ACT == SWIGLU:
        y = y * tl.sigmoid(y) * y_up
    elif ACT == GELU_TANH:  # tanh(z) = 2 sigmoid(2z) - 1
        z = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = y * tl.sigmoid(2.0 * z)
    out_mask = row_ok[:, None] & col_ok[None, :]
    at = rows[:, None] * N + cols[None, :]
    if HAS_RES:
        y += tl.load(res_ptr + at, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + at, y.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def small_linear(
    x_ptr,
    norm_w_ptr,
    norm_b_ptr,
    w_ptr,
    b_ptr,
    res_ptr,
    out_ptr,
    M,
    N,  # output columns (with SwiGLU, half the weight's rows)
    K,
    eps,
    NORM: tl.constexpr,
    ACT: tl.constexpr,
    HAS_NORM_B: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_RES: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" for float32: exact tensor-core products, not TF32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out = act(norm(x) @ W.T + b) (+ res), for a few rows x (M, K) against W (N or 2N, K),
    all contiguous, on tensor cores: each program makes BLOCK_N output columns of BLOCK_M rows
    (at least 16), reading its rows of W once. The norm's moments are computed per program, as
    x is a few kilobytes."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    mean, rstd = _moments(x_ptr, rows, row_ok, K, eps, NORM, BLOCK_M, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + ks < K
        x_mask = row_ok[:, None] & k_ok[None, :]
        xk = tl.load(x_ptr + rows[:, None] * K + (k0 + ks)[None, :], mask=x_mask, other=0.0)
        xk = _normed(
            xk.to(tl.float32),
            k0,
            ks,
            k_ok,
            mean[:, None],
            rstd[:, None],
            norm_w_ptr,
            norm_b_ptr,
            NORM,
            HAS_NORM_B,
        )
        w_mask = col_ok[:, None] & k_ok[None, :]
        w = tl.load(w_ptr + cols[:, None] * K + (k0 + ks)[None, :], mask=w_mask, other=0.0)
        xw = xk.to(w.dtype)
        acc += tl.dot(xw, tl.trans(w), input_precision=PRECISION)
        if ACT == SWIGLU:  # the up projection: the weight's second half of rows
            w_up = w_ptr + (cols + N)[:, None] * K + (k0 + ks)[None, :]
            w2 = tl.load(w_up, mask=w_mask, other=0.0)
            up += tl.dot(xw, tl.trans(w2), input_precision=PRECISION)
    _finish(acc, up, rows, cols, M, N, b_ptr, res_ptr, out_ptr, ACT, HAS_B, HAS_RES)


@triton.jit
def row_linear(
    x_ptr,
    norm_w_ptr,
    norm_b_ptr,
    w_ptr,
    b_ptr,
    res_ptr,
    out_ptr,
    M,
    N,
    K,
    eps,
    NORM: tl.constexpr,
    ACT: tl.constexpr,
    HAS_NORM_B: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_RES: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """`small_linear` for one row per program (grid: rows, column blocks), as products and
    sums on the vector units: with one or a few rows, a tensor-core tile is mostly padding."""
    rows = tl.program_id(0) + tl.arange(0, 1)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    mean, rstd = _moments(x_ptr, rows, rows < M, K, eps, NORM, 1, BLOCK_K)
    x_row = x_ptr + tl.program_id(0) * K
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + ks < K
        xk = tl.load(x_row + k0 + ks, mask=k_ok, other=0.0).to(tl.float32)
        xk = _normed(xk, k0, ks, k_ok, mean, rstd, norm_w_ptr, norm_b_ptr, NORM, HAS_NORM_B)
        w_mask = col_ok[:, None] & k_ok[None, :]
        w = tl.load(w_ptr + cols[:, None] * K + (k0 + ks)[None, :], mask=w_mask, other=0.0)
        acc += w.to(tl.float32) * xk[None, :]
        if ACT == SWIGLU:
            w_up = w_ptr + (cols + N)[:, None] * K + (k0 + ks)[None, :]
            up += tl.load(w_up, mask=w_mask, other=0.0).to(tl.float32) * xk[None, :]
    y = tl.sum(acc, axis=1)[None, :]
    y_up = tl.sum(up, axis=1)[None, :]
    _finish(y, y_up, rows, cols, M, N, b_ptr, res_ptr, out_ptr, ACT, HAS_B, HAS_RES)


@triton.jit
def rope_store(
    qkv_ptr,  # (n, E, H + 2 H_kv, hd), contiguous: one new position per row
    cos_ptr,  # (n, hd): cos and signed sin at each row's position, in the rotate-half layout
    sin_ptr,
    pos_ptr,  # (n,) each row's position
    q_ptr,  # (n, E*H, hd) out: the rotated queries
    k_ptr,  # (slots, >= E*H_kv, context, hd): the cache, written at [row, head, pos]
    v_ptr,
    context,
    slot_stride,  # elements from one slot of the cache to the next
    H: tl.constexpr,
    HKV: tl.constexpr,
    HD: tl.constexpr,
    BLOCK: tl.constexpr,
    ROTARY: tl.constexpr,
):
    """Split one position's fused qkv into heads: queries to q, keys and values into the cache
    at the row's position, q and k rotated there (when ROTARY). One program per (row, head of
    qkv); the rotation is x cos + roll(x, hd/2) sin, the sign of rotate-half in the sin table."""
    row = tl.program_id(0)
    head = tl.program_id(1)
    E = tl.num_programs(1) // (H + 2 * HKV)
    e = head // (H + 2 * HKV)
    j = head % (H + 2 * HKV)
    i = tl.arange(0, BLOCK)
    ok = i < HD
    src = qkv_ptr + (row * tl.num_programs(1) + head) * HD
    x = tl.load(src + i, mask=ok, other=0.0).to(tl.float32)
    pos = tl.load(pos_ptr + row)
    if ROTARY and j < H + HKV:
        rolled = tl.load(src + (i + HD // 2) % HD, mask=ok, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + row * HD + i, mask=ok, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + row * HD + i, mask=ok, other=0.0).to(tl.float32)
        x = x * c + rolled * s
    if j < H:
        dst = q_ptr + (row * E * H + e * H + j) * HD
        tl.store(dst + i, x.to(q_ptr.dtype.element_ty), mask=ok)
    elif j < H + HKV:
        dst = k_ptr + row * slot_stride + ((e * HKV + j - H) * context + pos) * HD
        tl.store(dst + i, x.to(k_ptr.dtype.element_ty), mask=ok)
    else:
        dst = v_ptr + row * slot_stride + ((e * HKV + j - H - HKV) * context + pos) * HD
        tl.store(dst + i, x.to(v_ptr.dtype.element_ty), mask=ok)


@triton.jit
def decode_attention(
    q_ptr,  # (n, heads * G, hd): one query per row and head, contiguous
    k_ptr,  # (slots, >= heads, context, hd): the cache, from the first head attended
    v_ptr,
    out_ptr,  # (n, heads * G, hd)
    pos_ptr,  # (n,) each row's position: it attends to positions 0..pos
    slot_stride,
    context,
    scale,
    G: tl.constexpr,  # query heads per key/value head (grouped-query attention)
    G_PAD: tl.constexpr,  # G padded to a tensor-core tile's rows
    HD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    PRECISION: tl.constexpr,  # as small_linear's
):
    """One program per (row, key/value head): the G queries that share the head attend over
    the row's cached positions, BLOCK_S at a time, with a running softmax. It reads each
    row's own length, so it costs what the row holds, not the longest row or the context."""
    row = tl.program_id(0)
    kv = tl.program_id(1)
    heads = tl.num_programs(1)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, BLOCK_D)
    q_rows = (row * heads + kv) * G + g
    q_mask = (g < G)[:, None] & (d < HD)[None, :]
    q = tl.load(q_ptr + q_rows[:, None] * HD + d[None, :], mask=q_mask, other=0.0)
    q = (q.to(tl.float32) * scale).to(q.dtype)
    length = tl.load(pos_ptr + row) + 1
    base = row * slot_stride + kv * context * HD
    top = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
    total = tl.zeros([G_PAD], dtype=tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], dtype=tl.float32)
    for s0 in range(0, length, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        kv_mask = (s < length)[:, None] & (d < HD)[None, :]
        at = base + s[:, None] * HD + d[None, :]
        k = tl.load(k_ptr + at, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + at, mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        scores = tl.where((s < length)[None, :], scores, float("-inf"))
        new_top = tl.maximum(top, tl.max(scores, axis=1))
        fade = tl.exp(top - new_top)
        p = tl.exp(scores - new_top[:, None])
        total = total * fade + tl.sum(p, axis=1)
        acc = acc * fade[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        top = new_top
    out = acc / total[:, None]
    tl.store(
        out_ptr + q_rows[:, None] * HD + d[None, :], out.to(out_ptr.dtype.element_ty), mask=q_mask
    )
