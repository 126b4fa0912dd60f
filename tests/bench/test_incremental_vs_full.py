"""Smoke test of `bench.incremental_vs_full` on a home trained with the tiny profile."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.incremental_vs_full import compare, main
from shiftable_lib import checkpoint
from tests.conftest import train_tiny_home


@pytest.fixture(scope="module")
def trained_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """v0001 (the generalist) and v0002 (ds and dl, full), as `sma train` leaves a home."""
    home = tmp_path_factory.mktemp("home")
    models = train_tiny_home(home, documents=24)
    assert checkpoint.version_ids(models) == ["v0001", "v0002"]
    return home


def test_compare_reports_both_sides(trained_home: Path) -> None:
    before = sorted(p.relative_to(trained_home) for p in trained_home.rglob("*"))
    result = compare(trained_home, "dl")
    assert result["new"] == "dl"
    assert result["new_ppl_incremental"] > 1 and result["new_ppl_full"] > 1
    assert result["new_ppl_ratio"] == pytest.approx(
        result["new_ppl_incremental"] / result["new_ppl_full"]
    )
    assert set(result["others_ppl_before"]) == set(result["others_ppl_after"]) == {"general", "ds"}
    assert set(result["others_ppl_change"]) == {"general", "ds"}
    assert {"general", "ds", "dl"} <= set(result["routing_after"])
    assert result["add_seconds"] >= 0 and result["full_retrain_seconds"] > 0
    assert sorted(p.relative_to(trained_home) for p in trained_home.rglob("*")) == before


def test_main_prints_json(trained_home: Path, capsys) -> None:
    main(["--home", str(trained_home), "--new", "ds", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["new"] == "ds" and result["new_ppl_incremental"] > 1
