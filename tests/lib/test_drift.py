"""An add never makes the rest of the model worse than the limit: the new gate rows are
calibrated to leave the other domains as they were, each add reports every domain before and
after, and a model over the limit is not published."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from shiftable_lib import checkpoint, evaluate, jobs, train
from shiftable_lib.config import Settings
from shiftable_lib.corpus import GENERAL
from shiftable_lib.errors import DriftTooLarge
from shiftable_lib.sampling import Routing
from shiftable_lib.versions import current_version, version_ids
from tests.conftest import synthetic_documents, train_tiny_home, write_domain

LIMIT = 0.5  # percent: the default SMA_MAX_DRIFT


def test_an_add_that_overlaps_the_general_text_is_within_the_limit_or_not_published(
    tmp_path: Path,
) -> None:
    """The regression this guards: a specialist whose text is of the general corpus's own kind
    made general worse by a few percent, and was published. Now the add either keeps every
    other domain within the limit (checked here on the versions as written, not on the job's
    own report) or fails with the figures and publishes nothing."""
    models = train_tiny_home(tmp_path)
    settings = Settings(home=tmp_path, profile="tiny", device="cpu", threads=1, max_drift=LIMIT)
    before = current_version(models)
    # general's own words, other documents: the domain overlaps general completely
    write_domain(tmp_path / "data", "overlap", synthetic_documents(GENERAL, 60, seed=5))
    try:
        result = jobs.add_specialist(settings, "overlap")
    except DriftTooLarge as refused:
        assert f"worse than the {LIMIT:g}% limit" in str(refused)
        assert "%" in str(refused).split("limit: ")[1]  # the figures: "ds +0.71% (…)"
        assert current_version(models) == before and version_ids(models)[-1] == before
        return
    metrics = result.metrics
    assert metrics["max_drift"] == LIMIT
    assert metrics["training"]["calibration"]["gate_offset"] >= 0
    old = checkpoint.load_version(models, before, "cpu")
    new = checkpoint.load_version(models, result.version, "cpu")
    data = jobs.tokenize_domains(settings, old.tokenizer, [GENERAL, "ds", "dl"])
    windows = old.profile.eval_windows
    for name, d in data.items():  # the version's figures, measured again on what was written
        before_ppl, after_ppl = (
            evaluate.perplexity(m.model, d.heldout, old.profile.context, windows, Routing(), "cpu")
            for m in (old, new)
        )
        assert (after_ppl / before_ppl - 1) * 100 <= LIMIT, (name, before_ppl, after_ppl)
        change = after_ppl / before_ppl - 1
        assert metrics["changes"][name]["change"] == pytest.approx(change, abs=1e-5)
    # its own text is reported too: general's kind of text gains little from a branch of it
    assert metrics["changes"]["overlap"]["before"] > 0


def test_a_limit_of_zero_refuses_any_add_that_makes_another_domain_worse(tmp_path: Path) -> None:
    models = train_tiny_home(tmp_path)
    settings = Settings(home=tmp_path, profile="tiny", device="cpu", threads=1, max_drift=0.0)
    before = current_version(models)
    write_domain(tmp_path / "data", "web", synthetic_documents("dl", 40, seed=3))
    try:
        result = jobs.add_specialist(settings, "web")
    except DriftTooLarge as refused:
        assert "worse than the 0% limit" in str(refused) and "Ask again" in str(refused)
        assert current_version(models) == before
        return
    others = {n: c for n, c in result.metrics["changes"].items() if n != "web"}
    assert all(c["change"] <= 0 for c in others.values()), others  # published: none worse


def test_the_drift_check_names_every_domain_over_the_limit_worst_first() -> None:
    changes = {
        "general": {"before": 80.0, "after": 80.2, "change": 0.0025},
        "ds": {"before": 100.0, "after": 103.0, "change": 0.03},
        "dl": {"before": 90.0, "after": 91.0, "change": 0.0111},
        "new": {"before": 200.0, "after": 50.0, "change": -0.75},
    }
    jobs._check_drift(changes, 5.0, "new", "add")  # within 5%: nothing raised
    with pytest.raises(DriftTooLarge) as refused:
        jobs._check_drift(changes, 0.5, "new", "specialist 'new' added")
    message = str(refused.value)
    assert message.index("ds +3.00% (100.00 -> 103.00)") < message.index("dl +1.11%")
    assert "general" not in message and "new" not in message.split("limit")[1]


def _training_windows(tokens, context: int):
    n = (tokens.numel() - 1) // context
    return torch.stack([tokens[i * context : (i + 1) * context + 1] for i in range(n)])


def test_deleting_any_specialist_of_a_first_training_leaves_the_general_text_as_it_was(
    tmp_path: Path,
) -> None:
    """The first training calibrates each specialist so that the general text does not lean on
    it: deleting it does not make that text worse. Checked here on every window of general's
    training text, where the calibration looked only at a sample, with each specialist removed
    from the model as a deletion removes it; first on the model as trained, then on one whose
    `dl` branch carries general text (the base's attention, the base a worse one) and whose
    gate sends general text to it (the case the calibration is for; a tiny model's gate keeps
    general text on the base by itself)."""
    models = train_tiny_home(tmp_path)
    settings = Settings(home=tmp_path, profile="tiny", device="cpu", threads=1)
    current = checkpoint.load_version(models, current_version(models), "cpu")
    calibration = current.metrics["training"]["calibration"]
    assert all(calibration[n]["gate_offset"] >= 0 for n in ("ds", "dl"))
    data = jobs.tokenize_domains(settings, current.tokenizer, list(current.model.experts))
    rows = _training_windows(data[GENERAL].train, current.profile.context)

    def deleting(model) -> dict[str, float]:
        """Per specialist: general's perplexity without it, relative to with it."""
        kept = evaluate.window_losses(model, rows, Routing(), "cpu")
        moved = {}
        for name in model.cfg.specialists:
            without = train._copy(model)
            without.remove_specialist(name)
            delta = evaluate.window_losses(without, rows, Routing(), "cpu") - kept
            moved[name] = math.exp(delta.mean().item()) - 1
        return moved

    assert all(c <= 2 * train.DRIFT_TARGET for c in deleting(current.model).values())
    carrier = train._copy(current.model)
    with torch.no_grad():  # dl gets the base's attention, the base a worse one
        for block in carrier.blocks:
            base, dl = block.attn.experts[GENERAL], block.attn.experts["dl"]
            dl.qkv.weight.copy_(base.qkv.weight)
            dl.proj.weight.copy_(base.proj.weight)
            base.proj.weight.mul_(-3.0)
            dl.gate[-1] += 35.0
    carrier.weights_changed()
    assert deleting(carrier)["dl"] > 4 * train.DRIFT_TARGET  # general text leans on dl
    report = train.calibrate_all(carrier, data, "cpu", carrier.cfg.context)
    assert report["dl"]["gate_offset"] > 0
    moved = deleting(carrier)
    assert all(c <= 2 * train.DRIFT_TARGET for c in moved.values()), moved
