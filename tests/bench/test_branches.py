"""Smoke test of `bench.branches` on a tiny random Llama: every variant trains a branch of
the domain on the imported base, a low-rank branch starts as the base, and trains far fewer
parameters than a full copy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.branches import PROBE, Variant, branch, measure
from shiftable_lib import pretrained
from shiftable_lib.sampling import Routing
from tests.conftest import synthetic_documents, write_domain
from tests.hf_models import hf_model, save_hf


def test_a_low_rank_branch_starts_as_the_base(tmp_path: Path, tokenizer) -> None:
    folder = save_hf(hf_model("llama", tokenizer.get_vocab_size()), tokenizer, tmp_path / "llama")
    model = pretrained.read_pretrained(folder).model().eval()
    idx = torch.randint(0, tokenizer.get_vocab_size(), (2, 12))
    before = model(idx)[0]
    params = branch(model, Variant(rank=2, lr=1e-3))
    with torch.no_grad():
        assert torch.equal(model(idx, Routing(force=(PROBE,)))[0], before)
    # two factors per projection (q/k/v and output), in every layer
    assert len(params) == 4 * model.cfg.n_layer
    full = branch(pretrained.read_pretrained(folder).model(), Variant(rank=0, lr=1e-3))
    assert sum(p.numel() for p in params) < sum(p.numel() for p in full) / 2


def test_every_variant_trains_a_branch_on_the_imported_base(tmp_path: Path, tokenizer) -> None:
    folder = save_hf(hf_model("llama", tokenizer.get_vocab_size()), tokenizer, tmp_path / "llama")
    home = tmp_path / "home"
    for name, words in (("general", "general"), ("datascience", "ds")):
        write_domain(home / "data", name, synthetic_documents(words, 60))
    variants = [Variant(0, 3e-3), Variant(2, 1e-2)]
    result = measure(folder, home, "cpu", "datascience", variants, steps=6, profile="tiny")
    assert set(result["base_ppl"]) == {"datascience", "general"}
    rows = result["variants"]
    assert list(rows) == ["full @ 0.003", "rank 2 @ 0.01"]
    assert rows["rank 2 @ 0.01"]["parameters"] < rows["full @ 0.003"]["parameters"]
    for row in rows.values():
        assert row["steps"] == 6 and row["seconds"] > 0
        assert 0 < row["ratio"] < 2 and 0 < row["general_ratio"] < 2
        assert len(row["loss_curve"]) >= 1


def test_a_variant_is_named_clearly() -> None:
    assert Variant.parse("r16@2e-3") == Variant(16, 2e-3)
    assert Variant.parse("full@6e-4") == Variant(0, 6e-4)
    with pytest.raises(ValueError, match="full@LR or rN@LR"):
        Variant.parse("lora@1e-3")
