"""The `sma` command line, end to end with the tiny profile, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import synthetic_documents, write_domain


def sma(
    home: Path, *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "SMA_HOME": str(home),
        "SMA_PROFILE": "tiny",
        "SMA_THREADS": "2",
        **(env or {}),
    }
    done = subprocess.run(
        [sys.executable, "-m", "shiftable.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"sma {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def trained_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("home")
    write_domain(home / "data", "general", synthetic_documents("general", 40))
    write_domain(home / "data", "ds", synthetic_documents("ds", 40))
    write_domain(home / "data", "dl", synthetic_documents("dl", 40))
    sma(home, "train")
    return home


def test_train_publishes_a_generalist_then_the_specialists(trained_home):
    models = trained_home / "artifacts" / "models"
    assert sorted(p.name for p in models.iterdir()) == ["CURRENT", "v0001", "v0002"]
    config = json.loads((models / "v0002" / "config.json").read_text())
    assert config["model"]["specialists"] == ["dl", "ds"]
    assert config["parent"] == "v0001" and config["profile"]["name"] == "tiny"
    again = sma(trained_home, "train")
    assert "up to date" in again.stdout


def test_eval_json_has_the_documented_shape(trained_home):
    result = json.loads(sma(trained_home, "eval", "--json").stdout)
    assert set(result["domains"]) == {"general", "ds", "dl"}
    for d in result["domains"].values():
        assert d["generalist_ppl"] > 1 and d["model_ppl"] > 1
    assert 0 <= result["routing_accuracy"] <= 1


def test_generate_keeps_half_the_context_for_the_prompt_by_default(trained_home):
    prompt = "the list of values " * 3  # fits in half of the tiny 64-token context
    done = sma(trained_home, "generate", prompt, "--seed", "1")
    assert "left-truncated" not in done.stderr
    assert done.stdout.startswith(prompt)


def test_generate_streams_a_completion(trained_home):
    out = sma(trained_home, "generate", "the list", "--max-new-tokens", "8", "--seed", "1").stdout
    assert out.startswith("the list") and len(out.strip()) > len("the list")
    greedy = ["generate", "numpy", "--temperature", "0", "--max-new-tokens", "6"]
    assert sma(trained_home, *greedy).stdout == sma(trained_home, *greedy).stdout


def test_add_then_remove_a_specialist(trained_home):
    data = trained_home / "data"
    write_domain(data, "law", synthetic_documents("ds", 30, seed=5))
    added = sma(trained_home, "add-specialist", "law")
    assert "'law' added" in added.stdout
    models = trained_home / "artifacts" / "models"
    current = (models / "CURRENT").read_text().strip()
    meta = json.loads((models / current / "config.json").read_text())
    assert meta["model"]["specialists"] == ["dl", "ds", "law"] and meta["kind"] == "add-specialist"
    removed = sma(trained_home, "remove-specialist", "law")
    assert "'law' removed" in removed.stdout
    assert not (data / "law").exists()
    archived = list((data / ".deleted").iterdir())
    assert len(archived) == 1 and archived[0].name.startswith("law-")
    assert (archived[0] / "corpus.txt").is_file(), "the corpus must be moved, not destroyed"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("add-specialist", "../etc"), "invalid specialist name"),
        (("add-specialist", "General"), "invalid specialist name"),
        (("add-specialist", "general"), "'general' is the generalist"),
        (("add-specialist", "nothere"), "no corpus folder"),
        (("add-specialist", "ds"), "already exists"),
        (("add-specialist", "emptyone"), "holds no text"),
        (("remove-specialist", "nothere"), "no specialist named"),
        (("generate", "x", "--max-new-tokens", "0"), "max_new_tokens"),
        (("generate", "x", "--temperature", "-1"), "temperature"),
        (("generate", "x", "--force", "nothere"), "no expert named"),
        (("train", "--profile", "cpu"), "trained with profile 'tiny'"),
    ],
)
def test_bad_requests_fail_clearly_and_change_nothing(trained_home, args, message):
    (trained_home / "data" / "emptyone").mkdir(exist_ok=True)
    before = snapshot(trained_home)
    done = sma(trained_home, *args, check=False)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert snapshot(trained_home) == before


def test_the_last_specialist_cannot_be_removed(tmp_path):
    write_domain(tmp_path / "data", "general", synthetic_documents("general", 30))
    write_domain(tmp_path / "data", "ds", synthetic_documents("ds", 30))
    sma(tmp_path, "train")
    before = snapshot(tmp_path)
    done = sma(tmp_path, "remove-specialist", "ds", check=False)
    assert done.returncode == 2 and "last specialist" in done.stderr
    assert snapshot(tmp_path) == before


def test_commands_without_a_model_say_what_to_do(tmp_path):
    done = sma(tmp_path, "generate", "hello", check=False)
    assert done.returncode == 2 and "run `sma train` first" in done.stderr
    done = sma(tmp_path, "train", check=False)
    assert done.returncode == 2 and "general" in done.stderr
    assert not (tmp_path / "artifacts").exists() or not any((tmp_path / "artifacts").rglob("v*"))
