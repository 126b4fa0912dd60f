"""The jobs users ask for — train, add, remove, evaluate — over a home folder.

Each job reads corpora from `<home>/data`, trains, and publishes a new complete model version
under `<home>/artifacts/models`, then points CURRENT at it. A job that fails publishes nothing,
so the previous version keeps serving. The CLI and the training service both run these.

Under torchrun (`sma train --nproc-per-node N`) every rank runs the same job; rank 0 alone
builds the demo corpus, trains the tokenizer and writes versions, and the others wait for it
(distributed.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import torch
from tokenizers import Tokenizer

from shiftable_lib import checkpoint, distributed, evaluate, plan, pretrained, train
from shiftable_lib.config import Profile, Settings, available_cpus, get_profile
from shiftable_lib.corpus import (
    GENERAL,
    check_corpus,
    corpus_digest,
    domain_dir,
    load_domain,
    require_corpus,
    sampled,
    validate_specialist_name,
)
from shiftable_lib.errors import AlreadyExists, Conflict, DriftTooLarge, NotFound
from shiftable_lib.model import ModelConfig, ShiftableLM
from shiftable_lib.tokenizer import train_tokenizer
from shiftable_lib.train import DomainTokens, ProgressFn, tokenize_domain

# the peak learning rate of a low-rank branch's training at the least: the rate that suits a
# full copy of the attention moves a rank-64 delta too slowly (docs/benchmarks.md)
LOW_RANK_LR = 2e-3


@dataclass(frozen=True)
class JobResult:
    version: str | None  # the version published, None when nothing needed doing
    message: str
    metrics: dict


def _quiet(_: train.Progress) -> None:
    pass


def configure_torch(settings: Settings) -> torch.device:
    """Torch threads from settings (else the CPUs this process may use, not the machine's:
    a container's CPU limit counts, unless OMP_NUM_THREADS says, as torchrun's ranks have it);
    the device; under torchrun, this rank's process group."""
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(available_cpus())
    return distributed.init(train.pick_device(settings.device))


def tokenize_domains(
    settings: Settings, tok, names: list[str], stop_tokens: tuple[str, ...] = ()
) -> dict[str, DomainTokens]:
    """The domains `names` as token streams; `stop_tokens` are the version's (the document
    separator is among them where the vocabulary has no EOS of ours)."""
    return {n: tokenize_domain(tok, load_domain(settings.data_dir, n), stop_tokens) for n in names}


def _replay(
    settings: Settings, tok, names: list[str], stop_tokens: tuple[str, ...] = ()
) -> dict[str, DomainTokens]:
    """The other domains of an add or a removal, those of `names` whose corpus is there, each
    read up to REPLAY_CHARS: what its gate phase and its checks need of them."""
    present = [n for n in names if (settings.data_dir / n).is_dir()]
    return {
        n: tokenize_domain(tok, sampled(load_domain(settings.data_dir, n)), stop_tokens)
        for n in present
    }


def _digests(settings: Settings, names: list[str]) -> dict[str, str]:
    return {n: corpus_digest(settings.data_dir / n) for n in names}


def _version_digests(settings: Settings, names: list[str], known: dict[str, str]) -> dict[str, str]:
    """The corpus digest of each domain in `names`: from `known` (hashed earlier in this job,
    or recorded when a kept branch was trained), else, for a specialist whose corpus is there,
    hashed now. The generalist's stays the one it was trained on, or absent."""
    missing = [
        n for n in names if n != GENERAL and n not in known and (settings.data_dir / n).is_dir()
    ]
    digests = {**known, **_digests(settings, missing)}
    return {n: digests[n] for n in names if n in digests}


def _publish(
    settings: Settings,
    model: ShiftableLM,
    tok,
    profile: Profile,
    metrics: dict,
    meta: dict,
) -> str:
    world = distributed.world()
    version = None
    if world.main:
        version = checkpoint.save_version(settings.models_dir, model, tok, profile, metrics, meta)
        checkpoint.set_current(settings.models_dir, version)
    world.barrier()  # the other ranks read what rank 0 wrote
    return str(world.broadcast(version))


@dataclass
class Imported:
    version: str
    family: str
    cfg: ModelConfig
    source: dict


def import_base(
    settings: Settings, path: Path, context: int = 0, profile_name: str | None = None
) -> Imported:
    """Make a pretrained checkpoint (`pretrained.read_pretrained`) the current version: the
    generalist, without specialists, with its tokenizer, chat template and stop tokens. The
    profile gives the training settings of the specialists grown on it later, their windows
    included (the profile's length, at most the model's context); its model sizes are the
    checkpoint's."""
    read = pretrained.read_pretrained(path, context)
    cfg = replace(read.cfg, branch_rank=branch_rank(read.cfg, settings.branch_rank))
    model = read.model(cfg)
    chosen = get_profile(profile_name or settings.profile)
    profile = replace(
        chosen,
        vocab_size=cfg.vocab_size,
        context=min(chosen.context, cfg.context),  # training and evaluation windows
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        d_model=cfg.d_model,
        specialist_lr=max(chosen.specialist_lr, LOW_RANK_LR if cfg.branch_rank else 0.0),
    )
    meta = {
        "chat_template": read.chat_template or checkpoint.PLAIN_CHAT_TEMPLATE,
        "eos_tokens": list(read.eos_tokens),
        "base": {"family": read.family, **read.source},
    }
    version = _publish(settings, model, read.tokenizer, profile, {}, meta)
    return Imported(version, read.family, cfg, read.source)


def branch_rank(cfg: ModelConfig, rank: int) -> int:
    """`rank`, where a delta of that rank on the attention projections holds fewer parameters
    than a copy of them; else 0 (a copy: the same size, and trained more easily)."""
    width, d = cfg.qkv_width, cfg.d_model
    copy = (width + d) * d  # q/k/v, then the output projection
    delta = rank * (width + d) + rank * 2 * d
    return rank if delta < copy else 0


def _import_generalist(
    settings: Settings, profile_name: str | None, progress: ProgressFn
) -> JobResult:
    progress(train.Progress(plan.IMPORT, 0, 1, float("nan"), 0.0, 0.0))
    # every rank reads the checkpoint; rank 0 writes the version (`_publish`)
    version = import_base(settings, settings.base, profile_name=profile_name).version
    progress(train.Progress(plan.IMPORT, 1, 1, float("nan"), 0.0, 0.0))
    return JobResult(version, f"imported {settings.base.name} as {version}", {})


def load_current(settings: Settings, device: torch.device | str = "cpu") -> checkpoint.ModelVersion:
    version = checkpoint.current_version(settings.models_dir)
    if version is None:
        raise NotFound(f"no trained model under {settings.models_dir}: run `sma train` first")
    return checkpoint.load_version(settings.models_dir, version, device)


def train_all(
    settings: Settings,
    profile_name: str | None = None,
    progress: ProgressFn = _quiet,
    demo_if_empty: bool = False,
    on_plan: plan.PlanFn = plan.ignore_plan,
    on_version: Callable[[str], None] = lambda version: None,
) -> list[JobResult]:
    """The generalist if there is none, then every specialist found under data/ (full).

    With `demo_if_empty` (a first start of the stack), an empty `data/general/` gets the demo
    corpus first. `on_plan` gets the phases to run before the first, and the phases left once
    the demo corpus is in place (see plan.decide_train_all, which makes every decision here).
    `on_version` gets the generalist's version, written and current, when specialists are
    trained after it: it can serve meanwhile.
    """
    device = configure_torch(settings)
    decision = plan.decide_train_all(settings, profile_name, demo_if_empty)
    on_plan(decision.phases)
    if decision.generalist:
        _check_batches(decision.profile)
    results = []
    if decision.demo_corpus:
        _build_demo_corpus(settings, progress)
        decision = plan.decide_train_all(settings, profile_name)
        on_plan(decision.phases)
    if decision.generalist and settings.base is not None:
        results.append(_import_generalist(settings, profile_name, progress))
    elif decision.generalist:
        results.append(
            train_generalist(settings, profile_name or settings.profile, device, progress)
        )
    current = load_current(settings, device)
    _check_batches(current.profile)
    if profile_name and profile_name != current.profile.name:
        raise Conflict(
            f"the model here was trained with profile {current.profile.name!r}, not "
            f"{profile_name!r}: use another --home to train with a different profile"
        )
    if decision.reason:
        results.append(JobResult(None, decision.reason, current.metrics))
        return results
    if results and results[-1].version:
        on_version(results[-1].version)
    results.append(
        _train_specialists(
            settings, current, decision.specialists, decision.digests, device, progress
        )
    )
    return results


def _build_demo_corpus(settings: Settings, progress: ProgressFn) -> None:
    from shiftable_lib.demo_corpus import build_demo_corpus

    progress(train.Progress(plan.DEMO_CORPUS, 0, 1, float("nan"), 0.0, 0.0))
    if distributed.world().main:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        build_demo_corpus(settings.data_dir)
    distributed.world().barrier()
    progress(train.Progress(plan.DEMO_CORPUS, 1, 1, float("nan"), 0.0, 0.0))


def _check_batches(profile: Profile) -> None:
    """Before any step: every batch of the profile splits over the ranks (else a job would
    fail in its gate phase, after the generalist was published)."""
    distributed.world().check_batches(profile.batch_size, profile.gate_rows)


def train_generalist(
    settings: Settings, profile_name: str, device: torch.device, progress: ProgressFn
) -> JobResult:
    profile = get_profile(profile_name)
    started = time.perf_counter()
    general = load_domain(settings.data_dir, GENERAL)
    progress(train.Progress(plan.TOKENIZER, 0, 1, float("nan"), 0.0, 0.0))
    world = distributed.world()
    tok = train_tokenizer(general.train, profile.vocab_size) if world.main else None
    if world.size > 1:  # every rank tokenizes with rank 0's tokenizer
        tok = Tokenizer.from_str(str(world.broadcast(tok.to_str() if tok else None)))
    data = tokenize_domain(tok, general)
    model, report = train.train_generalist(data, tok, profile, device, progress)
    metrics = evaluate.evaluate(model, {GENERAL: data}, profile, device)
    metrics["training"] = {"generalist": report, "seconds": round(time.perf_counter() - started, 1)}
    version = _publish(
        settings,
        model,
        tok,
        profile,
        metrics,
        {
            "kind": "generalist",
            "corpus_digests": _digests(settings, [GENERAL]),
            "corpus_tokens": {GENERAL: int(data.train.numel())},
        },
    )
    return JobResult(version, f"generalist trained as {version}", metrics)


def _train_specialists(
    settings: Settings,
    current: checkpoint.ModelVersion,
    specialists: list[str],
    digests: dict[str, str],
    device: torch.device,
    progress: ProgressFn,
) -> JobResult:
    """Every branch anew; `digests` are those of `specialists` hashed already, if any."""
    started = time.perf_counter()
    names = [GENERAL, *specialists]
    data = tokenize_domains(settings, current.tokenizer, names, current.stop_tokens)
    model, report = train.train_specialists(current.model, data, current.profile, device, progress)
    general = {k: v for k, v in current.meta.get("corpus_digests", {}).items() if k == GENERAL}
    return _finish(
        settings,
        current,
        model,
        data,
        report,
        started,
        _version_digests(settings, names, {**general, **digests}),
        "train-specialists",
        f"trained specialists {', '.join(specialists)}",
    )


def _finish(
    settings: Settings,
    current: checkpoint.ModelVersion,
    model: ShiftableLM,
    data: dict[str, DomainTokens],
    report: dict,
    started: float,
    digests: dict[str, str],
    kind: str,
    message: str,
    max_drift: float | None = None,
    added: str = "",
) -> JobResult:
    """Evaluate and publish `model`; `digests` are its experts' corpora as it was trained.

    With `max_drift` (a percentage; an add or a removal), each domain's held-out perplexity is
    compared with the current version's on the same text (`metrics["changes"]`), and a model
    that makes any domain but `added` more than `max_drift` percent worse is not published
    (DriftTooLarge, with the figures)."""
    device = model.wte.weight.device
    metrics = evaluate.evaluate(model, data, current.profile, device=device)
    if max_drift is not None:
        changes = evaluate.changes(current.model, metrics, data, current.profile, device)
        metrics["changes"] = {n: {k: round(v, 5) for k, v in c.items()} for n, c in changes.items()}
        metrics["max_drift"] = max_drift
        _check_drift(changes, max_drift, added, message)
    metrics["training"] = {**report, "seconds": round(time.perf_counter() - started, 1)}
    meta = {
        "kind": kind,
        "parent": current.id,
        # what an imported base brought, kept by every version grown from it
        **checkpoint.inherited(current.meta),
        "corpus_digests": digests,
        "corpus_tokens": {  # a sampled corpus keeps the count of the version before
            n: int(d.train.numel()) if d.whole else current.meta.get("corpus_tokens", {}).get(n, 0)
            for n, d in data.items()
        },
    }
    version = _publish(settings, model, current.tokenizer, current.profile, metrics, meta)
    return JobResult(version, f"{message}: {version}", metrics)


def _check_drift(changes: dict[str, dict], max_drift: float, added: str, what: str) -> None:
    worse = {
        n: c for n, c in changes.items() if n != added and c["change"] * 100 > max_drift + 1e-9
    }
    if worse:
        figures = "; ".join(
            f"{n} {100 * c['change']:+.2f}% ({c['before']:.2f} -> {c['after']:.2f})"
            for n, c in sorted(worse.items(), key=lambda kv: -kv[1]["change"])
        )
        raise DriftTooLarge(
            f"not published: the model with the {what} makes other domains' held-out "
            f"perplexity worse than the {max_drift:g}% limit: {figures}. Ask again with a "
            "higher max_drift to publish it anyway"
        )


def add_specialist(
    settings: Settings,
    name: str,
    progress: ProgressFn = _quiet,
    on_plan: plan.PlanFn = plan.ignore_plan,
    max_drift: float | None = None,
) -> JobResult:
    """Incremental: train only the new branch and its gate rows, replaying the other domains.

    Only the new corpus is hashed: the kept branches keep the digests they were trained on."""
    validate_specialist_name(name)
    device = configure_torch(settings)
    current = load_current(settings, device)
    _check_batches(current.profile)
    if name in current.model.cfg.specialists:
        raise AlreadyExists(f"specialist {name!r} already exists")
    folder = require_corpus(settings.data_dir, name)
    check_corpus(settings.data_dir, name, current.tokenizer, current.profile)  # CorpusTooSmall
    on_plan(plan.plan_add_specialist(settings, name, current.meta))
    started = time.perf_counter()
    digest = corpus_digest(folder)
    stops = current.stop_tokens
    new = tokenize_domain(current.tokenizer, load_domain(settings.data_dir, name), stops)
    replay = _replay(settings, current.tokenizer, [GENERAL, *current.model.cfg.specialists], stops)
    limit = settings.max_drift if max_drift is None else max_drift
    model, report = train.add_specialist(
        current.model, new, replay, current.profile, device, progress, drift_target(limit)
    )
    stored = current.meta.get("corpus_digests", {})
    return _finish(
        settings,
        current,
        model,
        {**replay, name: new},
        report,
        started,
        _version_digests(settings, list(model.experts), {**stored, name: digest}),
        "add-specialist",
        f"specialist {name!r} added",
        limit,
        name,
    )


def drift_target(max_drift: float) -> float:
    """What an add calibrates its gate to (a fraction): half the publish limit (a percentage),
    for the difference between the text it calibrates on and the held-out text it is judged
    on; the library's default when that is looser. Never below a fifth of that default: a
    target of nothing would lower the new rows until the specialist had no weight anywhere,
    and publish it doing nothing; the limit is the publish check's to enforce."""
    return max(min(train.DRIFT_TARGET, max_drift / 200), train.DRIFT_TARGET / 5)


def remove_specialist(
    settings: Settings,
    name: str,
    recalibrate_steps: int = 0,
    progress: ProgressFn = _quiet,
    on_plan: plan.PlanFn = plan.ignore_plan,
    max_drift: float | None = None,
) -> JobResult:
    """Drop a specialist from the model and move its corpus to data/.deleted/ (never deleted).

    Nothing is hashed: the kept branches keep the digests they were trained on."""
    validate_specialist_name(name)
    device = configure_torch(settings)
    current = load_current(settings, device)
    if name not in current.model.cfg.specialists:
        raise NotFound(f"no specialist named {name!r}")
    if len(current.model.cfg.specialists) == 1:
        raise Conflict(f"{name!r} is the last specialist and cannot be removed")
    started = time.perf_counter()
    remaining = [GENERAL, *(s for s in current.model.cfg.specialists if s != name)]
    if not any((settings.data_dir / n).is_dir() for n in remaining):  # nothing to recalibrate on
        recalibrate_steps = 0
    on_plan(plan.plan_remove_specialist(recalibrate_steps))
    data = _replay(settings, current.tokenizer, remaining, current.stop_tokens)
    model, report = train.remove_specialist(
        current.model, name, data, current.profile, device, recalibrate_steps, progress
    )
    stored = current.meta.get("corpus_digests", {})
    result = _finish(
        settings,
        current,
        model,
        data,
        report,
        started,
        _version_digests(settings, remaining, stored),
        "remove-specialist",
        f"specialist {name!r} removed",
        settings.max_drift if max_drift is None else max_drift,
    )
    moved = archive_corpus(settings.data_dir, name)
    return JobResult(result.version, f"{result.message}; corpus moved to {moved}", result.metrics)


def archive_corpus(data_dir: Path, name: str) -> Path | None:
    """Move data/<name> to data/.deleted/<name>-<utc time>; nothing is destroyed."""
    source = domain_dir(data_dir, name)
    if not source.exists():
        return None
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    target = data_dir / ".deleted" / f"{name}-{stamp}"
    target.parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while target.exists():
        target = data_dir / ".deleted" / f"{name}-{stamp}-{n}"
        n += 1
    os.replace(source, target)
    return target


def evaluate_current(settings: Settings) -> dict:
    """Held-out perplexity (generalist vs current model) and routing accuracy, per domain."""
    device = configure_torch(settings)
    current = load_current(settings, device)
    names = [n for n in current.model.experts if (settings.data_dir / n).is_dir()]
    data = tokenize_domains(settings, current.tokenizer, names, current.stop_tokens)
    result = evaluate.evaluate(current.model, data, current.profile, device)
    result["version"] = current.id
    result["profile"] = current.profile.name
    return result
