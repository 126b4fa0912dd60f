"""What a job will do, decided before it does it: the phases it runs, in order, with their steps.

The phase names below are the ones `train.Progress.phase` reports, defined here once. The
decisions are the jobs' own: `jobs.train_all` asks `decide_train_all` whether it needs the demo
corpus, a generalist and a specialists stage, then does exactly that, and hands the decision's
phases to its `on_plan` callback; `add_specialist` and `remove_specialist` do the same with
`plan_add_specialist` and `plan_remove_specialist`. A progress estimate built on a plan (the
training service's) therefore cannot disagree with the work.

Torch-free on purpose: it reads folders and the current version's config.json, never a model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shiftable_lib import versions
from shiftable_lib.config import Profile, Settings, get_profile
from shiftable_lib.corpus import (
    GENERAL,
    HELDOUT_PERMILLE,
    Corpus,
    check_corpus,
    corpus_digest,
    discover_specialists,
    text_files,
)
from shiftable_lib.demo_corpus import DEFAULT_MAX_BYTES, DEMO_DOMAINS
from shiftable_lib.errors import NotFound
from shiftable_lib.tokenizer import load_tokenizer

DEMO_CORPUS = "demo corpus"
TOKENIZER = "tokenizer"
GENERALIST = "generalist"
IMPORT = "import"
GATE = "gate"
# evaluating and publishing a version: the library reports no progress for it, so whoever
# follows a plan enters it when the phase before it ends
EVALUATE = "evaluate"
SPECIALIST_PREFIX = "specialist:"

UP_TO_DATE = "specialists are up to date"
NO_SPECIALISTS = "no specialist corpora under data/"

BYTES_PER_TOKEN = 4.0  # a corpus's tokens from its bytes, until a model has counted them
TRAIN_SHARE = 1 - HELDOUT_PERMILLE / 1000  # a corpus's training split, by bytes (about)


def specialist_phase(name: str) -> str:
    """The phase that trains specialist `name`'s branch."""
    return SPECIALIST_PREFIX + name


@dataclass(frozen=True)
class PlannedPhase:
    """One phase of a plan. `steps` counts optimiser steps (0 for work without steps); a
    branch's is estimated from its corpus size, and the phase reports its real total when it
    starts. `reported` is False for work the library sends no progress for."""

    name: str
    steps: int = 0
    reported: bool = True
    # what a step costs next to one of the profile's own model: an imported base is larger,
    # while the demo corpus and the import, work without steps, do not grow with it
    scale: float = 1.0


PlanFn = Callable[[list[PlannedPhase]], None]


def ignore_plan(_: list[PlannedPhase]) -> None:
    pass


def specialist_steps(tokens: int, profile: Profile) -> int:
    """Steps for one branch: `specialist_epochs` over its corpus, clamped to the profile."""
    per_step = profile.batch_size * profile.context
    steps = round(profile.specialist_epochs * tokens / per_step)
    return max(profile.specialist_min_steps, min(profile.specialist_max_steps, steps))


@dataclass(frozen=True)
class TrainAllDecision:
    """What `train_all` does on the home as it is now.

    `specialists` are the specialist corpora under data/; `reason` says why the specialists
    stage is skipped ("" when it runs). `digests` are the corpora hashed to decide that they
    are up to date (only then, so that a job hashes each corpus once). With `demo_corpus` the
    decision is provisional: the corpus brings specialists, and `train_all` decides again
    once it is in place."""

    demo_corpus: bool
    generalist: bool
    profile: Profile
    specialists: list[str]
    reason: str
    digests: dict[str, str] = field(default_factory=dict)
    phases: list[PlannedPhase] = field(default_factory=list)


def decide_train_all(
    settings: Settings, profile_name: str | None = None, demo_if_empty: bool = False
) -> TrainAllDecision:
    """The generalist if there is no model, then a retrain of every specialist unless the
    model has exactly the specialists under data/, each trained on its corpus as it is now."""
    models, data = settings.models_dir, settings.data_dir
    current = versions.current_version(models)
    config = versions.version_config(models, current) if current else None
    if config is None:
        profile = get_profile(profile_name or settings.profile)
        trained, stored = [], {}
    else:
        profile = Profile.from_dict(config["profile"])
        trained = list(config["model"].get("specialists", []))
        stored = config.get("corpus_digests", {})
    demo = demo_if_empty and not text_files(data / GENERAL)
    found = discover_specialists(data)
    digests: dict[str, str] = {}
    if found == trained:  # only then can the model be up to date
        digests = {n: corpus_digest(data / n) for n in found}
    if found == trained and all(stored.get(n) == d for n, d in digests.items()):
        reason = UP_TO_DATE
    else:
        reason = "" if found else NO_SPECIALISTS
    phases = [PlannedPhase(DEMO_CORPUS)] if demo else []
    if config is None and settings.base is not None:
        phases.append(PlannedPhase(IMPORT))
    elif config is None:
        phases += [
            PlannedPhase(TOKENIZER),
            PlannedPhase(GENERALIST, profile.generalist_steps),
            PlannedPhase(EVALUATE, reported=False),
        ]
    scale = base_scale(settings.base, profile) if config is None and settings.base else 1.0
    gate = profile.gate_steps
    if demo:  # provisional: the demo corpus brings its specialists, each of about its cap
        coming = {n: DEFAULT_MAX_BYTES[n] for n in DEMO_DOMAINS if n != GENERAL}
        names = sorted({*found, *coming})
        phases += _specialists_stage(settings, names, profile, gate, config, coming, scale)
    elif not reason:
        phases += _specialists_stage(settings, found, profile, gate, config, scale=scale)
    return TrainAllDecision(demo, config is None, profile, found, reason, digests, phases)


def plan_train_all(
    settings: Settings, profile_name: str | None = None, demo_if_empty: bool = False
) -> list[PlannedPhase]:
    """The phases `jobs.train_all` would run now (hashing the corpora it would hash)."""
    return decide_train_all(settings, profile_name, demo_if_empty).phases


def plan_add_specialist(
    settings: Settings, name: str, config: dict | None = None
) -> list[PlannedPhase]:
    """The phases of `jobs.add_specialist(name)` on the version whose config.json is `config`
    (the current one when None): the new branch, its gate rows, evaluation."""
    if config is None:
        current = versions.current_version(settings.models_dir)
        if current is None:
            raise NotFound(f"no trained model under {settings.models_dir}: run `sma train` first")
        config = versions.version_config(settings.models_dir, current)
    profile = Profile.from_dict(config["profile"])
    return _specialists_stage(settings, [name], profile, profile.add_gate_steps, config)


def describe_corpus(settings: Settings, name: str) -> Corpus:
    """Corpus `name` as an add would read it: with the current version's tokenizer, its tokens
    are counted and a corpus too small for that version's model is refused (CorpusTooSmall).
    Before the first version there is no tokenizer: files, documents and characters only."""
    models = settings.models_dir
    current = versions.current_version(models)
    if current is None:
        return check_corpus(settings.data_dir, name)
    config = versions.version_config(models, current)
    tok = load_tokenizer(models / current / "tokenizer.json")
    return check_corpus(settings.data_dir, name, tok, Profile.from_dict(config["profile"]))


def plan_remove_specialist(recalibrate_steps: int) -> list[PlannedPhase]:
    """The phases of `jobs.remove_specialist`: the gate's recalibration if asked, evaluation."""
    gate = [PlannedPhase(GATE, recalibrate_steps)] if recalibrate_steps > 0 else []
    return [*gate, PlannedPhase(EVALUATE, reported=False)]


def _specialists_stage(
    settings: Settings,
    names: list[str],
    profile: Profile,
    gate_steps: int,
    config: dict | None,
    coming: dict[str, int] | None = None,
    scale: float = 1.0,
) -> list[PlannedPhase]:
    """The branches of `names`, the gate and the evaluation; `coming`: the bytes expected of
    corpora not written yet, by name (a corpus on disk is measured); `scale`: a step's cost
    next to one of the profile's own model (`PlannedPhase.scale`)."""
    per_token = _bytes_per_token(settings, config)
    coming = coming or {}

    def size(name: str) -> float:
        measured = _training_bytes(settings, name)
        return measured if measured > 0 or name not in coming else TRAIN_SHARE * coming[name]

    branches = [
        PlannedPhase(
            specialist_phase(n),
            specialist_steps(round(size(n) / per_token), profile),
            scale=scale,
        )
        for n in names
    ]
    gate = PlannedPhase(GATE, gate_steps, scale=scale)
    return [*branches, gate, PlannedPhase(EVALUATE, reported=False)]


def base_scale(base: Path, profile: Profile) -> float:
    """How much larger a step on the pretrained `base` is than one on the profile's own model,
    before it is imported: the checkpoint's bytes against the profile's float32 weights
    (`profile_bytes`). A quantised checkpoint holds fewer bytes than its weights take, so this
    errs low. At least 1."""
    files = [base] if base.is_file() else [*base.glob("*.safetensors"), *base.glob("*.gguf")]
    size = sum(f.stat().st_size for f in files if f.is_file())
    return max(1.0, size / profile_bytes(profile))


def profile_bytes(profile: Profile) -> int:
    """The float32 weights of the profile's own model, about: 12 d_model² a layer (attention
    and MLP) and the embeddings."""
    d = profile.d_model
    return 4 * (12 * profile.n_layer * d * d + profile.vocab_size * d)


def _training_bytes(settings: Settings, name: str) -> float:
    return TRAIN_SHARE * sum(p.stat().st_size for p in text_files(settings.data_dir / name))


def _bytes_per_token(settings: Settings, config: dict | None) -> float:
    """What the model's tokenizer made of its corpora (`corpus_tokens`, recorded with every
    version), else the BYTES_PER_TOKEN guess."""
    counted = {n: t for n, t in (config or {}).get("corpus_tokens", {}).items() if t > 0}
    size = sum(_training_bytes(settings, n) for n in counted)
    tokens = sum(counted.values())
    return size / tokens if size > 0 and tokens > 0 else BYTES_PER_TOKEN
