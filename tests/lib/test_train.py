"""Training: frozen weights stay bit-identical, a seed reproduces a run, phases report."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from shiftable_lib import evaluate, train
from shiftable_lib.config import get_profile
from shiftable_lib.corpus import load_domain
from shiftable_lib.model import ShiftableLM
from shiftable_lib.sampling import SOFT, Routing
from shiftable_lib.tokenizer import train_tokenizer
from tests.conftest import synthetic_documents, write_domain

PROFILE = get_profile("tiny", generalist_steps=20, specialist_max_steps=12, gate_steps=10)


def _data(home, names=("general", "ds", "dl")):
    domains = {n: load_domain(home / "data", n) for n in names}
    tok = train_tokenizer(domains["general"].train, PROFILE.vocab_size)
    return tok, {n: train.tokenize_domain(tok, d) for n, d in domains.items()}


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_training_specialists_leaves_every_frozen_weight_bit_identical(home):
    tok, data = _data(home)
    generalist, _ = train.train_generalist(data["general"], tok, PROFILE, "cpu")
    before = _state(generalist)
    model, _ = train.train_specialists(generalist, data, PROFILE, "cpu")
    after = model.state_dict()
    for key, value in before.items():
        if key.endswith((".gate", ".gate_tokens")):
            continue  # the base's gate row is trained with the other rows
        assert torch.equal(after[key], value), f"{key} changed"
    assert torch.equal(generalist.state_dict()["wte.weight"], before["wte.weight"])
    for name in ("ds", "dl"):
        branch = f"blocks.0.attn.experts.{name}.qkv.weight"
        assert not torch.equal(after[branch], before["blocks.0.attn.experts.general.qkv.weight"])


def test_adding_a_specialist_leaves_the_others_bit_identical(home):
    tok, data = _data(home)
    generalist, _ = train.train_generalist(data["general"], tok, PROFILE, "cpu")
    full, _ = train.train_specialists(
        generalist, {k: data[k] for k in ("general", "ds")}, PROFILE, "cpu"
    )
    before = _state(full)
    grown, report = train.add_specialist(
        full, data["dl"], {k: data[k] for k in ("general", "ds")}, PROFILE, "cpu"
    )
    after = grown.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()), "an old weight moved"
    assert grown.experts == ("general", "ds", "dl")
    assert set(report) == {"dl", "gate", "calibration"}


def test_a_seed_reproduces_training_exactly_on_cpu(home):
    tok, data = _data(home, ("general",))
    a, _ = train.train_generalist(data["general"], tok, PROFILE, "cpu")
    b, _ = train.train_generalist(data["general"], tok, PROFILE, "cpu")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), f"{ka} differs between two seeded runs"


def test_progress_reports_every_phase_with_rates_and_eta(home):
    tok, data = _data(home)
    seen: list[train.Progress] = []
    generalist, _ = train.train_generalist(data["general"], tok, PROFILE, "cpu", seen.append)
    train.train_specialists(generalist, data, PROFILE, "cpu", seen.append)
    phases = list(dict.fromkeys(p.phase for p in seen))
    assert phases == ["generalist", "specialist:ds", "specialist:dl", "gate"]
    last = [p for p in seen if p.phase == "generalist"][-1]
    assert last.step == last.total == PROFILE.generalist_steps
    assert last.tokens_per_s > 0 and last.eta_s == 0 and last.loss > 0


def test_the_generalist_learns_and_the_best_checkpoint_is_kept(home):
    tok, data = _data(home, ("general",))
    cfg_untrained = get_profile("tiny", generalist_steps=1)
    untrained, _ = train.train_generalist(data["general"], tok, cfg_untrained, "cpu")
    trained, report = train.train_generalist(data["general"], tok, PROFILE, "cpu")
    ppl = [
        evaluate.perplexity(m, data["general"].heldout, 64, 8, Routing(), "cpu")
        for m in (untrained, trained)
    ]
    assert ppl[1] < ppl[0] * 0.5
    assert abs(report["best_eval"] - ppl[1]) < 1e-3 * ppl[1]


@pytest.mark.parametrize("window", [0, 16], ids=["whole-context", "short-windows"])
def test_gate_training_routes_documents_to_their_own_specialist(home, window):
    profile = get_profile(
        "tiny", generalist_steps=20, specialist_max_steps=12, gate_steps=100, gate_window=window
    )
    assert profile.gate_rows * profile.gate_window_tokens == profile.batch_size * profile.context
    tok, data = _data(home)
    generalist, _ = train.train_generalist(data["general"], tok, profile, "cpu")
    model, _ = train.train_specialists(generalist, data, profile, "cpu")
    routing = evaluate.routing_accuracy(
        model, {n: d.heldout_docs for n, d in data.items()}, 64, 8, "cpu"
    )
    assert min(routing.values()) >= 0.75, routing


def test_the_add_trains_the_new_gate_row_for_its_own_number_of_steps(home):
    profile = replace(PROFILE, gate_window=16, gate_add_steps=30, gate_replay_weight=2.0)
    tok, data = _data(home)
    generalist, _ = train.train_generalist(data["general"], tok, profile, "cpu")
    replay = {k: data[k] for k in ("general", "ds")}
    full, _ = train.train_specialists(generalist, replay, profile, "cpu")
    seen: list[train.Progress] = []
    train.add_specialist(full, data["dl"], replay, profile, "cpu", seen.append)
    gate = [p for p in seen if p.phase == "gate"]
    assert (gate[-1].step, gate[-1].total) == (30, 30)


def test_an_adds_gate_phase_runs_three_experts_a_step(home, monkeypatch):
    """A step of an add's gate phase runs one forward of the base, the new expert and one of
    the frozen specialists, whose domain gives the step's windows of frozen domains, in turn:
    it costs the same however many specialists the model has, and each frozen domain still
    gets its share of the windows. When every row trains, each step runs every expert."""
    tok, data = _data(home)
    generalist, _ = train.train_generalist(data["general"], tok, PROFILE, "cpu")
    replay = dict(data)
    full, _ = train.train_specialists(generalist, replay, PROFILE, "cpu")
    full.add_specialist("more")  # a third specialist, untrained and with no text: never run
    full.wake_specialists(["more"], split=False)
    new = train.DomainTokens("new", data["dl"].train, data["dl"].heldout, data["dl"].heldout_docs)
    ran: list[tuple[tuple[str, ...], int]] = []  # experts run, rows
    trunk = ShiftableLM.trunk

    def counting(self, idx, routing=SOFT, features_only=False):
        if features_only and self.training is False and isinstance(routing, Routing):
            allowed = routing.allowed(self.experts)
            ran.append((tuple(e for e, ok in zip(self.experts, allowed, strict=True) if ok), 0))
        return trunk(self, idx, routing, features_only)

    monkeypatch.setattr(ShiftableLM, "trunk", counting)
    model, _ = train.add_specialist(full, new, replay, PROFILE, "cpu")
    assert model.experts == ("general", "ds", "dl", "more", "new")
    gate_steps = [e for e, _ in ran][: PROFILE.add_gate_steps]
    assert gate_steps[:4] == [("general", "ds", "new"), ("general", "dl", "new")] * 2
    assert gate_steps.count(("general", "ds", "new")) == PROFILE.add_gate_steps // 2

    ran.clear()
    train.train_gate(model, {**replay, "new": new}, list(model.experts), PROFILE, "cpu", _quiet)
    assert ran and {e for e, _ in ran} == {model.experts}
    assert len(ran) == PROFILE.gate_steps  # one forward a step


def test_a_gate_step_draws_every_domains_share_of_windows(home, monkeypatch):
    """Frozen domains share one slot of a step's windows in turn; general and the domains whose
    rows train are in every step; over the phase each domain gets an equal share."""
    tok, data = _data(home)
    generalist, _ = train.train_generalist(data["general"], tok, PROFILE, "cpu")
    replay = dict(data)
    full, _ = train.train_specialists(generalist, replay, PROFILE, "cpu")
    full.add_specialist("new")
    full.wake_specialists(["new"], split=False)
    new = train.DomainTokens("new", data["general"].heldout, data["dl"].heldout, [])
    texts = {**replay, "new": new}
    drawn: list[tuple[str, int]] = []
    sample = train.WindowSampler.sample

    def recording(self, n):
        drawn.append((next(k for k, d in texts.items() if d.train is self.tokens), n))
        return sample(self, n)

    monkeypatch.setattr(train.WindowSampler, "sample", recording)
    train.train_gate(full, texts, ["new"], PROFILE, "cpu", _quiet, steps=4, batches=2)
    rows = PROFILE.gate_rows * 2
    each = rows // 4
    steps = [drawn[i : i + 3] for i in range(0, len(drawn), 3)]
    assert len(steps) == 4
    for i, step in enumerate(steps):
        frozen = ("ds", "dl")[i % 2]
        assert sorted(step) == sorted([("general", each), ("new", each), (frozen, 2 * each)])


def _quiet(_: train.Progress) -> None:
    pass


def _windows_of(stream: torch.Tensor, row: torch.Tensor) -> bool:
    """Whether `row` is a window of `stream`."""
    return bool((stream.unfold(0, len(row), 1) == row).all(-1).any())


def test_a_branch_batch_mixes_in_general_text(home, monkeypatch):
    """`branch_replay` of each branch batch is windows of the general training text; the rest
    its own, and none of another specialist's."""
    tok, data = _data(home)
    generalist, _ = train.train_generalist(data["general"], tok, PROFILE, "cpu")
    model = train._copy(generalist)
    model.add_specialist("ds")
    batches: list[torch.Tensor] = []
    loss = ShiftableLM.loss

    def recording(self, idx, targets, routing=SOFT):
        batches.append(torch.cat([idx, targets[:, -1:]], 1))
        return loss(self, idx, targets, routing)

    monkeypatch.setattr(ShiftableLM, "loss", recording)
    train.train_branch(model, data["ds"], data["general"], PROFILE, "cpu", train._silent)
    mixed = round(PROFILE.batch_size * PROFILE.branch_replay)
    assert mixed > 0 and batches
    for batch in batches:
        own = [_windows_of(data["ds"].train, row) for row in batch]
        assert sum(own) == PROFILE.batch_size - mixed
        for row in batch[[not o for o in own]]:
            assert _windows_of(data["general"].train, row)
            assert not _windows_of(data["dl"].train, row)


def test_replay_keeps_a_branch_close_to_the_base_on_general_text(home):
    """A branch trained on its own text alone predicts general text worse than the base does;
    one trained with some of it in every batch, much less so."""
    profile = replace(PROFILE, specialist_min_steps=60, specialist_max_steps=60)
    tok, data = _data(home)
    generalist, _ = train.train_generalist(data["general"], tok, profile, "cpu")

    def cost_on_general(share: float) -> float:
        model = train._copy(generalist)
        model.add_specialist("ds")
        mixed = replace(profile, branch_replay=share)
        train.train_branch(model, data["ds"], data["general"], mixed, "cpu", train._silent)
        held = data["general"].heldout
        forced, base = Routing(force=("ds",)), Routing(force=("general",))
        return math.log(
            evaluate.perplexity(model, held, 64, 8, forced, "cpu")
            / evaluate.perplexity(model, held, 64, 8, base, "cpu")
        )

    alone, replayed = cost_on_general(0.0), cost_on_general(0.25)
    assert alone > 0.1 and replayed < alone / 2, (alone, replayed)


def test_calibration_reads_text_no_part_of_the_model_was_trained_on(home, monkeypatch):
    """The first training calibrates on the calibration text alone (what a model predicts on
    its training text is no guide to other text); an add on that and the training text (the
    larger pool holds the rare kinds of text its per-window bound is for)."""
    write_domain(home / "data", "general", synthetic_documents("general", 200))
    tok, data = _data(home)
    general = data["general"]
    assert general.calibration.numel() > PROFILE.context  # set apart by the corpus split
    assert general.unseen(PROFILE.context) is general.calibration
    tiny = replace(general, calibration=general.calibration[: PROFILE.context])
    assert tiny.unseen(PROFILE.context) is general.train  # too little: the training text
    generalist, _ = train.train_generalist(general, tok, PROFILE, "cpu")
    read: list[dict[str, torch.Tensor]] = []
    calibrate = train.calibrate_rows

    def recording(model, name, texts, *args, **kwargs):
        read.append(texts)
        assert kwargs["context"] == PROFILE.context  # the windows training uses
        return calibrate(model, name, texts, *args, **kwargs)

    monkeypatch.setattr(train, "calibrate_rows", recording)
    kept = {k: data[k] for k in ("general", "ds")}
    full, _ = train.train_specialists(generalist, kept, PROFILE, "cpu")
    first = len(read)
    assert first
    assert all(list(t) == ["general"] and t["general"] is general.calibration for t in read)
    train.add_specialist(full, data["dl"], kept, PROFILE, "cpu")
    (added,) = read[first:]
    assert set(added) == {"general", "ds"}
    for n, text in added.items():
        assert torch.equal(text, torch.cat([data[n].calibration, data[n].train]))
