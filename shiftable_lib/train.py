"""Training: the generalist, then specialists as branch-then-gate (as in Branch-Train-MiX).

1. Generalist: every weight, on the general corpus; the best held-out checkpoint is kept.
2. Branches: each specialist's attention (a copy of the base's) trains alone on its own domain,
   with the gate forced to it, every other weight frozen. A branch therefore carries its domain
   and nothing else, and its cost is that of its own corpus.
3. Gate: only gate rows train, on batches mixing every domain, to predict at every layer and
   position the domain of the document (cross-entropy on the gate's softmax). Unsupervised, a
   gate does not align branch i with domain i (docs/model.md); supervised, deleting
   `datascience` deletes what the name says. The branches were trained to be used alone, so a
   confident gate is also what the LM loss wants. The trunk runs without gradients here: the
   features each gate sees come from a no-grad forward, which makes this phase cheap.

`train_specialists` does 2 for every specialist and 3 for all gate rows (the full retrain);
`add_specialist` does 2 for the new one and 3 for its gate rows only, replaying every domain so
the gate learns to tell the new one from the rest; the other specialists stay bit-identical.
"""

from __future__ import annotations

import itertools
import math
import time
import zlib
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor, nn

from shiftable_lib import distributed
from shiftable_lib.config import Profile
from shiftable_lib.corpus import GENERAL, Domain
from shiftable_lib.evaluate import autocast, perplexity, window_losses
from shiftable_lib.model import Expert, ModelConfig, ShiftableLM
from shiftable_lib.plan import GATE, GENERALIST, specialist_phase, specialist_steps
from shiftable_lib.sampling import Routing
from shiftable_lib.tokenizer import encode_documents, separator_id

# `calibrate_rows`: an added specialist makes no other domain more than DRIFT_TARGET worse than
# it is without it (half the default publish limit, for the difference between training and
# held-out text) nor any window of it more than WINDOW_TARGET nats a token worse, and no
# specialist makes the general text more than DRIFT_TARGET better; it scans SCAN_WINDOWS
# windows a domain, evaluates the AT_RISK_WINDOWS where the specialist weighs most, and bisects
# the offset CALIBRATION_HALVINGS times once it is bracketed; `calibrate_all` goes through
# every specialist up to CALIBRATION_PASSES times
DRIFT_TARGET = 0.0025
WINDOW_TARGET = 0.05
SCAN_WINDOWS = 128
AT_RISK_WINDOWS = 16
CALIBRATION_HALVINGS = 4
WHOLE_HALVINGS = 2  # of the offset, once the evenly spaced windows needed a larger one
CALIBRATION_PASSES = 3
MAX_OFFSET = 64.0  # exp(-64): the specialist has no weight left on the other domains' text


@dataclass(frozen=True)
class Progress:
    """One training-progress report: what a bar, a log line or a server stream shows."""

    phase: str
    step: int
    total: int
    loss: float
    tokens_per_s: float
    eta_s: float


ProgressFn = Callable[[Progress], None]


def _silent(_: Progress) -> None:
    pass


@dataclass
class DomainTokens:
    """A domain as token ids: one training stream, held-out stream and held-out documents,
    and the calibration stream (empty when the corpus has too few documents to spare one)."""

    name: str
    train: Tensor  # 1-D, documents each followed by EOS
    heldout: Tensor
    heldout_docs: list[Tensor] = field(repr=False)
    whole: bool = True  # the whole corpus, not a sample of it
    calibration: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def unseen(self, context: int) -> Tensor:
        """Text to calibrate a gate on: the calibration stream, which no part of the model was
        trained on, when it holds a whole window, else the training stream."""
        return self.calibration if self.calibration.numel() > context else self.train


def tokenize_domain(
    tok: Tokenizer, domain: Domain, stop_tokens: tuple[str, ...] = ()
) -> DomainTokens:
    """A domain's splits as token streams, each document followed by the separator
    (`tokenizer.separator_id`: our EOS, else the first of the version's `stop_tokens`)."""
    eos = separator_id(tok, stop_tokens)

    def stream(docs: list[str]) -> tuple[Tensor, list[Tensor]]:
        parts = [torch.tensor([*ids, eos], dtype=torch.long) for ids in encode_documents(tok, docs)]
        return (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)), parts

    train, _ = stream(domain.train)
    heldout, docs = stream(domain.heldout)
    calibration, _ = stream(domain.calibration)
    return DomainTokens(domain.name, train, heldout, docs, domain.whole, calibration)


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


class WindowSampler:
    """Random (input, target) windows from a token stream, reproducible under a seed."""

    def __init__(self, tokens: Tensor, context: int, seed: int) -> None:
        if tokens.numel() < 2:
            raise ValueError("a corpus needs at least two tokens to train on")
        self.tokens = tokens
        self.context = min(context, tokens.numel() - 1)
        self.gen = torch.Generator().manual_seed(seed)

    def sample(self, n: int) -> Tensor:
        """(n, context + 1) windows; rows are sequences, the last column is the final target."""
        high = self.tokens.numel() - self.context
        starts = torch.randint(0, high, (n,), generator=self.gen)
        return torch.stack([self.tokens[s : s + self.context + 1] for s in starts.tolist()])


def lr_at(step: int, total: int, peak: float, warmup_fraction: float) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    warmup = max(1, int(total * warmup_fraction))
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(params: list[nn.Parameter], lr: float, weight_decay: float, device):
    """AdamW; matrices decay, vectors (norms, gate rows) do not."""
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=True)


@dataclass
class Phase:
    """One optimisation phase: which parameters, how batches and losses are made, how long."""

    name: str
    params: list[nn.Parameter]
    steps: int
    lr: float
    loss: Callable[[], tuple[Tensor, int]]  # -> (loss, tokens in the batch)
    evaluate: Callable[[], float] | None = None  # lower is better; best parameters are kept


def run_phase(phase: Phase, model: ShiftableLM, profile: Profile, device, progress: ProgressFn):
    """Optimise `phase.params`; everything else in the model is frozen for the duration.

    Under torchrun every rank runs this on its rows of each global batch and DDP averages the
    gradients (see distributed.py); only rank 0 reports progress."""
    trainable = {id(p) for p in phase.params}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    world = distributed.world()
    step_loss = world.step_fn(model, phase.loss)  # built after requires_grad is set
    opt = make_optimizer(phase.params, phase.lr, profile.weight_decay, device)
    best, best_state = math.inf, None
    model.train()
    start, tokens, shown_loss = time.perf_counter(), 0, float("nan")
    curve: list[float] = []  # the loss every ten steps, as reported
    for step in range(phase.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, phase.steps, phase.lr, profile.warmup_fraction)
        with autocast(device):
            loss, n_tokens = step_loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(phase.params, profile.grad_clip)
        opt.step()
        model.weights_changed()  # the fused optimiser does not bump version counters
        opt.zero_grad(set_to_none=True)
        tokens += n_tokens * world.size
        last = step + 1 == phase.steps
        if phase.evaluate and ((step + 1) % profile.eval_interval == 0 or last):
            score = phase.evaluate()
            model.train()
            if score < best:
                best = score
                best_state = [p.detach().clone() for p in phase.params]
        if step % 10 == 0 or last:
            shown_loss = world.mean(loss).item()  # the only host sync, once every ten steps
            curve.append(round(shown_loss, 5))
            elapsed = time.perf_counter() - start
            rate = tokens / elapsed if elapsed > 0 else 0.0
            eta = elapsed / (step + 1) * (phase.steps - step - 1)
            if world.main:
                progress(Progress(phase.name, step + 1, phase.steps, shown_loss, rate, eta))
    if best_state is not None:
        with torch.no_grad():
            for p, saved in zip(phase.params, best_state, strict=True):
                p.copy_(saved)
        model.weights_changed()
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return {
        "best_eval": best if best_state is not None else None,
        "final_loss": shown_loss,
        "loss_curve": curve,
        "seconds": round(time.perf_counter() - start, 2),
    }


# ---- the three kinds of phase -----------------------------------------------------------------


def train_generalist(
    data: DomainTokens, tok: Tokenizer, profile: Profile, device, progress: ProgressFn = _silent
) -> tuple[ShiftableLM, dict]:
    """A fresh generalist trained on the general corpus; its best held-out checkpoint."""
    torch.manual_seed(profile.seed)
    cfg = ModelConfig(
        vocab_size=tok.get_vocab_size(),
        context=profile.context,
        n_layer=profile.n_layer,
        n_head=profile.n_head,
        d_model=profile.d_model,
        dropout=profile.dropout,
    )
    model = ShiftableLM(cfg).to(device)
    phase = language_model_phase(
        GENERALIST, model, data, generalist_params(model), profile.generalist_steps,
        profile.generalist_lr, Routing(), profile.seed, profile, device,
    )  # fmt: skip
    return model, run_phase(phase, model, profile, device, progress)


def branch_params(expert: Expert) -> list[nn.Parameter]:
    """An expert's attention weights (and biases, where the family has them): all but its gate
    rows, which are trained apart."""
    return [p for n, p in expert.named_parameters() if n not in ("gate", "gate_tokens")]


def generalist_params(model: ShiftableLM) -> list[nn.Parameter]:
    """Every weight but the gate rows: with one expert the gate never runs, so its rows get no
    gradient (and DDP wants no unused parameter)."""
    return [p for n, p in model.named_parameters() if not n.endswith((".gate", ".gate_tokens"))]


def language_model_phase(
    name: str,
    model: ShiftableLM,
    data: DomainTokens,
    params: list[nn.Parameter],
    steps: int,
    lr: float,
    routing: Routing,
    seed: int,
    profile: Profile,
    device,
    replay: Tensor | None = None,
) -> Phase:
    """Next-token loss on random windows of `data` under `routing`; held-out ppl as the score.

    With `replay` (a token stream of other text), `profile.branch_replay` of each batch's rows
    are windows of it."""
    sampler = WindowSampler(data.train, profile.context, seed)
    other = WindowSampler(replay, profile.context, seed + 1) if replay is not None else None
    mixed = round(profile.batch_size * profile.branch_replay) if other else 0
    rows = distributed.world().rows

    def sample() -> Tensor:
        if not mixed:
            return sampler.sample(profile.batch_size)
        return torch.cat([sampler.sample(profile.batch_size - mixed), other.sample(mixed)])

    def loss() -> tuple[Tensor, int]:
        batch = rows(sample()).to(device, non_blocking=True)
        return model.loss(batch[:, :-1], batch[:, 1:], routing), batch[:, 1:].numel()

    def held_out() -> float:
        return perplexity(
            model, data.heldout, profile.context, profile.eval_windows, routing, device
        )

    return Phase(name, params, steps, lr, loss, held_out)


def train_branch(
    model: ShiftableLM,
    data: DomainTokens,
    general: DomainTokens | None,
    profile: Profile,
    device,
    progress: ProgressFn,
) -> dict:
    """Train one specialist's attention in every layer on its own domain, gate forced to it,
    with some of the `general` text in each batch (`profile.branch_replay`). Not the other
    specialists' text: a branch that learnt it would carry it, and deleting the branch later
    would make that domain worse."""
    name = data.name
    params = [p for b in model.blocks for p in branch_params(b.attn.experts[name])]
    replay = general.train if general is not None and general.train.numel() > 1 else None
    phase = language_model_phase(
        specialist_phase(name), model, data, params, specialist_steps(data.train.numel(), profile),
        profile.specialist_lr, Routing(force=(name,)), profile.seed + zlib.crc32(name.encode()),
        profile, device, replay,
    )  # fmt: skip
    return run_phase(phase, model, profile, device, progress)


def train_gate(
    model: ShiftableLM,
    data: dict[str, DomainTokens],
    rows_of: list[str],
    profile: Profile,
    device,
    progress: ProgressFn,
    steps: int | None = None,
    replay_weight: float = 1.0,
    batches: int = 1,
    lr: float = 0.0,
) -> dict:
    """Train the gate rows of experts `rows_of` on batches with every domain in `data` equally;
    positions of general text weigh `profile.gate_base_weight` in the loss, and positions of
    a domain whose row does not train `replay_weight` times that.

    Windows are `profile.gate_window` tokens long, as many as make `batch_size` full contexts
    (times `batches`): short windows put more of the batch at the start of a window, where the
    gate has the least evidence and does its worst routing, for the same tokens.

    The features come from a no-grad forward of the trunk, whose arithmetic and kernel
    launches are most of the phase's cost. When some specialists' rows do not train (an add),
    a step's windows of those domains all come from one of them, in turn, and the step runs
    only the base, that specialist and the experts whose rows train: the frozen specialists'
    weights on the other domains are what the gate was trained to keep small. Each frozen
    domain gets its share of the windows over the phase, and a step costs the same however
    many specialists the model has, on a CPU (arithmetic) and a GPU (launches) alike."""
    experts = model.experts
    names = [n for n in data if n in experts]
    params = [
        p
        for b in model.blocks
        for n in rows_of
        for p in (b.attn.experts[n].gate, b.attn.experts[n].gate_tokens)
    ]
    samplers = {
        n: WindowSampler(data[n].train, profile.gate_window_tokens, profile.seed + 7 + i)
        for i, n in enumerate(names)
    }
    total = profile.gate_rows * batches
    rows_per = [total // len(names) + (i < total % len(names)) for i in range(len(names))]
    rows_per = dict(zip(names, (max(1, r) for r in rows_per), strict=True))
    frozen = [n for n in names if n != GENERAL and n not in rows_of]
    trained = [n for n in names if n not in frozen]
    frozen_rows = sum(rows_per[n] for n in frozen)
    weights = torch.tensor(
        [
            (profile.gate_base_weight if e == GENERAL else 1.0)
            * (1.0 if e in rows_of else replay_weight)
            for e in experts
        ],
        device=device,
    )
    context = min(s.context for s in samplers.values())
    world = distributed.world()
    turn = itertools.count()

    def draw() -> tuple[Tensor, Tensor, Routing]:
        """A step's windows, their domains (expert indices) and the experts that run."""
        counts = {n: rows_per[n] for n in trained}
        allowed = {GENERAL, *rows_of}
        if frozen:
            this = frozen[next(turn) % len(frozen)]
            counts[this] = frozen_rows
            allowed.add(this)
        batch = torch.cat([samplers[n].sample(r)[:, :context] for n, r in counts.items()])
        labels = torch.cat([torch.full((r,), experts.index(n)) for n, r in counts.items()])
        return batch, labels, _routing_for(experts, allowed)

    def loss() -> tuple[Tensor, int]:
        batch, labels, routing = draw()
        # a weighted mean over the *global* batch: each rank divides its weighted sum by its
        # share of the global weight, so that DDP's mean over the ranks is the one-process loss
        share = weights[labels.to(device)].sum() / world.size
        batch, labels = world.rows(batch).to(device), world.rows(labels).to(device)
        model.eval()  # features as inference sees them (no dropout); only gate rows learn
        with torch.no_grad():
            feats = model.trunk(batch, routing, features_only=True).features
        targets = labels.repeat_interleave(batch.shape[1])
        w = weights[targets] / (share * batch.shape[1])
        count = torch.arange(1, batch.shape[1] + 1, device=device).view(1, -1, 1)
        ce = sum(
            F.cross_entropy(
                block.attn.gate_logits(m, block.attn.token_evidence(batch, count))
                .flatten(0, 1)
                .float(),
                targets,
                reduction="none",
            )
            .mul(w)
            .sum()
            for block, m in zip(model.blocks, feats, strict=True)
        )
        return ce / len(feats), batch.numel()

    phase = Phase(GATE, params, steps or profile.gate_steps, lr or profile.gate_lr, loss)
    return run_phase(phase, model, profile, device, progress)


def _routing_for(experts: tuple[str, ...], allowed: set[str]) -> Routing:
    return Routing(exclude=tuple(e for e in experts if e not in allowed))


def train_specialists(
    generalist: ShiftableLM,
    data: dict[str, DomainTokens],
    profile: Profile,
    device,
    progress: ProgressFn = _silent,
) -> tuple[ShiftableLM, dict]:
    """The full retrain: a branch for every specialist domain in `data`, then the whole gate."""
    model = _copy(generalist)
    for name in model.cfg.specialists:
        model.remove_specialist(name)
    specialists = [n for n in data if n != GENERAL]
    report = {}
    for name in specialists:
        model.add_specialist(name)
        report[name] = train_branch(model, data[name], data.get(GENERAL), profile, device, progress)
    model.wake_specialists(specialists, split=True)
    report["gate"] = train_gate(model, data, list(model.experts), profile, device, progress)
    report["calibration"] = calibrate_all(model, data, device, profile.context)
    return model, report


def calibrate_all(model: ShiftableLM, data: dict[str, DomainTokens], device, context: int) -> dict:
    """`calibrate_rows` for every specialist against the general text, after the whole gate
    trained: the general text does not lean on any specialist, so deleting one leaves it as
    it was. Only the side a deletion would show is bounded: general's perplexity no more than
    DRIFT_TARGET better for a specialist. Not each window, nor the other side (a specialist
    that serves some general text worse, which deleting it would only improve): bounding
    those cost the `gpu` profile's datascience most of its routing. Nor the specialists'
    texts: two overlapping domains, such as numpy's docs and torch's, lowered each other in
    turn until neither had much gain left on its own text, so a removal's held-out check
    guards them instead. Lowering one specialist's rows moves weight to the others, so a
    specialist is calibrated again when another was lowered after it (up to
    CALIBRATION_PASSES times in all)."""
    if GENERAL not in data:
        return {}
    general = {GENERAL: data[GENERAL].unseen(context)}
    started, report = time.perf_counter(), {}
    offsets = dict.fromkeys(model.cfg.specialists, 0.0)
    stale = set(offsets)
    for _ in range(CALIBRATION_PASSES):
        for name in offsets:
            if name not in stale:
                continue
            report[name] = calibrate_rows(
                model, name, general, device, DRIFT_TARGET, context=context, worse=False
            )
            offsets[name] += report[name]["gate_offset"]
            stale.discard(name)
            if report[name]["gate_offset"] > 0:
                stale |= set(offsets) - {name}
        if not stale:
            break
    for name, offset in offsets.items():
        report[name]["gate_offset"] = round(offset, 4)
    return {**report, "seconds": round(time.perf_counter() - started, 2)}


def add_specialist(
    model: ShiftableLM,
    new: DomainTokens,
    replay: dict[str, DomainTokens],
    profile: Profile,
    device,
    progress: ProgressFn = _silent,
    drift_target: float = DRIFT_TARGET,
) -> tuple[ShiftableLM, dict]:
    """The incremental add: train only the new branch and its gate rows; the rest is untouched.

    `replay` holds the other domains (general included) so the new rows learn to stay low on
    them; only a gate phase's worth of their tokens is read. Then the new rows are made as
    shy as it takes for no replayed domain to move by more than `drift_target` (see
    `calibrate_rows`).
    """
    model = _copy(model)
    model.add_specialist(new.name)
    report = {new.name: train_branch(model, new, replay.get(GENERAL), profile, device, progress)}
    model.wake_specialists([new.name], split=False)
    report["gate"] = train_gate(
        model, {**replay, new.name: new}, [new.name], profile, device, progress,
        steps=profile.add_gate_steps, replay_weight=profile.gate_replay_weight,
        batches=profile.gate_add_batches, lr=profile.gate_add_lr,
    )  # fmt: skip
    # the calibration text and the training text: the per-window bound is for rare kinds of
    # text (an ASCII diagram among the docstrings), and only the larger pool is sure to hold
    # some; on the text a model was trained on it errs to the safe side (see calibrate_rows)
    texts = {n: torch.cat([d.calibration, d.train]) for n, d in replay.items()}
    started = time.perf_counter()
    report["calibration"] = calibrate_rows(
        model, new.name, texts, device, drift_target, WINDOW_TARGET, context=profile.context
    )
    report["calibration"]["seconds"] = round(time.perf_counter() - started, 2)
    return model, report


@torch.no_grad()
def calibrate_rows(
    model: ShiftableLM,
    name: str,
    texts: dict[str, Tensor],
    device,
    target: float,
    window_target: float = math.inf,
    worse: bool = True,
    better: Collection[str] = (GENERAL,),
    *,
    context: int,
) -> dict:
    """Lower the gate bias of specialist `name` in every layer by the least offset that leaves
    the other domains' text (`texts`, per domain: for the first training the text no part of
    the model was trained on, `DomainTokens.unseen`; for an add, that and the training text)
    as the model without `name` predicts it: each domain's
    perplexity no more than `target` (a fraction) worse (if `worse`), the perplexity of those
    in `better` no more than `target` better, and no window more than `window_target` nats a
    token worse. Windows are `context` tokens, as training's and evaluation's are (the
    profile's: an imported model's own context may be far longer).

    A gate trained to tell domains apart still sends some text of an overlapping domain to a
    specialist: tables drawn with `|` go to a specialist of pydoc pages, whose margins are
    drawn with it. Where the branch predicts such text worse, adding it makes that domain
    worse. Where it predicts it better, the branch carries text that is not its own, and
    deleting it later makes that domain worse by as much: bounded for the general text, so
    that deleting a specialist leaves it as it was. (For another specialist's domain, such as
    numpy's docs against torch's, that bound would take away most of what the new specialist
    learnt, and the held-out check at a removal guards that side.) Windows made worse are
    rare, and so they decide a domain's perplexity on a small held-out sample by chance; the
    per-window bound is what keeps every text of theirs as it was.

    An infinite offset is the model without `name`, so a finite one always exists, and it
    costs only part of the specialist's gain on its own text. Unseen text, because a model
    predicts what it was trained on better than anything else: on the `gpu` profile deleting
    deeplearning made general's training text better and its held-out text worse (see
    docs/model.md).
    Windows are taken across each stream (SCAN_WINDOWS of them); those where `name` has most
    weight (the AT_RISK_WINDOWS with the most, per domain) move most, and only they are
    evaluated at each offset tried; general's evenly spaced ones at the offset found."""
    model.eval()
    rows = [b.attn.experts[name].gate for b in model.blocks]
    biases = [r[-1].item() for r in rows]
    column = model.experts.index(name)

    lean = (
        torch.stack(  # per token: how much it pulls the gate to `name` rather than the base
            [
                b.attn.experts[name].gate_tokens - b.attn.experts[GENERAL].gate_tokens
                for b in model.blocks
            ]
        )
        .mean(0)
        .cpu()
    )

    def windows(tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Half evenly spaced, half those whose tokens lean most to `name`: rare text such as
        tables stands out by its tokens, and a sample spread evenly would miss it. Also which
        of them are evenly spaced: only those tell how the domain as a whole moves."""
        n = (tokens.numel() - 1) // context
        if n <= SCAN_WINDOWS:
            picks = spread = torch.arange(n)
        else:
            tiled = tokens[: n * context].view(n, context)
            leaning = lean[tiled].mean(-1).topk(SCAN_WINDOWS // 2).indices
            spread = torch.linspace(0, n - 1, SCAN_WINDOWS // 2).long().unique()
            picks = torch.cat([leaning, spread]).unique()
        out = torch.stack([tokens[i * context : (i + 1) * context + 1] for i in picks.tolist()])
        return out, torch.isin(picks, spread)

    def weight(w: Tensor) -> Tensor:
        """Each window's mean gate weight of `name` over layers and positions (the trunk
        alone, up to the last gate)."""
        out = []
        for chunk in w.split(32):
            with autocast(device):
                gates = model.trunk(chunk[:, :-1].to(device), features_only=True).gates
            out.append(torch.stack(gates).float().mean(0)[..., column].mean(-1).cpu())
        return torch.cat(out)

    scanned = {
        n: windows(t) for n, t in texts.items() if n in model.experts and t.numel() > context
    }
    at_risk, spread_at_risk, before, counts = {}, {}, {}, {}
    for n, (w, spread) in scanned.items():
        picks = weight(w).topk(min(AT_RISK_WINDOWS, len(w))).indices
        at_risk[n], spread_at_risk[n], counts[n] = w[picks], spread[picks], int(spread.sum())
        before[n] = window_losses(model, at_risk[n], Routing(exclude=(name,)), device)

    def set_offset(offset: float) -> None:
        for row, bias in zip(rows, biases, strict=True):
            row[-1] = bias - offset
        model.weights_changed()

    def moved(offset: float, domains: list[str]) -> dict[str, tuple[float, float]]:
        """Per domain: its perplexity's relative change (the evenly spaced windows among the
        at-risk ones, the rest of them taken as unmoved), and its worst window's (nats a
        token). A larger offset only lowers the branch's weight: a domain within bounds at a
        smaller one is not evaluated again."""
        set_offset(offset)
        out = {}
        for n in domains:
            delta = window_losses(model, at_risk[n], Routing(), device) - before[n]
            drift = math.exp(delta[spread_at_risk[n]].sum().item() / counts[n]) - 1
            out[n] = (drift, delta.max().item())
        return out

    def beyond(n: str, drift: float) -> bool:
        return (worse and drift > target) or (n in better and drift < -target)

    def any_beyond(found: dict[str, float]) -> bool:
        return any(beyond(n, d) for n, d in found.items())

    tried: dict[float, dict[str, tuple[float, float]]] = {}
    over = list(at_risk)

    def too_much(offset: float) -> bool:
        nonlocal over
        tried[offset] = moved(offset, over)
        still = [n for n, (d, w) in tried[offset].items() if beyond(n, d) or w > window_target]
        if not still:
            return False
        over = still
        return True

    high = _least_offset(too_much, 0.0, CALIBRATION_HALVINGS)
    # then all of general's evenly spaced windows: those outside the at-risk ones move a little
    # each, which adds up where a gate spreads its weight thin; the offset grows until that
    # holds too. Not a specialist's: when calibration ran on training text, where a branch
    # predicts its own text better than held-out text, that overstated what a held-out check
    # sees (deeplearning added back: offset 5.75 and a gain of 7%, against 1.5 and 45%)
    even = {n: w[spread] for n, (w, spread) in scanned.items() if n == GENERAL}
    without = {
        n: window_losses(model, w, Routing(exclude=(name,)), device) for n, w in even.items()
    }
    wholes: dict[float, dict[str, float]] = {}

    def drifts(offset: float) -> dict[str, float]:
        if offset not in wholes:
            set_offset(offset)
            deltas = {
                n: window_losses(model, w, Routing(), device) - without[n] for n, w in even.items()
            }
            wholes[offset] = {n: math.exp(d.mean().item()) - 1 for n, d in deltas.items()}
        return wholes[offset]

    high = _least_offset(lambda o: any_beyond(drifts(o)), high, WHOLE_HALVINGS)
    # every domain at the offset chosen (at no offset, the first evaluation was of them all)
    final = tried[0.0] if high == 0.0 else moved(high, list(at_risk))
    set_offset(high)
    final = {n: (drifts(high).get(n, d), w) for n, (d, w) in final.items()}

    def shown(found: dict[str, tuple[float, float]]) -> dict[str, dict[str, float]]:
        return {
            n: {"drift": round(d, 5), "worst_window_nats": round(w, 4)}
            for n, (d, w) in found.items()
        }

    return {
        "gate_offset": round(high, 4),
        "target": target,
        "window_target": window_target if window_target < math.inf else None,
        "after": shown(final),
        "before": shown(tried[0.0]),
    }


def _least_offset(fails: Callable[[float], bool], start: float, halvings: int) -> float:
    """The least offset from `start` up at which `fails` no longer holds (it holds less the
    larger the offset): doubled until it does not, then bisected `halvings` times."""
    if not fails(start):
        return start
    low, high = start, max(2 * start, 1.0)
    while fails(high) and high < MAX_OFFSET:
        low, high = high, 2 * high
    for _ in range(halvings):
        mid = (low + high) / 2
        low, high = (mid, high) if fails(mid) else (low, mid)
    return high


def remove_specialist(
    model: ShiftableLM,
    name: str,
    replay: dict[str, DomainTokens] | None,
    profile: Profile,
    device,
    recalibrate_steps: int = 0,
    progress: ProgressFn = _silent,
) -> tuple[ShiftableLM, dict]:
    """Drop a specialist (its branch and gate rows); optionally retrain the gate briefly (and
    calibrate it again, as the full retrain does)."""
    model = _copy(model)
    model.remove_specialist(name)
    report: dict = {}
    if recalibrate_steps and replay:
        report["gate"] = train_gate(
            model, replay, list(model.experts), profile, device, progress, steps=recalibrate_steps
        )
        report["calibration"] = calibrate_all(model, replay, device, profile.context)
    return model, report


def _copy(model: ShiftableLM) -> ShiftableLM:
    clone = ShiftableLM(model.cfg).to(model.wte.weight.device)
    clone.load_state_dict(model.state_dict())
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone.eval()
