"""Job plans: a job runs the phases it plans, and records the corpora it was trained on."""

from __future__ import annotations

from pathlib import Path

import pytest

from shiftable_lib import checkpoint, jobs, plan, train, versions
from shiftable_lib import corpus as corpus_module
from shiftable_lib.config import Settings, get_profile
from shiftable_lib.corpus import corpus_digest, load_domain
from shiftable_lib.demo_corpus import DEFAULT_MAX_BYTES
from tests.conftest import synthetic_documents, write_domain


def _settings(home: Path) -> Settings:
    return Settings(home=home, profile="tiny", device="cpu", threads=1)


class Recorder:
    """The `progress` and `on_plan` callbacks of a job, remembered."""

    def __init__(self) -> None:
        self.plans: list[list[plan.PlannedPhase]] = []
        self.reports: list[train.Progress] = []

    def planned(self) -> list[plan.PlannedPhase]:
        return [p for phases in self.plans for p in phases]

    def reported_phases(self) -> list[str]:
        return list(dict.fromkeys(r.phase for r in self.reports))

    def totals(self) -> dict[str, int]:
        return {r.phase: r.total for r in self.reports}


def _digests(settings: Settings) -> dict[str, str]:
    current = versions.current_version(settings.models_dir)
    assert current is not None
    return versions.version_config(settings.models_dir, current)["corpus_digests"]


DEMO_SPECIALISTS = [plan.specialist_phase(n) for n in ("datascience", "deeplearning")]


def test_the_first_start_plans_the_demo_corpus_the_generalist_and_the_demos_specialists(
    tmp_path: Path,
):
    """The demo's specialists are planned before their corpora exist, each of about its cap
    (`DEFAULT_MAX_BYTES`), so that the first plan weighs the demo corpus against the whole
    start rather than against the generalist alone."""
    phases = plan.plan_train_all(_settings(tmp_path), demo_if_empty=True)
    names = [p.name for p in phases]
    stages = [plan.GATE, plan.EVALUATE]
    assert names[:4] == [plan.DEMO_CORPUS, plan.TOKENIZER, plan.GENERALIST, plan.EVALUATE]
    assert names[4:] == [*DEMO_SPECIALISTS, *stages]
    profile = get_profile("tiny")
    expected = plan.specialist_steps(
        round(plan.TRAIN_SHARE * DEFAULT_MAX_BYTES["datascience"] / plan.BYTES_PER_TOKEN), profile
    )
    assert phases[4].steps == expected > 0


def base_first_start(home: Path, base_bytes: int = 0) -> list[plan.PlannedPhase]:
    """The first plan of a start on a base of `base_bytes` (a sparse file; none for 0) with the
    demo corpus to build, `datascience`'s 10 documents already there."""
    write_domain(home / "data", "datascience", synthetic_documents("ds", 10))
    base = home / "b.gguf"
    if base_bytes:
        with base.open("wb") as f:
            f.truncate(base_bytes)
    settings = Settings(home=home, profile="tiny", device="cpu", threads=1, base=base)
    return plan.plan_train_all(settings, demo_if_empty=True)


def test_a_bases_steps_are_planned_by_its_size_against_the_profiles_model(tmp_path: Path):
    """A step on a base costs its bytes over the profile's own float32 weights times a step on
    the profile's model; never less than one."""
    tiny = get_profile("tiny")
    own = 4 * (12 * tiny.n_layer * tiny.d_model**2 + tiny.vocab_size * tiny.d_model)
    phases = base_first_start(tmp_path, base_bytes=50 * own)
    assert {p.scale for p in phases if p.steps} == {50.0}
    assert {p.scale for p in phases if not p.steps} == {1.0}  # the corpus, import, evaluation
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x" * 100)
    assert plan.base_scale(folder, tiny) == 1.0


def test_a_first_start_on_a_base_plans_the_import_then_the_demos_specialists(tmp_path: Path):
    """A specialist already there is measured, the rest planned at their caps."""
    phases = base_first_start(tmp_path)
    assert [p.name for p in phases] == [
        plan.DEMO_CORPUS,
        plan.IMPORT,
        *DEMO_SPECIALISTS,
        plan.GATE,
        plan.EVALUATE,
    ]
    profile = get_profile("tiny")
    assert phases[2].steps == profile.specialist_min_steps  # 10 documents: the least
    assert phases[3].steps > phases[2].steps  # 3 MB expected


def test_train_all_runs_the_phases_it_plans(home: Path):
    settings = _settings(home)
    assert plan.plan_train_all(settings) == plan.decide_train_all(settings).phases
    seen = Recorder()
    jobs.train_all(settings, progress=seen.reports.append, on_plan=seen.plans.append)
    planned = seen.planned()
    assert [p.name for p in planned if p.reported] == seen.reported_phases()
    assert [p.name for p in planned if not p.reported] == [plan.EVALUATE, plan.EVALUATE]
    stepped = {p.name: p.steps for p in planned if p.steps and "specialist:" not in p.name}
    assert stepped == {n: t for n, t in seen.totals().items() if n in stepped}
    assert _digests(settings) == {
        n: corpus_digest(home / "data" / n) for n in ("general", "ds", "dl")
    }

    decision = plan.decide_train_all(settings)
    assert (decision.reason, decision.phases) == (plan.UP_TO_DATE, [])
    (home / "data" / "ds" / "more.txt").write_text("the same domain, changed\n")
    changed = plan.decide_train_all(settings)
    assert changed.reason == "" and plan.specialist_phase("ds") in [p.name for p in changed.phases]
    assert changed.digests["ds"] == corpus_digest(home / "data" / "ds")


@pytest.mark.parametrize("recalibrate_steps", [0, 5])
def test_add_and_remove_run_their_plans_and_keep_every_digest(home: Path, recalibrate_steps):
    settings = _settings(home)
    jobs.train_all(settings)
    trained = _digests(settings)
    write_domain(home / "data", "extra", synthetic_documents("dl", 20, seed=1))
    (home / "data" / "ds" / "later.txt").write_text("written after ds was trained\n")

    added = Recorder()
    expected = plan.plan_add_specialist(settings, "extra")
    jobs.add_specialist(settings, "extra", added.reports.append, added.plans.append)
    assert added.plans == [expected]
    assert [p.name for p in expected] == ["specialist:extra", plan.GATE, plan.EVALUATE]
    assert [p.name for p in expected if p.reported] == added.reported_phases()
    assert _digests(settings) == {**trained, "extra": corpus_digest(home / "data" / "extra")}

    removed = Recorder()
    jobs.remove_specialist(
        settings, "dl", recalibrate_steps, removed.reports.append, removed.plans.append
    )
    assert removed.plans == [plan.plan_remove_specialist(recalibrate_steps)]
    assert removed.reported_phases() == ([plan.GATE] if recalibrate_steps else [])
    kept = {n: d for n, d in trained.items() if n != "dl"}
    assert _digests(settings) == {**kept, "extra": corpus_digest(home / "data" / "extra")}


def test_an_add_reads_only_a_sample_of_large_other_corpora(home: Path, monkeypatch) -> None:
    """The gate phase and the checks of an add read at most REPLAY_CHARS of each other domain:
    its cost does not grow with their size. The version keeps their token counts as they were
    (the plan's bytes-per-token estimate rests on them), and counts the new corpus whole."""
    settings = _settings(home)
    jobs.train_all(settings)
    trained = checkpoint.load_version(settings.models_dir, "v0002", "cpu").meta["corpus_tokens"]
    write_domain(home / "data", "extra", synthetic_documents("dl", 20, seed=1))
    read: dict[str, int] = {}
    real = jobs.tokenize_domain

    def counting(tok, domain, *rest):
        read[domain.name] = sum(map(len, domain.train))
        return real(tok, domain, *rest)

    monkeypatch.setattr(jobs, "tokenize_domain", counting)
    monkeypatch.setattr(jobs, "sampled", lambda d: corpus_module.sampled(d, 2_000))
    result = jobs.add_specialist(settings, "extra")
    whole = load_domain(home / "data", "ds")
    assert sum(map(len, whole.train)) > 4_000 >= read["ds"] and read["general"] <= 4_000
    assert read["extra"] == sum(map(len, load_domain(home / "data", "extra").train))
    tokens = checkpoint.load_version(settings.models_dir, result.version, "cpu").meta
    assert {n: tokens["corpus_tokens"][n] for n in trained} == trained
