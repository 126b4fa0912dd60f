"""Smoke test of `bench.pretrained` on a tiny random Llama: the imported model's held-out
perplexity is `transformers`' on the same windows, both decode, and specialists grow on it."""

from __future__ import annotations

from pathlib import Path

from bench.pretrained import measure
from tests.conftest import synthetic_documents, write_domain
from tests.hf_models import hf_model, save_hf


def test_the_imported_model_scores_the_windows_transformers_does(tmp_path: Path, tokenizer) -> None:
    folder = save_hf(hf_model("llama", tokenizer.get_vocab_size()), tokenizer, tmp_path / "llama")
    home = tmp_path / "home"
    for name, words in (("general", "general"), ("datascience", "ds"), ("deeplearning", "dl")):
        write_domain(home / "data", name, synthetic_documents(words, 60))
    result = measure(folder, home, "cpu", window=16, grow=True, profile="tiny")
    assert result["version"] == "v0001" and result["dtype"] == "float32"
    assert set(result["domains"]) == {"general", "datascience", "deeplearning"}
    for d in result["domains"].values():
        assert d["windows"] >= 2 and d["ppl"] > 1
        assert abs(d["difference"]) < 1e-4  # the same model, whoever runs it
        assert 0 < d["bits_per_byte"] < 20
    assert list(result["decode"]) == [1]
    assert result["decode"][1]["ours"] > 0 and result["decode"][1]["transformers"] > 0
    # then the demo's specialists grow on it, each add timed (or refused for its drift)
    grown = result["grown"]
    assert set(grown["adds"]) == {"datascience", "deeplearning"}
    assert all(add["seconds"] > 0 for add in grown["adds"].values())
    published = [name for name, add in grown["adds"].items() if "version" in add]
    expected = {"general", *published} if published else set()  # v0001 has no metrics
    assert set(grown["metrics"]) == expected
    for base, with_specialists in grown["completions"].values():
        assert isinstance(base, str) and isinstance(with_specialists, str)
