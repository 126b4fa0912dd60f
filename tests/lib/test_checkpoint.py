"""Model versions: atomic, complete, safetensors + JSON, and exactly reloadable."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from shiftable_lib import checkpoint
from shiftable_lib.config import get_profile
from shiftable_lib.errors import NotFound, VersionInvalid
from shiftable_lib.model import ShiftableLM


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


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (lambda d: _truncate(d / "model.safetensors"), "model.safetensors is .* bytes, not the"),
        (lambda d: _flip_last_byte(d / "model.safetensors"), "SHA-256 differs"),
        (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json is missing"),
        (lambda d: (d / "config.json").write_text("{not json"), "cannot read config.json"),
        (lambda d: _edit_config(d, n_layer=3), "do not make a model"),
    ],
)
def test_a_damaged_version_is_refused_before_it_loads(tmp_path, shiftable, tokenizer, damage, says):
    """What was written is recorded in config.json (sizes and SHA-256) and checked on every
    load, with the tensors against the config: a damaged version never serves half-right."""
    version = checkpoint.save_version(tmp_path, shiftable, tokenizer, get_profile("tiny"), {})
    files = json.loads((tmp_path / version / "config.json").read_text())["files"]
    assert set(files) == {"model.safetensors", "tokenizer.json"}
    assert (
        files["model.safetensors"]["bytes"]
        == (tmp_path / version / "model.safetensors").stat().st_size
    )
    damage(tmp_path / version)
    with pytest.raises(VersionInvalid, match=says):
        checkpoint.load_version(tmp_path, version)


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_config(folder, **model):
    config = json.loads((folder / "config.json").read_text())
    config["model"].update(model)
    (folder / "config.json").write_text(json.dumps(config))


def test_auto_serves_bfloat16_on_a_gpu_and_on_a_cpu_only_where_it_pays(
    tmp_path, shiftable, tokenizer
):
    """`auto`: bfloat16 on a GPU; on a CPU only for a model past CPU_BF16_MIN_BYTES of float32
    weights, and only where the CPU has bfloat16 instructions (this machine's answer)."""
    cpu, large = torch.device("cpu"), checkpoint.CPU_BF16_MIN_BYTES
    native = torch.bfloat16 if checkpoint.cpu_has_bf16() else torch.float32
    assert checkpoint.serving_dtype("auto", torch.device("cuda"), 0) == torch.bfloat16
    assert checkpoint.serving_dtype("auto", cpu, large - 1) == torch.float32
    assert checkpoint.serving_dtype("auto", cpu, large) == native
    assert checkpoint.serving_dtype("float32", cpu, large) == torch.float32
    assert checkpoint.serving_dtype("bfloat16", cpu, 0) == torch.bfloat16

    small = checkpoint.save_version(tmp_path, shiftable, tokenizer, get_profile("tiny"), {})
    loaded = checkpoint.load_version(tmp_path, small, "cpu", "auto")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    # past the threshold (the tiny model with a vocabulary that large): what this CPU pays for
    vocab = large // (4 * shiftable.cfg.d_model) + 1
    wide = ShiftableLM(dataclasses.replace(shiftable.cfg, vocab_size=vocab, specialists=()))
    big = checkpoint.save_version(tmp_path, wide, tokenizer, get_profile("tiny"), {})
    loaded = checkpoint.load_version(tmp_path, big, "cpu", "auto")
    assert {p.dtype for p in loaded.model.parameters()} == {native}
