"""The model's invariants: causality, growth that preserves function, exact removal."""

from __future__ import annotations

import pytest
import torch

from shiftable_lib.errors import Conflict, InvalidName, NotFound
from shiftable_lib.losses import FusedLinearCrossEntropy
from shiftable_lib.model import ShiftableLM
from shiftable_lib.sampling import Routing
from tests.conftest import perturbed

ROUTINGS = [
    Routing(),
    Routing(mode="top1"),
    Routing(mode="topk", k=2),
    Routing(force=("ds",)),
    Routing(force=("general", "dl")),
    Routing(exclude=("general",)),
]


def _changed_at(idx: torch.Tensor, t: int, vocab: int) -> torch.Tensor:
    other = idx.clone()
    other[:, t] = (other[:, t] + 7) % vocab
    return other


@pytest.mark.parametrize("routing", ROUTINGS, ids=lambda r: f"{r.mode}-{r.force}-{r.exclude}")
def test_shiftable_model_is_causal_in_every_routing_mode(shiftable, routing):
    idx = torch.randint(
        0, shiftable.cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1)
    )
    for t in (0, 17, 39):
        a, _ = shiftable(idx, routing)
        b, _ = shiftable(_changed_at(idx, t, shiftable.cfg.vocab_size), routing)
        assert torch.equal(a[:, :t], b[:, :t]), f"positions before {t} saw token {t}"
        assert not torch.allclose(a[:, t:], b[:, t:]), "the change had no effect at all"


def test_generalist_is_causal(tiny_cfg):
    model = perturbed(ShiftableLM(tiny_cfg))
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 30))
    a, _ = model(idx)
    b, _ = model(_changed_at(idx, 12, tiny_cfg.vocab_size))
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_adding_a_specialist_changes_no_output(shiftable):
    """Exactly so in arithmetic; in floats up to rounding, as the gate's softmax now sums one
    more (zero) term. The new branch is not even computed: its gate weight is exactly 0."""
    idx = torch.randint(0, shiftable.cfg.vocab_size, (2, 40))
    before, _ = shiftable(idx)
    shiftable.add_specialist("law")
    after, gates = shiftable(idx, return_gates=True)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    assert torch.equal(after.argmax(-1), before.argmax(-1))
    assert all(bool((g[..., -1] == 0).all()) for g in gates), "a dormant branch got weight"


def test_waking_a_specialist_by_splitting_the_base_changes_no_output(shiftable):
    idx = torch.randint(0, shiftable.cfg.vocab_size, (2, 40))
    before, _ = shiftable(idx)
    shiftable.add_specialist("law")
    shiftable.wake_specialists(["law"], split=True)
    after, gates = shiftable(idx, return_gates=True)
    torch.testing.assert_close(before, after, rtol=0, atol=1e-5)
    assert all(bool((g[..., -1] > 0).all()) for g in gates), "the woken branch has no weight"


def test_removing_a_specialist_restores_the_previous_outputs(shiftable):
    idx = torch.randint(0, shiftable.cfg.vocab_size, (2, 40))
    before, _ = shiftable(idx)
    shiftable.add_specialist("law")
    shiftable.remove_specialist("law")
    after, _ = shiftable(idx)
    assert torch.equal(before, after)
    assert shiftable.experts == ("general", "ds", "dl")


def test_removing_a_specialist_renormalises_the_gate(shiftable):
    idx = torch.randint(0, shiftable.cfg.vocab_size, (2, 20))
    _, gates = shiftable(idx, return_gates=True)
    shiftable.remove_specialist("ds")
    _, fewer = shiftable(idx, return_gates=True)
    assert fewer[0].shape[-1] == 2
    torch.testing.assert_close(fewer[0].sum(-1), torch.ones(2, 20))
    # the first layer's gate sees only embeddings, so its remaining weights keep their ratio
    ratio_before = gates[0][..., 0] / gates[0][..., 2]
    torch.testing.assert_close(fewer[0][..., 0] / fewer[0][..., 1], ratio_before)


def test_forcing_one_expert_uses_it_alone(shiftable):
    idx = torch.randint(0, shiftable.cfg.vocab_size, (2, 20))
    forced, gates = shiftable(idx, Routing(force=("dl",)), return_gates=True)
    assert torch.equal(gates[0][..., 2], torch.ones(2, 20))
    # the same model with ds and base removed computes the same thing through the soft path
    only_dl = Routing(exclude=("general", "ds"))
    excluded, _ = shiftable(idx, only_dl)
    torch.testing.assert_close(forced, excluded, rtol=0, atol=1e-5)


def test_top1_routing_gives_one_expert_per_position(shiftable):
    idx = torch.randint(0, shiftable.cfg.vocab_size, (2, 20))
    _, gates = shiftable(idx, Routing(mode="top1"), return_gates=True)
    for g in gates:
        assert torch.equal((g > 0).sum(-1), torch.ones(2, 20, dtype=torch.long))


def test_routing_errors_name_the_problem(shiftable):
    idx = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(NotFound, match="no expert named 'law'"):
        shiftable(idx, Routing(force=("law",)))
    with pytest.raises(ValueError, match="excludes every expert"):
        shiftable(idx, Routing(exclude=("general", "ds", "dl")))
    with pytest.raises(ValueError, match="unknown routing mode"):
        shiftable(idx, Routing(mode="best"))


def test_growth_rejects_bad_and_duplicate_names(shiftable):
    with pytest.raises(Conflict):
        shiftable.add_specialist("ds")
    for bad in ("general", "../etc", "Law", "", "a/b"):
        with pytest.raises(InvalidName):
            shiftable.add_specialist(bad)
    with pytest.raises(NotFound):
        shiftable.remove_specialist("law")
    assert shiftable.experts == ("general", "ds", "dl")


def test_fused_cross_entropy_matches_the_reference():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(1100, 16, generator=gen, requires_grad=True)
    w = (torch.randn(50, 16, generator=gen) * 0.1).requires_grad_()
    targets = torch.randint(0, 50, (1100,), generator=gen)
    ref = torch.nn.functional.cross_entropy(h @ w.T, targets)
    ref.backward()
    ref_grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    fused = FusedLinearCrossEntropy.apply(h, w, targets)
    fused.backward()
    torch.testing.assert_close(fused, ref)
    torch.testing.assert_close(h.grad, ref_grads[0])
    torch.testing.assert_close(w.grad, ref_grads[1])


def test_serving_sees_every_change_to_the_weights(shiftable):
    """Joined expert weights are reused without gradients; any change must show through."""
    idx = torch.randint(0, shiftable.cfg.vocab_size, (2, 20))
    with torch.no_grad():
        before, _ = shiftable(idx)
        shiftable.blocks[0].attn.experts["ds"].qkv.weight.mul_(2)  # an in-place edit
        edited, _ = shiftable(idx)
    assert not torch.equal(before, edited)
    with torch.enable_grad():
        rebuilt, _ = shiftable(idx)  # with gradients nothing is reused
    torch.testing.assert_close(edited, rebuilt.detach(), rtol=0, atol=1e-6)
    opt = torch.optim.AdamW(shiftable.parameters(), lr=0.1, fused=True)
    loss, _ = shiftable(idx)
    loss.sum().backward()
    opt.step()  # fused: no version bump, so the model is told
    shiftable.weights_changed()
    with torch.no_grad():
        stepped, _ = shiftable(idx)
        rebuilt_after, _ = shiftable(idx)
    fresh, _ = shiftable(idx)
    torch.testing.assert_close(stepped, fresh.detach(), rtol=0, atol=1e-6)
    assert torch.equal(stepped, rebuilt_after)


def test_growing_and_shrinking_drop_joined_weights_of_the_old_expert_set(shiftable):
    idx = torch.randint(0, shiftable.cfg.vocab_size, (1, 8))
    with torch.no_grad():
        shiftable(idx)
        assert shiftable.blocks[0].attn._joined, "serving should have joined the weights"
        shiftable.add_specialist("law")
        assert not shiftable.blocks[0].attn._joined
        shiftable(idx)
        shiftable.remove_specialist("law")
        assert not shiftable.blocks[0].attn._joined


def test_the_gate_features_alone_are_those_of_the_full_pass(shiftable):
    idx = torch.randint(0, shiftable.cfg.vocab_size, (3, 20))
    with torch.no_grad():
        full = shiftable.trunk(idx)
        alone = shiftable.trunk(idx, features_only=True)
    assert alone.hidden is None and len(alone.features) == len(shiftable.blocks)
    for a, b in zip(alone.features, full.features, strict=True):
        assert torch.equal(a, b)
