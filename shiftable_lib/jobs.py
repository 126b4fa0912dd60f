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
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from tokenizers import Tokenizer

from shiftable_lib import checkpoint, distributed, train
from shiftable_lib.config import Profile, Settings, get_profile
from shiftable_lib.corpus import (
    GENERAL,
    corpus_digest,
    discover_specialists,
    domain_dir,
    load_domain,
    text_files,
    validate_specialist_name,
)
from shiftable_lib.errors import AlreadyExists, Conflict, CorpusMissing, NotFound
from shiftable_lib.model import ShiftableLM
from shiftable_lib.tokenizer import train_tokenizer
from shiftable_lib.train import DomainTokens, ProgressFn, tokenize_domain


@dataclass(frozen=True)
class JobResult:
    version: str | None  # the version published, None when nothing needed doing
    message: str
    metrics: dict


def _quiet(_: train.Progress) -> None:
    pass


def configure_torch(settings: Settings) -> torch.device:
    """Torch threads from settings; the device; under torchrun, this rank's process group."""
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    return distributed.init(train.pick_device(settings.device))


def _tokenize(settings: Settings, tok, names: list[str]) -> dict[str, DomainTokens]:
    return {n: tokenize_domain(tok, load_domain(settings.data_dir, n)) for n in names}


def _digests(settings: Settings, names: list[str]) -> dict[str, str]:
    return {n: corpus_digest(settings.data_dir / n) for n in names}


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
) -> list[JobResult]:
    """The generalist if there is none, then every specialist found under data/ (full).

    With `demo_if_empty` (a first start of the stack), an empty `data/general/` gets the demo
    corpus first.
    """
    device = configure_torch(settings)
    if checkpoint.current_version(settings.models_dir) is None:  # a generalist to train first
        _check_batches(get_profile(profile_name or settings.profile))
    results = []
    if demo_if_empty and not text_files(settings.data_dir / GENERAL):
        from shiftable_lib.demo_corpus import build_demo_corpus

        progress(train.Progress("demo corpus", 0, 1, float("nan"), 0.0, 0.0))
        if distributed.world().main:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            build_demo_corpus(settings.data_dir)
        distributed.world().barrier()
        progress(train.Progress("demo corpus", 1, 1, float("nan"), 0.0, 0.0))
    if checkpoint.current_version(settings.models_dir) is None:
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
    specialists = discover_specialists(settings.data_dir)
    digests = _digests(settings, specialists)
    stored = current.meta.get("corpus_digests", {})
    if list(current.model.cfg.specialists) == specialists and all(
        stored.get(n) == digests[n] for n in specialists
    ):
        results.append(JobResult(None, "specialists are up to date", current.metrics))
        return results
    if not specialists:
        results.append(JobResult(None, "no specialist corpora under data/", current.metrics))
        return results
    results.append(_train_specialists(settings, current, specialists, device, progress))
    return results


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
    progress(train.Progress("tokenizer", 0, 1, float("nan"), 0.0, 0.0))
    world = distributed.world()
    tok = train_tokenizer(general.train, profile.vocab_size) if world.main else None
    if world.size > 1:  # every rank tokenizes with rank 0's tokenizer
        tok = Tokenizer.from_str(str(world.broadcast(tok.to_str() if tok else None)))
    data = tokenize_domain(tok, general)
    model, report = train.train_generalist(data, tok, profile, device, progress)
    metrics = train.evaluate(model, {GENERAL: data}, profile, device)
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
    device: torch.device,
    progress: ProgressFn,
) -> JobResult:
    started = time.perf_counter()
    names = [GENERAL, *specialists]
    data = _tokenize(settings, current.tokenizer, names)
    model, report = train.train_specialists(current.model, data, current.profile, device, progress)
    return _finish(
        settings,
        current,
        model,
        data,
        report,
        started,
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
    kind: str,
    message: str,
) -> JobResult:
    metrics = train.evaluate(model, data, current.profile, device=model.wte.weight.device)
    metrics["training"] = {**report, "seconds": round(time.perf_counter() - started, 1)}
    names = list(model.experts)
    digests = {**current.meta.get("corpus_digests", {}), **_digests(settings, names[1:])}
    meta = {
        "kind": kind,
        "parent": current.id,
        "corpus_digests": {n: digests[n] for n in names if n in digests},
        "corpus_tokens": {n: int(d.train.numel()) for n, d in data.items()},
    }
    version = _publish(settings, model, current.tokenizer, current.profile, metrics, meta)
    return JobResult(version, f"{message}: {version}", metrics)


def add_specialist(settings: Settings, name: str, progress: ProgressFn = _quiet) -> JobResult:
    """Incremental: train only the new branch and its gate rows, replaying the other domains."""
    validate_specialist_name(name)
    device = configure_torch(settings)
    current = load_current(settings, device)
    _check_batches(current.profile)
    if name in current.model.cfg.specialists:
        raise AlreadyExists(f"specialist {name!r} already exists")
    folder = domain_dir(settings.data_dir, name)
    if not folder.is_dir():
        raise CorpusMissing(f"no corpus folder for {name!r}: create {folder} with .txt files first")
    started = time.perf_counter()
    new = tokenize_domain(current.tokenizer, load_domain(settings.data_dir, name))
    replay_names = [GENERAL, *current.model.cfg.specialists]
    replay = _tokenize(
        settings, current.tokenizer, [n for n in replay_names if (settings.data_dir / n).is_dir()]
    )
    model, report = train.add_specialist(
        current.model, new, replay, current.profile, device, progress
    )
    return _finish(
        settings,
        current,
        model,
        {**replay, name: new},
        report,
        started,
        "add-specialist",
        f"specialist {name!r} added",
    )


def remove_specialist(
    settings: Settings, name: str, recalibrate_steps: int = 0, progress: ProgressFn = _quiet
) -> JobResult:
    """Drop a specialist from the model and move its corpus to data/.deleted/ (never deleted)."""
    validate_specialist_name(name)
    device = configure_torch(settings)
    current = load_current(settings, device)
    if name not in current.model.cfg.specialists:
        raise NotFound(f"no specialist named {name!r}")
    if len(current.model.cfg.specialists) == 1:
        raise Conflict(f"{name!r} is the last specialist and cannot be removed")
    started = time.perf_counter()
    remaining = [GENERAL, *(s for s in current.model.cfg.specialists if s != name)]
    data = _tokenize(
        settings, current.tokenizer, [n for n in remaining if (settings.data_dir / n).is_dir()]
    )
    model, report = train.remove_specialist(
        current.model, name, data, current.profile, device, recalibrate_steps, progress
    )
    result = _finish(
        settings,
        current,
        model,
        data,
        report,
        started,
        "remove-specialist",
        f"specialist {name!r} removed",
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
    data = _tokenize(settings, current.tokenizer, names)
    result = train.evaluate(current.model, data, current.profile, device)
    result["version"] = current.id
    result["profile"] = current.profile.name
    return result
