"""Smoke test of `bench.prefill_stall`: both measurements run and report sane figures, on the
tiny profile (the figures themselves come from a real run, in docs/reliability.md)."""

from __future__ import annotations

import asyncio

from bench.prefill_stall import _worker_gaps, measure
from shiftable_lib.config import get_profile


def test_the_engine_and_the_worker_measure_a_longest_prompt_beside_running_streams() -> None:
    context = get_profile("tiny").context
    engine = measure("tiny", "cpu", rounds=1)
    assert 0 < engine["prompt_tokens"] < context  # left-truncated to the room it has
    assert engine["steady_step_ms"] > 0 and engine["tokenise_ms"] > 0
    assert engine["stall_ms"] >= engine["tokenise_ms"]
    worker = asyncio.run(_worker_gaps("tiny", "cpu", rounds=1))
    assert worker["device"] == "cpu"
    assert 0 < worker["steady_gap_ms"] <= worker["worst_gap_ms"]
