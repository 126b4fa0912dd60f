"""Smoke test of `bench.prefill_stall`: both measurements run and report sane figures, on the
tiny profile (the figures themselves come from a real run, in docs/reliability.md)."""

from __future__ import annotations

import asyncio

from bench.prefill_stall import _worker_gaps, measure


def test_the_engine_and_the_worker_measure_a_longest_prompt_beside_running_streams() -> None:
    engine = measure("tiny", "cpu", context=600, rounds=1)
    assert engine["context"] == 600 and 300 < engine["prompt_tokens"] < 600  # two chunks
    assert engine["tokenise_ms"] > 0
    for name in ("whole", "chunked"):
        assert 0 < engine[f"{name}_steady_ms"] <= engine[f"{name}_worst_ms"]
    worker = asyncio.run(_worker_gaps("tiny", "cpu", rounds=1))
    assert worker["device"] == "cpu"
    assert 0 < worker["steady_gap_ms"] <= worker["worst_gap_ms"]
