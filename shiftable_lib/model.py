"""The model: a causal GPT whose attention in every layer is a gated mixture of named experts.

With no specialists it *is* the generalist (one expert, `general`, no gate work). Adding a
specialist adds one attention branch per layer — a copy of the base attention — and one row per
layer of the gate. Every generalist weight is reused as is; training code freezes them.

Per layer, for position t:  y_t = sum_e g_e(t) * Attn_e(h)_t,   g(t) = softmax(W m_t + b)
where m_t is the normalised mean of the layer input over positions <= t: the gate sees only the
causal prefix, so no position's output depends on a later token.

Each expert owns its gate row (weights and bias). Removing an expert drops its row and the
softmax renormalises over the rest; a new expert's row starts at a logit so low that its weight
is exactly zero, so adding it changes no output until it is trained.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shiftable_lib import kernels
from shiftable_lib.corpus import GENERAL, validate_specialist_name
from shiftable_lib.errors import AlreadyExists, NotFound
from shiftable_lib.sampling import SOFT, Routing

# exp(-1e4) underflows to exactly 0 in fp32/bf16, so an expert at this logit has weight 0.
DORMANT_LOGIT = -1.0e4


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    context: int
    n_layer: int
    n_head: int
    d_model: int
    specialists: tuple[str, ...] = ()
    dropout: float = 0.0  # on embeddings and residual branches, in training only

    @property
    def experts(self) -> tuple[str, ...]:
        """Expert names in gate-column order: the base (`general`) first."""
        return (GENERAL, *self.specialists)

    def to_dict(self) -> dict:
        return {**asdict(self), "specialists": list(self.specialists)}

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        fields["specialists"] = tuple(fields.get("specialists", ()))
        return cls(**fields)


@dataclass(frozen=True)
class RouteTable:
    """Per-row routing of a batch: allowed experts (B, E) and top-k (B,), 0 = soft.

    What the hot loop branches on (one expert for every row? any top-k row? any expert
    excluded?) is worked out from the host-side rows before they go to the device, so no step
    waits on the device to decide.
    """

    allowed: Tensor
    top_k: Tensor
    single: int | None  # the one expert every row is restricted to
    any_topk: bool
    block: Tensor | None  # (B, 1, E): -inf where not allowed; None when every expert is

    @classmethod
    def from_rows(cls, allowed: list[list[bool]], top_k: list[int], device) -> RouteTable:
        first = allowed[0] if allowed else []
        one = sum(first) == 1 and all(row == first for row in allowed)
        allowed_t = torch.tensor(allowed, device=device)
        block = None
        if not all(all(row) for row in allowed):
            block = torch.zeros(allowed_t.shape, device=device)
            block = block.masked_fill(~allowed_t, float("-inf")).unsqueeze(1)
        return cls(
            allowed=allowed_t,
            top_k=torch.tensor(top_k, device=device),
            single=first.index(True) if one else None,
            any_topk=any(k > 0 for k in top_k),
            block=block,
        )

    @classmethod
    def build(cls, experts: tuple[str, ...], routes: list[Routing], device) -> RouteTable:
        return cls.from_rows(
            [r.allowed(experts) for r in routes], [r.top_k() for r in routes], device
        )


class Expert(nn.Module):
    """One attention branch (fused qkv, output projection) and its row of the layer's gate.

    The row scores the causal prefix two ways: a linear read of the mean hidden state (what the
    text is like) and the mean of a learned per-token score (which words it uses: `ndarray`
    against `Tensor` is a token-identity question that a mean of hidden states blurs).
    """

    def __init__(self, d_model: int, vocab_size: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.gate = nn.Parameter(torch.zeros(d_model + 1))  # [w; b]: logit = w . m_t + b + ...
        self.gate_tokens = nn.Parameter(torch.zeros(vocab_size))  # ... mean of u[x_s], s <= t


class MixedAttention(nn.Module):
    """Causal self-attention of every expert at once, mixed by the gate."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.experts = nn.ModuleDict({GENERAL: Expert(cfg.d_model, cfg.vocab_size)})
        self._joined: dict[tuple, tuple[tuple, list[Tensor], Tensor]] = {}

    def joined(self, tensors: list[Tensor], dim: int, stack: bool = False) -> Tensor:
        """Experts' weights side by side (one matmul serves them all).

        Without gradients (serving) the result is kept until any of the tensors changes: the key
        is each tensor's storage and in-place version counter, so an in-place edit, a load or a
        move to another device invalidates it. Fused optimisers update weights without bumping
        the version counter, so training calls `ShiftableLM.weights_changed()` after each step.
        With gradients it is built afresh, so that autograd sees the concatenation.
        """
        if len(tensors) == 1 and not stack:
            return tensors[0]
        join = torch.stack if stack else torch.cat
        if torch.is_grad_enabled():
            return join(tensors, dim)
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        slot = (id(tensors[0]), len(tensors), dim, stack)
        hit = self._joined.get(slot)
        if hit is not None and hit[0] == key:
            return hit[2]
        out = join(tensors, dim)
        self._joined[slot] = (key, tensors, out)  # holding `tensors` keeps their storage alive
        return out

    def gate_features(self, prefix_sum: Tensor, count: Tensor | None = None) -> Tensor:
        """The gate's input at each position: the normalised mean of the causal prefix
        (pass the mean itself, without `count`, where it is already divided)."""
        mean = prefix_sum if count is None else prefix_sum / count
        return F.layer_norm(mean, (mean.shape[-1],))

    def token_scores(self, idx: Tensor) -> Tensor:
        """Every expert's per-token gate score for each token of `idx`: (..., E)."""
        table = self.joined([e.gate_tokens for e in self.experts.values()], 1, stack=True)
        return F.embedding(idx, table)

    def token_evidence(self, idx: Tensor, count: Tensor) -> Tensor:
        """Mean per-token score over the causal prefix, (B, T, E)."""
        return self.token_scores(idx).cumsum(1) / count

    def gate_logits(self, m: Tensor, evidence: Tensor) -> Tensor:
        rows = self.joined([e.gate for e in self.experts.values()], 0, stack=True)  # (E, d+1)
        logits = torch.addmm(rows[:, -1], m.flatten(0, -2), rows[:, :-1].T)
        return logits.view(*m.shape[:-1], -1) + evidence

    def gate(self, m: Tensor, evidence: Tensor, routes: RouteTable) -> Tensor:
        """Gate weights (B, T, E) from gate features, within each row's allowed experts."""
        logits = self.gate_logits(m, evidence)
        if routes.block is not None:
            logits = logits + routes.block
        if routes.any_topk:
            rank = logits.argsort(-1, descending=True).argsort(-1)
            k = routes.top_k[:, None, None]
            logits = logits.masked_fill((k > 0) & (rank >= k), float("-inf"))
        return logits.softmax(-1)

    def qkv(self, h: Tensor, experts: list[Expert]) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v as (B, E*H, T, hd): every expert's heads side by side, one matmul."""
        B, T, d = h.shape
        w = self.joined([e.qkv.weight for e in experts], 0)
        qkv = F.linear(h, w).view(B, T, len(experts), 3, self.n_head, d // self.n_head)
        q, k, v = qkv.permute(3, 0, 2, 4, 1, 5).reshape(3, B, -1, T, d // self.n_head).unbind(0)
        return q, k, v

    def mix(self, heads: Tensor, weights: Tensor | None, experts: list[Expert]) -> Tensor:
        """Project every expert's heads and sum them, weighted: one matmul over [g_e * a_e]."""
        B, _, T, hd = heads.shape
        E = len(experts)
        a = heads.view(B, E, self.n_head, T, hd).permute(0, 3, 1, 2, 4).reshape(B, T, E, -1)
        if weights is not None:
            a = a * weights.unsqueeze(-1).to(a.dtype)
        w = self.joined([e.proj.weight for e in experts], 1)
        return F.linear(a.reshape(B, T, -1), w)


class MLP(nn.Module):
    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model, bias=False)
        self.proj = nn.Linear(4 * d_model, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = MixedAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg.d_model)


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

    def store(self, layer: int, slots: Tensor, heads: slice, k: Tensor, v: Tensor) -> None:
        """Store whole prompts' keys and values (n, H, T, hd) of the cache's `heads` in `slots`,
        at positions 0..T-1."""
        T = k.shape[2]
        for buf, new in ((self.k[layer], k), (self.v[layer], v)):
            if self.position_major:
                buf[slots, :T, heads] = new.transpose(1, 2)
            else:
                buf[slots, heads, :T] = new

    def rows_at(self, pos: Tensor, heads: slice) -> Tensor:
        """Where one new position per slot lands, for slots 0..n-1 at positions `pos` (n,) and
        the cache's `heads`: indices for `write`. One `index_copy_` per layer then writes every
        row's keys: 1.3x faster at 32 slots than indexing the buffer by (slot, head, position),
        which takes a general scatter."""
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


# From this many rows on, PyTorch's decode attention on a CPU runs as two batched matrix
# products rather than the fused kernel, whose fixed cost per (row, head) dominates with one
# query per head. Whole decode steps of the `cpu` model (12 heads, spans up to 136), one thread,
# on the 2-core benchmark machine: 4% faster at 16 rows and 6% at 32, 2.5% slower at 8
# (docs/benchmarks.md). With one thread the compiled loop (`kernels.py`) replaces both.
BATCHED_DECODE_ROWS = 16


def decode_attention(
    q: Tensor, cache: KVCache, layer: int, heads: slice, pos: Tensor, keep: Tensor
) -> Tensor:
    """Attention of one new query per row (n, H, 1, hd) over the cache's `heads` of slots
    0..n-1 up to positions `pos`; `keep` (n, 1, 1, span) is True exactly there."""
    if cache.position_major and kernels.supports(q):
        return kernels.decode_attention(q, cache.k[layer], cache.v[layer], heads, pos)
    n, span = keep.shape[0], keep.shape[-1]
    keys, values = cache.span(layer, n, span, heads)
    if q.device.type != "cpu" or n < BATCHED_DECODE_ROWS:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=keep)
    scores = torch.matmul(q, keys.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
    weights = scores.masked_fill_(~keep, float("-inf")).softmax(-1)
    return torch.matmul(weights.to(values.dtype), values)


def _skip_unused(experts: list[Expert], weights: Tensor) -> tuple[list[Expert], Tensor]:
    """Drop experts that no position of the batch gives any weight (dormant, excluded, or
    outside every top-k): they would add exactly zero, so they are not computed at all."""
    used = (weights.detach().amax(dim=(0, 1)) > 0).tolist()
    if all(used):
        return experts, weights
    keep = [i for i, u in enumerate(used) if u]
    return [experts[i] for i in keep], weights[..., keep]


@dataclass
class Trace:
    """What a forward pass leaves behind besides the hidden states."""

    only: int | None  # the single expert every row used, if the gate was skipped
    hidden: Tensor | None = None
    features: list[Tensor] = field(default_factory=list)  # per layer (B, T, d)
    gates: list[Tensor] = field(default_factory=list)  # per layer (B, T, E)

    def full_gates(self, n_experts: int, n_layers: int) -> list[Tensor]:
        """Gate weights per layer; one-hot where a single expert ran without a gate."""
        if self.only is None:
            return self.gates
        B, T, _ = self.hidden.shape
        one = torch.zeros(B, T, n_experts, device=self.hidden.device)
        one[..., self.only] = 1.0
        return [one] * n_layers


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Tied-head logits and cross-entropy in chunks, the gradient computed in the same pass.

    On a CPU the (tokens x vocab) logits are the largest tensor of a step; a chunk of them
    stays in cache while it is exponentiated, normalised and multiplied back, and is never
    written out whole. Same loss and gradients as linear + F.cross_entropy.
    """

    CHUNK = 512

    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, targets: Tensor) -> Tensor:  # type: ignore[override]
        N = h.shape[0]
        grad_h, grad_w = torch.empty_like(h), torch.zeros_like(w)
        total = h.new_zeros((), dtype=torch.float32)
        for s in range(0, N, FusedLinearCrossEntropy.CHUNK):
            end = min(N, s + FusedLinearCrossEntropy.CHUNK)
            hc, tc = h[s:end], targets[s:end]
            rows = torch.arange(hc.shape[0], device=h.device)
            p = hc @ w.T
            p.sub_(p.amax(-1, keepdim=True)).exp_()
            norm = p.sum(-1, keepdim=True)
            total += norm.log().sum() - p[rows, tc].log().sum()  # -log softmax at the target
            p.div_(norm)
            p[rows, tc] -= 1
            grad_h[s:end] = p @ w
            grad_w.addmm_(p.T, hc)
        ctx.save_for_backward(grad_h, grad_w)
        return total / N

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        scale = grad / grad_h.shape[0]
        return grad_h * scale, grad_w * scale, None


class ShiftableLM(nn.Module):
    """Decoder-only LM: token + position embeddings, pre-norm blocks, tied output head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = replace(cfg, specialists=())
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("proj.weight",)):  # residual projections, as GPT-2
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        for name in cfg.specialists:
            self.add_specialist(name)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def experts(self) -> tuple[str, ...]:
        return self.cfg.experts

    def weights_changed(self) -> None:
        """Forget joined expert weights; call after changing weights behind autograd's back."""
        for block in self.blocks:
            block.attn._joined.clear()

    # ---- growing and shrinking ----------------------------------------------------------------

    def add_specialist(self, name: str) -> None:
        """Add a branch per layer, copied from the base attention, with a dormant gate row.

        Dormant: its gate weight is exactly 0, and its attention equals the base's, so no output
        changes until it is trained (`wake_specialists` gives it a share of the base's weight).
        """
        validate_specialist_name(name)
        if name in self.cfg.specialists:
            raise AlreadyExists(f"specialist {name!r} already exists")
        for block in self.blocks:
            base = block.attn.experts[GENERAL]
            expert = Expert(self.cfg.d_model, self.cfg.vocab_size)
            expert = expert.to(base.qkv.weight.device, base.qkv.weight.dtype)
            expert.load_state_dict(base.state_dict())
            with torch.no_grad():
                expert.gate.zero_()
                expert.gate[-1] = DORMANT_LOGIT
                expert.gate_tokens.zero_()
            block.attn.experts[name] = expert
        self.cfg = replace(self.cfg, specialists=(*self.cfg.specialists, name))
        self.weights_changed()  # joined weights of the old expert set would only hold memory

    def remove_specialist(self, name: str) -> None:
        """Drop the specialist's branch and gate row in every layer; the gate renormalises."""
        if name not in self.cfg.specialists:
            raise NotFound(f"no specialist named {name!r}")
        for block in self.blocks:
            del block.attn.experts[name]
        self.cfg = replace(
            self.cfg, specialists=tuple(s for s in self.cfg.specialists if s != name)
        )
        self.weights_changed()

    @torch.no_grad()
    def wake_specialists(self, names: list[str], split: bool = True) -> None:
        """Give dormant specialists a live gate row: the base's, at a share of its weight.

        With `split`, the base's row gives up that share: exp(b - log n) * n = exp(b), so the
        base's softmax weight is divided among n identical rows whose attention is (before
        training) the base's, and no output changes. Without it (the incremental add) the base
        keeps its row, so the other specialists' balance with the base is exactly as trained.
        """
        share = math.log(len(names) + 1)
        for block in self.blocks:
            experts = block.attn.experts
            row, tokens = experts[GENERAL].gate.clone(), experts[GENERAL].gate_tokens.clone()
            row[-1] -= share
            for name in (GENERAL, *names) if split else names:
                experts[name].gate.copy_(row)
                experts[name].gate_tokens.copy_(tokens)

    # ---- forward ------------------------------------------------------------------------------

    def forward(
        self, idx: Tensor, routing: Routing | list[Routing] = SOFT, return_gates: bool = False
    ) -> tuple[Tensor, list[Tensor] | None]:
        """Logits (B, T, V) for whole sequences starting at position 0; gate weights if asked."""
        trace = self.trunk(idx, routing)
        gates = trace.full_gates(len(self.experts), self.cfg.n_layer) if return_gates else None
        return self.head(trace.hidden), gates

    def loss(self, idx: Tensor, targets: Tensor, routing: Routing | list[Routing] = SOFT) -> Tensor:
        """Mean next-token cross-entropy, without materialising the logits when training."""
        hidden = self.trunk(idx, routing).hidden.flatten(0, 1)
        if torch.is_grad_enabled() and hidden.device.type == "cpu":
            return FusedLinearCrossEntropy.apply(hidden, self.wte.weight, targets.flatten())
        return F.cross_entropy(self.head(hidden).float(), targets.flatten())

    def _drop(self, x: Tensor) -> Tensor:
        p = self.cfg.dropout
        return F.dropout(x, p, training=True) if self.training and p > 0 else x

    def head(self, x: Tensor) -> Tensor:
        return F.linear(x, self.wte.weight)  # tied embeddings

    def trunk(
        self, idx: Tensor, routing: Routing | list[Routing] = SOFT, features_only: bool = False
    ) -> Trace:
        """Final hidden states, and per layer the gate features and weights (if a gate ran).

        With `features_only`, stop once the last layer's gate features are known (no hidden
        states): all that training the gate needs, a layer's worth of work cheaper."""
        B, T = idx.shape
        routes = self._routes(routing, B, idx.device)
        only = routes.single
        x = self._drop(self.wte(idx) + self.wpe(torch.arange(T, device=idx.device)))
        count = torch.arange(1, T + 1, device=idx.device, dtype=x.dtype).view(1, T, 1)
        trace = Trace(only=only)
        for block in self.blocks:
            h = block.ln_1(x)
            if only is None:
                experts = list(block.attn.experts.values())
                m = block.attn.gate_features(h.cumsum(1), count)
                weights = block.attn.gate(m, block.attn.token_evidence(idx, count), routes)
                trace.features.append(m)
                trace.gates.append(weights)
                if features_only and len(trace.features) == len(self.blocks):
                    return trace
                experts, weights = _skip_unused(experts, weights)
            else:  # one allowed expert: no gate to run
                experts, weights = [block.attn.experts[self.experts[only]]], None
            q, k, v = block.attn.qkv(h, experts)
            heads = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self._drop(block.attn.mix(heads, weights, experts))
            x = x + self._drop(block.mlp(block.ln_2(x)))
        trace.hidden = self.ln_f(x)
        return trace

    def _routes(self, routing: Routing | list[Routing], batch: int, device) -> RouteTable:
        routes = [routing] * batch if isinstance(routing, Routing) else routing
        if len(routes) != batch:
            raise ValueError(f"got {len(routes)} routings for a batch of {batch}")
        return RouteTable.build(self.experts, routes, device)

    # ---- incremental decoding -----------------------------------------------------------------

    def new_cache(self, slots: int, device=None, dtype: torch.dtype | None = None) -> KVCache:
        """Preallocate generation state for `slots` sequences of up to `context` tokens."""
        p = self.wte.weight
        device, dtype = device or p.device, dtype or p.dtype
        cfg, E = self.cfg, len(self.experts)
        hd = cfg.d_model // cfg.n_head
        # position-major for the compiled loop: on a CPU, with one torch thread (kernels.py)
        position_major = kernels.supports(torch.empty(0, device=device, dtype=dtype))
        heads, context = E * cfg.n_head, cfg.context
        shape = (slots, context, heads, hd) if position_major else (slots, heads, context, hd)
        return KVCache(
            k=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)],
            v=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)],
            gate_state=[
                torch.zeros(slots, cfg.d_model + E, device=device) for _ in range(cfg.n_layer)
            ],
            lengths=torch.zeros(slots, dtype=torch.long, device=device),
            experts=self.experts,
            position_major=position_major,
        )

    def prefill(
        self, cache: KVCache, slots: Tensor, idx: Tensor, lengths: Tensor, routes: RouteTable
    ) -> tuple[Tensor, Tensor]:
        """Run prompts (right-padded to a common length) into `slots` of the cache.

        Returns the logits at each prompt's last real token (n, V) and the gate weights there
        (L, n, E). Positions past a prompt's length are computed but never attended to.
        """
        self._check_cache(cache)
        n, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        count = torch.arange(1, T + 1, device=idx.device, dtype=x.dtype).view(1, T, 1)
        rows, last = torch.arange(n, device=idx.device), (lengths - 1).clamp_min(0)
        heads, experts = self._cached_heads(routes)
        gates = []
        for i, block in enumerate(self.blocks):
            h = block.ln_1(x)
            weights = None
            if routes.single is None:
                prefix = h.float().cumsum(1)
                tokens = block.attn.token_scores(idx).float().cumsum(1)
                m = block.attn.gate_features(prefix.to(h.dtype), count)
                weights = block.attn.gate(m, tokens.to(h.dtype) / count, routes)
                cache.gate_state[i][slots] = torch.cat([prefix[rows, last], tokens[rows, last]], -1)
                gates.append(weights[rows, last])
            else:  # no gate ran: whatever the slot held before is not this prompt's prefix
                cache.gate_state[i][slots] = 0.0
            layer = [block.attn.experts[e] for e in experts]
            q, k, v = block.attn.qkv(h, layer)
            cache.store(i, slots, heads, k, v)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + block.attn.mix(out, weights, layer)
            x = x + block.mlp(block.ln_2(x))
        cache.lengths[slots] = lengths
        return self.head(self.ln_f(x[rows, last])), self._stack_gates(gates, routes, n)

    def decode(
        self, cache: KVCache, tokens: Tensor, routes: RouteTable, span: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Advance slots 0..n-1 by one token each. Returns logits (n, V) and gates (L, n, E).

        `span` (the longest cached length + 1) lets a caller that tracks lengths on the host
        spare a device sync; without it, it is read from the cache.
        """
        self._check_cache(cache)
        n = tokens.shape[0]
        pos = cache.lengths[:n]
        span = span or int(pos.max()) + 1
        keep = (torch.arange(span, device=tokens.device) <= pos[:, None]).view(n, 1, 1, span)
        x = (self.wte(tokens) + self.wpe(pos)).unsqueeze(1)  # (n, 1, d)
        count, d = (pos + 1).float().view(n, 1), self.cfg.d_model
        heads, experts = self._cached_heads(routes)
        rows = cache.rows_at(pos, heads)
        gates = []
        for i, block in enumerate(self.blocks):
            h = block.ln_1(x)
            weights = None
            if routes.single is None:
                state = cache.gate_state[i][:n]
                state += torch.cat([h[:, 0].float(), block.attn.token_scores(tokens).float()], -1)
                mean = (state / count).to(h.dtype).unsqueeze(1)
                m = block.attn.gate_features(mean[..., :d])
                weights = block.attn.gate(m, mean[..., d:], routes)
                gates.append(weights[:, 0])
            layer = [block.attn.experts[e] for e in experts]
            q, k, v = block.attn.qkv(h, layer)
            cache.write(i, rows, heads, k, v)
            out = decode_attention(q, cache, i, heads, pos, keep)
            x = x + block.attn.mix(out, weights, layer)
            x = x + block.mlp(block.ln_2(x))
        cache.lengths[:n] += 1
        return self.head(self.ln_f(x[:, 0])), self._stack_gates(gates, routes, n)

    def _cached_heads(self, routes: RouteTable) -> tuple[slice, list[str]]:
        """Which heads of the cache this batch computes, and for which experts.

        When every row is restricted to one expert, only that expert's heads are computed and
        cached: those rows never attend with any other expert, so nothing else is needed.
        """
        H = self.cfg.n_head
        if routes.single is None:
            return slice(0, H * len(self.experts)), list(self.experts)
        e = routes.single
        return slice(e * H, (e + 1) * H), [self.experts[e]]

    def _stack_gates(self, gates: list[Tensor], routes: RouteTable, n: int) -> Tensor:
        if gates:
            return torch.stack(gates)
        one = torch.zeros(self.cfg.n_layer, n, len(self.experts), device=self.wte.weight.device)
        one[..., routes.single] = 1.0
        return one

    def _check_cache(self, cache: KVCache) -> None:
        if cache.experts != self.experts:
            raise ValueError("this cache was made for other experts; make a new one")
