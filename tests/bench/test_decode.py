"""Smoke test of `bench.decode` (`sma bench`): it runs and reports sane rows, on tiny sizes."""

from __future__ import annotations

import sys

import pytest

from bench.decode import print_table, run_bench
from shiftable_lib.errors import ShiftableError

ROWS = (
    "decode tokens/s, generalist, batch 1",
    "decode tokens/s, generalist, batch 16",
    "decode tokens/s, shiftable 2 specialists, batch 1",
    "training tokens/s, generalist, batch 8x64",
)


def test_ours_alone_runs_without_transformers() -> None:
    result = run_bench("tiny", quick=True, device="cpu", reference=False)
    assert result["profile"] == "tiny" and result["new_tokens"] == 16
    assert [r["name"] for r in result["rows"]] == list(ROWS)
    for r in result["rows"]:
        assert r["ours"] > 0 and r["reference"] is None and r["ratio"] is None
    table = print_table(result)
    assert all(name in table for name in ROWS)


def test_ours_against_gpt2() -> None:
    pytest.importorskip("transformers")  # the `bench` extra, which `make test` leaves out
    result = run_bench("tiny", quick=True, device="cpu")
    assert [r["name"] for r in result["rows"]] == list(ROWS)
    for r in result["rows"]:
        assert r["ours"] > 0 and r["reference"] > 0
        assert r["ratio"] == pytest.approx(r["ours"] / r["reference"])
    assert "transformers" in result["machine"]
    assert "GPT-2 (HF)" in print_table(result)


def test_without_transformers_the_reference_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes the import fail
    with pytest.raises(ShiftableError, match=r"pip install 'shiftable\[bench\]'"):
        run_bench("tiny", quick=True, device="cpu")
