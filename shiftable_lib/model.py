"""The model: a causal GPT whose attention in every layer is a gated mixture of named experts.

With no specialists it *is* the generalist (one expert, `general`, no gate work). Adding a
specialist adds one attention branch per layer — a copy of the base attention, or a low-rank
delta on it (`ModelConfig.branch_rank`) — and one row per layer of the gate. Every generalist
weight is reused as is; training code freezes them.

Per layer, for position t:  y_t = sum_e g_e(t) * Attn_e(h)_t,   g(t) = softmax(W m_t + b)
where m_t is the normalised mean of the layer input over positions <= t: the gate sees only the
causal prefix, so no position's output depends on a later token.

Each expert owns its gate row (weights and bias). Removing an expert drops its row and the
softmax renormalises over the rest; a new expert's row starts at a logit so low that its weight
is exactly zero, so adding it changes no output until it is trained.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass, field, replace
from typing import Literal, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shiftable_lib import fused
from shiftable_lib.cache import Decode, KVCache, Prefill, attention
from shiftable_lib.corpus import GENERAL, validate_specialist_name
from shiftable_lib.errors import AlreadyExists, NotFound
from shiftable_lib.losses import FusedLinearCrossEntropy
from shiftable_lib.routing import RouteTable
from shiftable_lib.sampling import SOFT, Routing

# exp(-1e4) underflows to exactly 0 in fp32/bf16, so an expert at this logit has weight 0.
DORMANT_LOGIT = -1.0e4


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a model. The defaults are the from-scratch GPT (LayerNorm, learned
    positions, GELU, biases only in the norms, tied head); an imported model sets what its
    family does differently (`shiftable_lib.pretrained`)."""

    vocab_size: int
    context: int
    n_layer: int
    n_head: int
    d_model: int
    specialists: tuple[str, ...] = ()
    dropout: float = 0.0  # on embeddings and residual branches, in training only
    n_kv_head: int = 0  # key/value heads (grouped-query attention); 0 = n_head
    d_ff: int = 0  # the MLP's hidden width; 0 = 4 * d_model
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    positions: Literal["learned", "rope"] = "learned"
    rope_theta: float = 10000.0
    mlp: Literal["gelu", "swiglu"] = "gelu"  # gelu: tanh-approximated, as GPT-2
    qkv_bias: bool = False
    proj_bias: bool = False  # the attention's output projection
    mlp_bias: bool = False
    tied: bool = True  # the output head is the token embedding
    # a specialist's q/k/v and output projections: 0 = its own copies of the base's; r > 0 = the
    # base's plus a trained rank-r delta B A, and the base's biases (docs/benchmarks.md compares)
    branch_rank: int = 0

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} is not a multiple of n_head {self.n_head}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.kv_heads}")
        if not 0 <= self.branch_rank <= self.d_model:
            raise ValueError(f"branch_rank {self.branch_rank} is not in [0, d_model]")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head size, not {self.head_dim}")

    @property
    def experts(self) -> tuple[str, ...]:
        """Expert names in gate-column order: the base (`general`) first."""
        return (GENERAL, *self.specialists)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def qkv_width(self) -> int:
        """Rows of an expert's fused qkv projection: the query, then key, then value heads."""
        return (self.n_head + 2 * self.kv_heads) * self.head_dim

    @property
    def hidden(self) -> int:
        return self.d_ff or 4 * self.d_model

    def to_dict(self) -> dict:
        return {**asdict(self), "specialists": list(self.specialists)}

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        fields["specialists"] = tuple(fields.get("specialists", ()))
        return cls(**fields)


class Step(Protocol):
    """One call of the model, as each layer sees it. The kinds differ only in where a gate's
    prefix means come from, where keys and values go, and what attention reads: whole
    sequences (`Sequences`, below), or over a KV cache, prompts (`cache.Prefill`) and one new
    token per sequence (`cache.Decode`)."""

    idx: Tensor  # the tokens whose per-token gate scores enter the prefix means
    routes: RouteTable
    dropout: float  # on embeddings and residual branches: 0 unless training
    skip_unused: bool  # whether experts that no position weighs may go uncomputed
    fused: bool  # whether the layers run the fused decode kernels, and call `attend_fused`

    def prefix_means(self, layer: int, h: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
        """Means over each position's prefix of the layer input and of the token scores."""

    def gated(self, m: Tensor, weights: Tensor) -> None:
        """Take note of a layer's gate features and weights."""

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Each head's attention output for queries q, given the new positions' k and v (with
        grouped-query attention, fewer heads of k and v than of q)."""

    def attend_fused(self, layer: int, qkv: Tensor, experts: int) -> Tensor:
        """What `attend` returns, given the fused qkv projection (n, 1, E * (H + 2 H_kv) * hd)
        of `experts` experts, unrotated: called only where `fused`."""

    # cos and signed sin (`rotary_table`) at the new positions, shaped to broadcast over the
    # fused qkv's (B, T, E, heads, hd): (T, 1, 1, hd), or (B, 1, 1, 1, hd) for one per row
    rotary: tuple[Tensor, Tensor] | None


class Expert(nn.Module):
    """One attention branch (fused qkv, output projection) and its row of the layer's gate.

    With `rank` > 0 the branch holds no projections of its own: each is the base expert's plus
    a rank-`rank` delta, W = W0 + B A (`qkv_b` `qkv_a`, `proj_b` `proj_a`), with the base's
    biases. B starts at zero, so a new branch is the base until it is trained.

    The row scores the causal prefix two ways: a linear read of the mean hidden state (what the
    text is like) and the mean of a learned per-token score (which words it uses: `ndarray`
    against `Tensor` is a token-identity question that a mean of hidden states blurs).
    """

    def __init__(self, cfg: ModelConfig, rank: int = 0) -> None:
        super().__init__()
        d, width = cfg.d_model, cfg.qkv_width
        self.rank = rank
        if rank:
            self.qkv_a = nn.Parameter(torch.zeros(rank, d))
            self.qkv_b = nn.Parameter(torch.zeros(width, rank))
            self.proj_a = nn.Parameter(torch.zeros(rank, d))
            self.proj_b = nn.Parameter(torch.zeros(d, rank))
        else:
            self.qkv = nn.Linear(d, width, bias=cfg.qkv_bias)
            self.proj = nn.Linear(d, d, bias=cfg.proj_bias)
        self.gate = nn.Parameter(torch.zeros(d + 1))  # [w; b]: logit = w . m_t + b + ...
        self.gate_tokens = nn.Parameter(torch.zeros(cfg.vocab_size))  # ... mean of u[x_s], s <= t


class MixedAttention(nn.Module):
    """Causal self-attention of every expert at once, mixed by the gate."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.kv_heads, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.qkv_bias, self.proj_bias = cfg.qkv_bias, cfg.proj_bias
        self.experts = nn.ModuleDict({GENERAL: Expert(cfg)})
        self._joined: dict[tuple, tuple[tuple, list[Tensor], Tensor]] = {}

    def forward(self, h: Tensor, step: Step, layer: int) -> Tensor:
        experts, weights = self.route(h, step, layer)
        q, k, v = self.qkv(h, experts, step.rotary)
        return self.mix(step.attend(layer, q, k, v), weights, experts)

    def fused_residual(self, x: Tensor, norm: nn.Module, step: Step, layer: int) -> Tensor:
        """x + forward(norm(x)), for a decode step that runs the fused kernels (`fused.py`):
        the heads' split, rotation and cache write are one kernel; with one expert (no gate
        reads the normalised input) the norm rides in the qkv product, and the residual add
        in the output projection's."""
        if step.routes.single is not None:
            experts, weights = [list(self.experts.values())[step.routes.single]], None
            w, b = self.projection(experts, "qkv")
            qkv = fused.linear(x, w, b, norm=norm)
        else:
            h = norm(x)
            experts, weights = self.route(h, step, layer)
            qkv = F.linear(h, *self.projection(experts, "qkv"))
        heads = step.attend_fused(layer, qkv, len(experts))
        if weights is None:
            w, b = self.projection(experts, "proj")
            bias = None if b is None else b[0]
            return fused.linear(heads.view(x.shape), w, bias, residual=x)
        return x + self.mix(heads, weights, experts)

    def route(self, h: Tensor, step: Step, layer: int) -> tuple[list[Expert], Tensor | None]:
        """The experts a step computes, and their gate weights (None: one expert, no gate)."""
        experts = list(self.experts.values())
        weights = self.weigh(h, step, layer)
        if weights is None:  # one allowed expert: it alone runs
            experts = [experts[step.routes.single]]
        elif step.skip_unused:
            experts, weights = _skip_unused(experts, weights)
        return experts, weights

    def projection(
        self, experts: list[Expert], kind: Literal["qkv", "proj"]
    ) -> tuple[Tensor, Tensor | None]:
        """The experts' `kind` weights side by side, what one matmul over every expert's heads
        needs, and their biases: for qkv side by side too; for the output projection stacked
        (E, d), as each expert's is weighed by its gate (`mix`)."""
        w = self.joined(self.weights(experts, kind), 0 if kind == "qkv" else 1)
        if not (self.qkv_bias if kind == "qkv" else self.proj_bias):
            return w, None
        return w, self.joined(self.biases(experts, kind), 0, stack=kind == "proj")

    def weigh(self, h: Tensor, step: Step, layer: int) -> Tensor | None:
        """Gate weights (..., T, E) within each row's allowed experts; None where every row is
        restricted to one expert, as no gate is needed then."""
        if step.routes.single is not None:
            return None
        mean, evidence = step.prefix_means(layer, h, self.token_scores(step.idx))
        m = F.layer_norm(mean, (mean.shape[-1],))
        weights = self.gate(m, evidence, step.routes)
        step.gated(m, weights)
        return weights

    def joined(self, tensors: list[Tensor | Delta], dim: int, stack: bool = False) -> Tensor:
        """Experts' weights side by side (one matmul serves them all); a low-rank branch's
        weight is given as its `Delta` (W0, B, A) and made here, W0 + B A.

        Without gradients (serving) the result is kept until any of the tensors changes: the key
        is each tensor's storage and in-place version counter, so an in-place edit, a load or a
        move to another device invalidates it. Fused optimisers update weights without bumping
        the version counter, so training calls `ShiftableLM.weights_changed()` after each step.
        With gradients it is built afresh, so that autograd sees the concatenation.
        """
        if len(tensors) == 1 and not stack and isinstance(tensors[0], Tensor):
            return tensors[0]
        if torch.is_grad_enabled():
            return _join([_made(t) for t in tensors], dim, stack)
        sources = [s for t in tensors for s in ((t,) if isinstance(t, Tensor) else t)]
        key = tuple((t.data_ptr(), t._version) for t in sources)
        slot = (dim, stack, *map(id, sources))
        hit = self._joined.get(slot)
        if hit is not None and hit[0] == key:
            return hit[2]
        out = _join([_made(t) for t in tensors], dim, stack)
        self._joined[slot] = (key, sources, out)  # holding `sources` keeps their storage alive
        return out

    def weights(self, experts: list[Expert], kind: Literal["qkv", "proj"]) -> list[Tensor | Delta]:
        """Each expert's `kind` projection weight: its own, or the base's with its delta."""
        base = getattr(self.experts[GENERAL], kind).weight
        return [
            Delta(base, getattr(e, f"{kind}_b"), getattr(e, f"{kind}_a"))
            if e.rank
            else getattr(e, kind).weight
            for e in experts
        ]

    def biases(self, experts: list[Expert], kind: Literal["qkv", "proj"]) -> list[Tensor]:
        """Each expert's `kind` projection bias: its own, or (a low-rank branch) the base's."""
        base = getattr(self.experts[GENERAL], kind).bias
        return [base if e.rank else getattr(e, kind).bias for e in experts]

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

    def qkv(
        self, h: Tensor, experts: list[Expert], rotary: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """q as (B, E*H, T, hd) and k, v as (B, E*H_kv, T, hd): every expert's heads side by
        side, one matmul; with `rotary`, q and k rotated to their positions."""
        B, T, _ = h.shape
        E, H, Hkv, hd = len(experts), self.n_head, self.kv_heads, self.head_dim
        qkv = F.linear(h, *self.projection(experts, "qkv"))
        if Hkv == H and rotary is None:  # one permute serves all three
            qkv = qkv.view(B, T, E, 3, H, hd).permute(3, 0, 2, 4, 1, 5)
            q, k, v = qkv.reshape(3, B, E * H, T, hd).unbind(0)
            return q, k, v
        qkv = qkv.view(B, T, E, H + 2 * Hkv, hd)
        q, k, v = qkv.split([H, Hkv, Hkv], dim=3)
        if rotary is not None:  # q and k lie side by side: rotated together
            q, k = rotate(qkv[..., : H + Hkv, :], *rotary).split([H, Hkv], dim=3)
        q = q.permute(0, 2, 3, 1, 4).reshape(B, E * H, T, hd)
        k = k.permute(0, 2, 3, 1, 4).reshape(B, E * Hkv, T, hd)
        v = v.permute(0, 2, 3, 1, 4).reshape(B, E * Hkv, T, hd)
        return q, k, v

    def mix(self, heads: Tensor, weights: Tensor | None, experts: list[Expert]) -> Tensor:
        """Project every expert's heads and sum them, weighted: one matmul over [g_e * a_e]
        (and the output biases, weighted alike)."""
        B, _, T, hd = heads.shape
        E = len(experts)
        a = heads.view(B, E, self.n_head, T, hd).permute(0, 3, 1, 2, 4).reshape(B, T, E, -1)
        if weights is not None:
            a = a * weights.unsqueeze(-1).to(a.dtype)
        w, b = self.projection(experts, "proj")
        out = F.linear(a.reshape(B, T, -1), w)
        if b is not None:
            out = out + (b[0] if weights is None else weights.to(out.dtype) @ b)
        return out


class Delta(NamedTuple):
    """A low-rank branch's projection weight, W0 + B A, as its parts."""

    base: Tensor
    b: Tensor
    a: Tensor


def _made(weight: Tensor | Delta) -> Tensor:
    if isinstance(weight, Tensor):
        return weight
    return weight.base + (weight.b @ weight.a).to(weight.base.dtype)


def _join(tensors: list[Tensor], dim: int, stack: bool) -> Tensor:
    if stack:
        return torch.stack(tensors, dim)
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)


class MLP(nn.Module):
    """GELU (GPT-2's, tanh-approximated) or SwiGLU, whose gate and up projections are the two
    halves of `fc`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        width = 2 * cfg.hidden if self.swiglu else cfg.hidden
        self.fc = nn.Linear(cfg.d_model, width, bias=cfg.mlp_bias)
        self.proj = nn.Linear(cfg.hidden, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        # the weights, not the Linear modules, are called: a small model's decode step is bound
        # by the cost of each Python-level call, not by its arithmetic
        h = F.linear(x, self.fc.weight, self.fc.bias)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return F.linear(h, self.proj.weight, self.proj.bias)

    def fused_residual(self, x: Tensor, norm: nn.Module) -> Tensor:
        """x + forward(norm(x)) in two kernels (`fused.py`): the norm, the first product and
        the activation; the second product and the residual add."""
        act = "swiglu" if self.swiglu else "gelu_tanh"
        h = fused.linear(x, self.fc.weight, self.fc.bias, norm=norm, act=act)
        return fused.linear(h, self.proj.weight, self.proj.bias, residual=x)


def norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


def rotary_table(cfg: ModelConfig) -> tuple[Tensor, Tensor]:
    """cos and signed sin of every position's rotation angles (context, hd), in the
    rotate-half layout (Hugging Face's): pair i is the coordinates i and i + hd/2, turned by
    the same angle. The sin of the first half is negated, for `rotate`."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    angles = torch.outer(torch.arange(cfg.context, dtype=torch.float64), inv_freq)
    sin = angles.sin()
    return torch.cat([angles, angles], -1).cos().float(), torch.cat([-sin, sin], -1).float()


def rotate(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """Rotary position embedding of x (..., hd): x cos + rotate_half(x) sin, where
    rotate_half(x) = [-x2, x1] is x rolled by half a head with the sign in the table (three
    kernels, where slicing and concatenating take six)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), signed_sin)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = norm(cfg)
        self.attn = MixedAttention(cfg)
        self.ln_2 = norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, step: Step, layer: int) -> Tensor:
        if step.fused:  # one token per row on a GPU: fewer, fused kernels (`fused.py`)
            x = self.attn.fused_residual(x, self.ln_1, step, layer)
            return self.mlp.fused_residual(x, self.ln_2)
        x = x + _dropout(self.attn(self.ln_1(x), step, layer), step.dropout)
        return x + _dropout(self.mlp(self.ln_2(x)), step.dropout)


def _dropout(x: Tensor, p: float) -> Tensor:
    return F.dropout(x, p, training=True) if p > 0 else x


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


class Sequences:
    """Whole sequences from position 0 (training, evaluation, `forward`): prefix means as
    cumulative sums, causal attention within each sequence, every gate kept in a `Trace`."""

    skip_unused = True  # nothing is cached, so an expert no position weighs is not needed
    fused = False

    def __init__(
        self,
        idx: Tensor,
        routes: RouteTable,
        dropout: float,
        dtype: torch.dtype,
        rotary: tuple[Tensor, Tensor] | None,
    ):
        T = idx.shape[1]
        self.idx, self.routes, self.dropout, self.rotary = idx, routes, dropout, rotary
        self.count = torch.arange(1, T + 1, device=idx.device, dtype=dtype).view(1, T, 1)
        self.trace = Trace(only=routes.single)

    def prefix_means(self, layer: int, h: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
        return h.cumsum(1) / self.count, scores.cumsum(1) / self.count

    def gated(self, m: Tensor, weights: Tensor) -> None:
        self.trace.features.append(m)
        self.trace.gates.append(weights)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return attention(q, k, v, causal=True)


class ShiftableLM(nn.Module):
    """Decoder-only LM: token embeddings, learned or rotary positions, pre-norm blocks, a tied
    or separate output head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = replace(cfg, specialists=())
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.context, cfg.d_model) if cfg.positions == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = norm(cfg)
        self.lm_head = None if cfg.tied else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.positions == "rope":  # recomputed, never saved: a checkpoint holds weights only
            cos, sin = rotary_table(cfg)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # residual projections, as GPT-2
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        for name in cfg.specialists:
            self.add_specialist(name)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def experts(self) -> tuple[str, ...]:
        return self.cfg.experts

    def weights_changed(self) -> None:
        """Forget joined expert weights; call after changing weights behind autograd's back."""
        for block in self.blocks:
            block.attn._joined.clear()

    # ---- growing and shrinking ----------------------------------------------------------------

    def add_specialist(self, name: str) -> None:
        """Add a branch per layer, copied from the base attention (or a low-rank delta on it
        that is zero), with a dormant gate row.

        Dormant: its gate weight is exactly 0, and its attention equals the base's, so no output
        changes until it is trained (`wake_specialists` gives it a share of the base's weight).
        A delta's A starts random (from the name, so that an add is reproducible) and its B at
        zero: B's gradient is then not zero, and training moves it.
        """
        # checked here too: names also arrive from a version's config.json, and `general`
        # would replace the base's branch
        validate_specialist_name(name)
        if name in self.cfg.specialists:
            raise AlreadyExists(f"specialist {name!r} already exists")
        rank = self.cfg.branch_rank
        generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        for block in self.blocks:
            base = block.attn.experts[GENERAL]
            expert = Expert(self.cfg, rank)
            if rank:
                for a in (expert.qkv_a, expert.proj_a):
                    a.data.normal_(0.0, a.shape[1] ** -0.5, generator=generator)
            else:
                expert.load_state_dict(base.state_dict())
            expert = expert.to(base.gate.device, base.gate.dtype)
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

    # ---- whole sequences ----------------------------------------------------------------------

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
            return FusedLinearCrossEntropy.apply(hidden, self.head_weight, targets.flatten())
        return F.cross_entropy(self.head(hidden).float(), targets.flatten())

    @property
    def head_weight(self) -> Tensor:
        return self.wte.weight if self.lm_head is None else self.lm_head.weight

    def head(self, x: Tensor) -> Tensor:
        return F.linear(x, self.head_weight)

    def embed(self, idx: Tensor, positions: Tensor) -> Tensor:
        """Token embeddings, plus learned position embeddings where the model has them."""
        x = self.wte(idx)
        return x if self.wpe is None else x + self.wpe(positions)

    def rotary(self, positions: Tensor, per_row: bool = False) -> tuple[Tensor, Tensor] | None:
        """cos and signed sin at `positions`, to broadcast over the fused qkv (n, T, E, heads,
        hd): the same T positions for every row (T, 1, 1, hd), or with `per_row` one position
        per row (n, 1, 1, 1, hd). None without rotary positions."""
        if self.wpe is not None:
            return None
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        if per_row:
            return cos[:, None, None, None], sin[:, None, None, None]
        return cos[:, None, None], sin[:, None, None]

    def trunk(
        self, idx: Tensor, routing: Routing | list[Routing] = SOFT, features_only: bool = False
    ) -> Trace:
        """Final hidden states, and per layer the gate features and weights (if a gate ran).

        With `features_only`, stop once the last layer's gate features are known (no hidden
        states): all that training the gate needs, a layer's worth of work cheaper."""
        B, T = idx.shape
        routes = RouteTable.for_batch(self.experts, routing, B, idx.device)
        dropout = self.cfg.dropout if self.training else 0.0
        positions = torch.arange(T, device=idx.device)
        x = _dropout(self.embed(idx, positions), dropout)
        step = Sequences(idx, routes, dropout, x.dtype, self.rotary(positions))
        for i, block in enumerate(self.blocks):
            if features_only and i == len(self.blocks) - 1 and routes.single is None:
                block.attn.weigh(block.ln_1(x), step, i)
                return step.trace
            x = block(x, step, i)
        step.trace.hidden = self.ln_f(x)
        return step.trace

    # ---- incremental decoding -----------------------------------------------------------------

    def new_cache(self, slots: int, device=None, dtype: torch.dtype | None = None) -> KVCache:
        """Preallocate generation state for `slots` sequences of up to `context` tokens."""
        p, cfg = self.wte.weight, self.cfg
        dims = (cfg.n_layer, cfg.kv_heads, cfg.head_dim, cfg.d_model, cfg.context)
        return KVCache.allocate(slots, self.experts, *dims, device or p.device, dtype or p.dtype)

    def prefill(
        self,
        cache: KVCache,
        slots: Tensor,
        idx: Tensor,
        lengths: Tensor,
        routes: RouteTable,
        start: int = 0,
        every: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Run prompts (right-padded to a common length) into `slots` of the cache, at
        positions from `start` on (the slots hold the prompts' first `start` tokens already).
        Returns the logits at each prompt's last real token (n, V), the gate weights there
        (L, n, E), and with `every` the logits at every position (n, T, V), else None."""
        self._check_cache(cache)
        positions = torch.arange(start, start + idx.shape[1], device=idx.device)
        x = self.embed(idx, positions)
        step = Prefill(cache, slots, idx, lengths, routes, x.dtype, start)
        step.rotary = self.rotary(positions)
        for i, block in enumerate(self.blocks):
            x = block(x, step, i)
        cache.lengths[slots] = start + lengths
        gates = self._stack_gates(step.gates, routes, idx.shape[0])
        if every:
            logits = self.head(self.ln_f(x))
            return logits[step.rows, step.last], gates, logits
        return self.head(self.ln_f(x[step.rows, step.last])), gates, None

    def decode(
        self, cache: KVCache, tokens: Tensor, routes: RouteTable, span: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Advance slots 0..n-1 by one token each. Returns logits (n, V) and gates (L, n, E).

        `span` (the longest cached length + 1) lets a caller that tracks lengths on the host
        spare a device sync; without it, it is read from the cache.
        """
        self._check_cache(cache)
        n = tokens.shape[0]
        step = Decode(cache, tokens, routes, span)
        step.rotary = self.rotary(step.pos, per_row=True)
        x = self.embed(tokens, step.pos).unsqueeze(1)  # (n, 1, d)
        for i, block in enumerate(self.blocks):
            x = block(x, step, i)
        cache.lengths[:n] += 1
        return self.head(self.ln_f(x[:, 0])), self._stack_gates(step.gates, routes, n)

    def _stack_gates(self, gates: list[Tensor], routes: RouteTable, n: int) -> Tensor:
        if gates:
            return torch.stack(gates)
        one = torch.zeros(self.cfg.n_layer, n, len(self.experts), device=self.wte.weight.device)
        one[..., routes.single] = 1.0
        return one

    def _check_cache(self, cache: KVCache) -> None:
        if cache.experts != self.experts:
            raise ValueError("this cache was made for other experts; make a new one")
