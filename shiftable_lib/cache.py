"""Generation state: a static KV cache per slot, and the two passes that fill and read it.

`Prefill` runs whole prompts into free slots; `Decode` advances every active slot by one
token. Both are `model.Step`s: what `ShiftableLM`'s layers call where a pass over whole
sequences uses cumulative sums and causal attention. Here the gate's prefix means come from
each slot's running sums, keys and values go into the cache, and decoding attends over it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from shiftable_lib import fused, kernels
from shiftable_lib.routing import RouteTable

# From this many rows on, PyTorch's decode attention on a CPU runs as two batched matrix
# products rather than the fused kernel, whose fixed cost per (row, head) dominates with one
# query per head; with fewer rows the fused kernel is the faster (docs/benchmarks.md). With
# one thread the compiled loop (`kernels.py`) replaces both.
BATCHED_DECODE_ROWS = 16


@dataclass
class KVCache:
    """Static per-slot generation state: every expert's keys/values and each gate's prefix sum.

    Slots 0..n-1 are the active sequences of a batch; `lengths[s]` tokens of slot s are cached.
    Keys and values are laid out head-major, (slots, E*H, context, hd), for PyTorch's attention;
    or position-major, (slots, context, E*H, hd), for the compiled single-thread CPU loop
    (`kernels.py`), which then reads a row's keys for every head as one block.
    """

    k: list[Tensor]  # per layer, in the layout above
    v: list[Tensor]
    # per layer (slots, d + E): sums over the prefix of the layer input (first d) and of the
    # per-token gate scores (last E), kept together so that one update serves both
    gate_state: list[Tensor]
    lengths: Tensor  # (slots,)
    experts: tuple[str, ...] = field(default=())
    position_major: bool = False

    @classmethod
    def allocate(
        cls,
        slots: int,
        experts: tuple[str, ...],
        n_layer: int,
        kv_heads: int,
        head_dim: int,
        d_model: int,
        context: int,
        device,
        dtype: torch.dtype,
    ) -> KVCache:
        """Every slot empty, in the layout that decoding on `device` in `dtype` reads fastest:
        position-major for the compiled loop (on a CPU, with one torch thread). Each expert
        keeps `kv_heads` heads of keys and values (fewer than its query heads, with grouped-
        query attention) of `head_dim` each."""
        E, hd = len(experts), head_dim
        position_major = kernels.supports(torch.empty(0, device=device, dtype=dtype))
        heads = E * kv_heads
        shape = (slots, context, heads, hd) if position_major else (slots, heads, context, hd)
        return cls(
            k=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)],
            v=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)],
            gate_state=[torch.zeros(slots, d_model + E, device=device) for _ in range(n_layer)],
            lengths=torch.zeros(slots, dtype=torch.long, device=device),
            experts=experts,
            position_major=position_major,
        )

    @property
    def slots(self) -> int:
        return self.lengths.shape[0]

    @property
    def context(self) -> int:
        return self.k[0].shape[1 if self.position_major else 2]

    def reset(self) -> None:
        """Every slot empty (what a new cache holds)."""
        for buf in (*self.k, *self.v, *self.gate_state, self.lengths):
            buf.zero_()

    def move(self, src: int, dst: int) -> None:
        """Copy slot `src` into `dst` (to keep active slots contiguous when one finishes)."""
        for buf in (*self.k, *self.v, *self.gate_state):
            buf[dst] = buf[src]
        self.lengths[dst] = self.lengths[src]

    def heads_for(self, routes: RouteTable) -> slice:
        """Which heads of the cache a batch computes: every expert's, or, when every row is
        restricted to one expert, only that expert's. Those rows never attend with any other
        expert, so nothing else is needed."""
        all_heads = self.k[0].shape[2 if self.position_major else 1]
        if routes.single is None:
            return slice(0, all_heads)
        H = all_heads // len(self.experts)
        return slice(routes.single * H, (routes.single + 1) * H)

    def store(
        self, layer: int, slots: Tensor, heads: slice, k: Tensor, v: Tensor, start: int = 0
    ) -> None:
        """Store prompts' keys and values (n, H, T, hd) of the cache's `heads` in `slots`, at
        positions start..start+T-1."""
        at = slice(start, start + k.shape[2])
        for buf, new in ((self.k[layer], k), (self.v[layer], v)):
            if self.position_major:
                buf[slots, at, heads] = new.transpose(1, 2)
            else:
                buf[slots, heads, at] = new

    def prefix(self, layer: int, slots: Tensor, end: int, heads: slice) -> tuple[Tensor, Tensor]:
        """Keys and values of `slots`, positions 0..end-1: (n, H, end, hd)."""
        k, v = self.k[layer], self.v[layer]
        if self.position_major:
            return k[slots, :end, heads].transpose(1, 2), v[slots, :end, heads].transpose(1, 2)
        return k[slots, heads, :end], v[slots, heads, :end]

    def rows_at(self, pos: Tensor, heads: slice) -> Tensor:
        """Where one new position per slot lands, for slots 0..n-1 at positions `pos` (n,) and
        the cache's `heads`: indices for `write`. One `index_copy_` per layer then writes every
        row's keys, where indexing the buffer by (slot, head, position) would take a general
        scatter."""
        slot = torch.arange(pos.shape[0], device=pos.device)
        if self.position_major:  # into (slots * context, E*H, hd)
            return slot * self.context + pos
        head = torch.arange(heads.start, heads.stop, device=pos.device)  # (slots*E*H*context, hd)
        return ((slot[:, None] * self.k[0].shape[1] + head) * self.context + pos[:, None]).flatten()

    def write(self, layer: int, rows: Tensor, heads: slice, k: Tensor, v: Tensor) -> None:
        """Store one position's keys and values (n, H, 1, hd) of the cache's `heads` at `rows`
        (from `rows_at`)."""
        n, hd = k.shape[0], k.shape[-1]
        for buf, new in ((self.k[layer], k), (self.v[layer], v)):
            if self.position_major:
                rows_of = buf.view(-1, *buf.shape[2:])[:, heads]
                rows_of.index_copy_(0, rows, new.reshape(n, -1, hd))
            else:
                buf.view(-1, hd).index_copy_(0, rows, new.reshape(-1, hd))

    def span(self, layer: int, n: int, span: int, heads: slice) -> tuple[Tensor, Tensor]:
        """Keys and values of slots 0..n-1, positions 0..span-1: views (n, H, span, hd)."""
        k, v = self.k[layer], self.v[layer]
        if self.position_major:
            return k[:n, :span, heads].transpose(1, 2), v[:n, :span, heads].transpose(1, 2)
        return k[:n, heads, :span], v[:n, heads, :span]


def attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False
) -> Tensor:
    """SDPA, with as many or fewer key/value heads than query heads (each key/value head then
    serves a group of consecutive query heads, as grouped-query attention does)."""
    grouped = k.shape[-3] != q.shape[-3]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=grouped
    )


def visible(pos: Tensor, span: int, dtype: torch.dtype) -> Tensor:
    """The additive attention mask of one query per row at positions `pos` (n,) over `span`
    cached positions: 0 up to each row's position, -inf past it, (n, 1, 1, span). Made once a
    step: given a boolean mask, SDPA would turn it into this in every layer."""
    seen = torch.arange(span, device=pos.device) <= pos[:, None]
    mask = torch.zeros(seen.shape, dtype=dtype, device=pos.device).masked_fill_(~seen, -math.inf)
    return mask.view(-1, 1, 1, span)


def decode_attention(
    q: Tensor, cache: KVCache, layer: int, heads: slice, pos: Tensor, mask: Tensor
) -> Tensor:
    """Attention of one new query per row (n, H, 1, hd) over the cache's `heads` of slots
    0..n-1 up to positions `pos`; `mask` (n, 1, 1, span) is `visible`'s.

    With grouped-query attention the cache holds fewer heads than the queries: each of its
    heads serves G consecutive query heads, which are then that head's G query rows (one
    position each), so every path below reads each key and value once."""
    if cache.position_major and kernels.supports(q):
        return kernels.decode_attention(q, cache.k[layer], cache.v[layer], heads, pos)
    n, H, _, hd = q.shape
    span = mask.shape[-1]
    keys, values = cache.span(layer, n, span, heads)
    q = q.view(n, keys.shape[1], -1, hd)  # (n, H_kv, G, hd)
    if q.device.type != "cpu" or n < BATCHED_DECODE_ROWS:
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask.to(q.dtype))
    else:
        scores = torch.matmul(q, keys.transpose(-1, -2)).mul_(hd**-0.5)
        weights = scores.add_(mask).softmax(-1)
        out = torch.matmul(weights.to(values.dtype), values)
    return out.reshape(n, H, 1, hd)  # a strided result on some paths (float32 on a GPU)


class Prefill:
    """Prompts, right-padded to a common length T, into `slots` of the cache: keys and values
    go to positions start..start+T-1, and each layer's prefix sums at a prompt's last real token
    become its slot's gate state. Positions past a prompt's length are computed but never
    attended to.

    With `start` > 0 the tokens continue prompts whose first `start` tokens are cached already
    (a long prompt prefilled a chunk per step): their gate sums go on from the slots' state and
    they attend over the cached prefix too. Every row then continues from the same `start`.
    """

    dropout = 0.0
    skip_unused = False  # a cache holds every expert's keys: later tokens may weigh any of them
    fused = False
    rotary: tuple[Tensor, Tensor] | None = None  # set by the model, at the prompts' positions

    def __init__(
        self,
        cache: KVCache,
        slots: Tensor,
        idx: Tensor,
        lengths: Tensor,
        routes: RouteTable,
        dtype: torch.dtype,
        start: int = 0,
    ) -> None:
        n, T = idx.shape
        self.cache, self.slots, self.idx, self.routes = cache, slots, idx, routes
        self.start = start
        count = torch.arange(start + 1, start + T + 1, device=idx.device, dtype=dtype)
        self.count = count.view(1, T, 1)
        self.rows, self.last = torch.arange(n, device=idx.device), (lengths - 1).clamp_min(0)
        self.heads = cache.heads_for(routes)
        self.gates: list[Tensor] = []  # per layer (n, E), at each prompt's last token
        if routes.single is not None and not start:  # no gate runs: what the slots held is
            for state in cache.gate_state:  # no prompt's prefix
                state[slots] = 0.0

    def prefix_means(self, layer: int, h: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
        # summed in float32, as decoding goes on adding to the sums one token at a time
        prefix, tokens = h.float().cumsum(1), scores.float().cumsum(1)
        if self.start:  # the sums go on from the cached part of the prompt
            state = self.cache.gate_state[layer][self.slots].unsqueeze(1)
            d = h.shape[-1]
            prefix, tokens = prefix + state[..., :d], tokens + state[..., d:]
        at_last = torch.cat([prefix[self.rows, self.last], tokens[self.rows, self.last]], -1)
        self.cache.gate_state[layer][self.slots] = at_last
        return prefix.to(h.dtype) / self.count, tokens.to(h.dtype) / self.count

    def gated(self, m: Tensor, weights: Tensor) -> None:
        self.gates.append(weights[self.rows, self.last])

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        self.cache.store(layer, self.slots, self.heads, k, v, self.start)
        if not self.start:
            return attention(q, k, v, causal=True)
        T, end = q.shape[2], self.start + q.shape[2]
        keys, values = self.cache.prefix(layer, self.slots, end, self.heads)
        # query i (at position start + i) sees every key up to its own position
        seen = (
            torch.arange(end, device=q.device)
            <= self.start + torch.arange(T, device=q.device)[:, None]
        )
        return attention(q, keys, values, mask=seen)


def fuses(cache: KVCache, tokens: Tensor) -> bool:
    """Whether a decode step of these tokens runs the fused kernels (`fused.py`): then it
    attends over each row's own cached length, whatever span the caller gives."""
    return not cache.position_major and fused.applies(tokens, tokens.shape[0])


class Decode:
    """One new token for each of slots 0..n-1: the gate's prefix sums grow by that token,
    its keys and values are written at the slot's length, and it attends over the cache.

    Nothing here reads a value back from the device, so that the step can be captured in a
    CUDA graph (`generate.DecodeGraphs`); the one exception is `span` (the longest cached
    length + 1), read from the cache only when the caller does not pass it.
    """

    dropout = 0.0
    skip_unused = False  # a cache holds every expert's keys: later tokens may weigh any of them
    rotary: tuple[Tensor, Tensor] | None = None  # set by the model, at the new positions

    def __init__(
        self, cache: KVCache, tokens: Tensor, routes: RouteTable, span: int | None
    ) -> None:
        n = tokens.shape[0]
        self.cache, self.idx, self.routes = cache, tokens, routes
        self.pos = cache.lengths[:n]
        self.count = (self.pos + 1).float().view(n, 1)
        self.heads = cache.heads_for(routes)
        # on a GPU, few rows: the layers run the fused kernels, which write the cache and
        # attend over each row's own length themselves
        self.fused = fuses(cache, tokens)
        self.mask: Tensor | None = None
        if not self.fused:
            span = span or int(self.pos.max()) + 1
            self.mask = visible(self.pos, span, cache.k[0].dtype)
        self.rows = None if self.fused else cache.rows_at(self.pos, self.heads)
        self.gates: list[Tensor] = []  # per layer (n, E)

    def prefix_means(self, layer: int, h: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
        state = self.cache.gate_state[layer][: h.shape[0]]
        state += torch.cat([h[:, 0].float(), scores.float()], -1)
        mean = (state / self.count).to(h.dtype).unsqueeze(1)
        d = h.shape[-1]
        return mean[..., :d], mean[..., d:]

    def gated(self, m: Tensor, weights: Tensor) -> None:
        self.gates.append(weights[:, 0])

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        self.cache.write(layer, self.rows, self.heads, k, v)
        return decode_attention(q, self.cache, layer, self.heads, self.pos, self.mask)

    def attend_fused(self, layer: int, qkv: Tensor, experts: int) -> Tensor:
        k, v = self.cache.k[layer], self.cache.v[layer]
        kv_heads = (self.heads.stop - self.heads.start) // experts
        q_heads = qkv.shape[-1] // (experts * k.shape[-1]) - 2 * kv_heads
        first = self.heads.start
        q = fused.rope_store(qkv, experts, q_heads, kv_heads, self.rotary, self.pos, k, v, first)
        return fused.attend(q, k, v, self.pos, experts * kv_heads, first)
