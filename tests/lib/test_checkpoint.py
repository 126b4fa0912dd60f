"""Model versions: atomic, complete, safetensors + JSON, and exactly reloadable."""

from __future__ import annotations

import json

import pytest
import torch

from shiftable_lib import checkpoint
from shiftable_lib.config import get_profile
from shiftable_lib.errors import NotFound


def test_a_saved_version_reloads_to_the_same_outputs(tmp_path, shiftable, tokenizer):
    profile = get_profile("tiny")
    version = checkpoint.save_version(tmp_path, shiftable, tokenizer, profile, {"ppl": 1.5})
    loaded = checkpoint.load_version(tmp_path, version)
    idx = torch.randint(0, shiftable.cfg.vocab_size, (2, 20))
    assert torch.equal(loaded.model(idx)[0], shiftable(idx)[0])
    assert loaded.model.experts == ("general", "ds", "dl")
    assert loaded.profile == profile and loaded.metrics == {"ppl": 1.5}
    assert loaded.tokenizer.to_str() == tokenizer.to_str()
    files = sorted(p.name for p in (tmp_path / version).iterdir())
    assert files == ["config.json", "metrics.json", "model.safetensors", "tokenizer.json"]


def test_versions_are_numbered_and_current_points_at_one(tmp_path, shiftable, tokenizer):
    profile = get_profile("tiny")
    a = checkpoint.save_version(tmp_path, shiftable, tokenizer, profile, {})
    b = checkpoint.save_version(tmp_path, shiftable, tokenizer, profile, {})
    assert (a, b) == ("v0001", "v0002")
    assert checkpoint.current_version(tmp_path) == "v0002"  # newest when no pointer
    checkpoint.set_current(tmp_path, a)
    assert checkpoint.current_version(tmp_path) == "v0001"
    with pytest.raises(NotFound):
        checkpoint.set_current(tmp_path, "v0009")


def test_a_failed_save_leaves_no_version_behind(tmp_path, shiftable, tokenizer):
    # metrics that cannot be written as JSON fail the save after the weights are written
    with pytest.raises(TypeError):
        checkpoint.save_version(tmp_path, shiftable, tokenizer, get_profile("tiny"), {1j: 1})
    assert list(tmp_path.iterdir()) == []
    assert checkpoint.current_version(tmp_path) is None


def test_loading_never_unpickles(tmp_path, shiftable, tokenizer):
    version = checkpoint.save_version(tmp_path, shiftable, tokenizer, get_profile("tiny"), {})
    weights = (tmp_path / version / "model.safetensors").read_bytes()
    assert weights[8:9] == b"{"  # safetensors: an 8-byte length, then a JSON header
    meta = json.loads((tmp_path / version / "config.json").read_text())
    assert meta["model"]["specialists"] == ["ds", "dl"]
    with pytest.raises(NotFound):
        checkpoint.load_version(tmp_path, "../etc")
