"""Smoke test of `bench.train`: the real training loop runs and reports a rate, on tiny sizes."""

from __future__ import annotations

import json

from bench.train import flops_per_token, main, measure
from shiftable_lib.config import get_profile
from shiftable_lib.model import ModelConfig


def test_measure_reports_a_positive_rate_and_no_mfu_on_cpu() -> None:
    result = measure("tiny", steps=2, warmup=1, device="cpu")
    assert result["profile"] == "tiny" and result["processes"] == 1
    assert result["device"] == "cpu" and result["steps"] == 2
    assert result["global_batch"] == [get_profile("tiny").batch_size, get_profile("tiny").context]
    assert result["tokens_per_s"] > 0 and result["parameters"] > 0
    assert result["mfu"] is None  # no GPU peak to divide by


def test_main_prints_json(capsys) -> None:
    main(["--profile", "tiny", "--steps", "1", "--warmup", "1", "--device", "cpu", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["tokens_per_s"] > 0


def test_flops_per_token_counts_the_tied_head() -> None:
    cfg = ModelConfig(vocab_size=100, context=8, n_layer=1, n_head=1, d_model=4)
    assert flops_per_token(cfg) == 6 * (12 * 4 * 4 + 100 * 4) + 12 * 1 * 8 * 4
