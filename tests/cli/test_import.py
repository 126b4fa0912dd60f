"""`sma import`, end to end: a tiny random Llama saved as a Hugging Face directory becomes the
current version, which `sma generate` then serves as `transformers` would."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from shiftable_lib import jobs
from tests.cli.test_cli import sma
from tests.conftest import synthetic_documents, write_domain
from tests.hf_models import TEMPLATE, hf_model, save_hf


def test_an_imported_llama_is_served_with_its_tokenizer_template_and_stop_token(
    tmp_path: Path, tokenizer
) -> None:
    theirs = hf_model("llama", tokenizer.get_vocab_size())
    folder = save_hf(theirs, tokenizer, tmp_path / "tiny-llama")
    home = tmp_path / "home"
    done = sma(home, "import", str(folder), "--context", "48")
    assert (
        "imported tiny-llama (llama: 2 layers, d=32, 4 heads / 2 key-value heads, " in done.stdout
    )
    assert "context 48" in done.stdout and "as v0001, now the current version" in done.stdout
    config = json.loads((home / "artifacts" / "models" / "v0001" / "config.json").read_text())
    assert config["chat_template"] == TEMPLATE
    assert config["eos_tokens"] == ["<|endoftext|>"]
    assert config["base"]["family"] == "llama" and len(config["base"]["sha256"]) == 64
    assert config["model"]["positions"] == "rope" and config["model"]["n_kv_head"] == 2
    # nothing but safetensors and JSON is written
    written = {p.name for p in (home / "artifacts" / "models" / "v0001").iterdir()}
    assert written == {"config.json", "model.safetensors", "tokenizer.json", "metrics.json"}

    # greedy generation equals transformers' own, token for token
    prompt = " ".join(synthetic_documents("ds", 1)[0].split()[:6])
    ids = tokenizer.encode(prompt).ids
    with torch.no_grad():
        out = theirs.generate(
            torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=0, pad_token_id=0
        )
    expected = tokenizer.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True)
    got = sma(home, "generate", prompt, "--max-new-tokens", "8", "--temperature", "0")
    assert got.stdout.rstrip("\n") == prompt + expected


def test_a_path_that_holds_no_model_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    home = tmp_path / "home"
    done = sma(home, "import", str(tmp_path / "empty"), check=False)
    assert done.returncode == 2 and "has no config.json" in done.stderr
    assert not (home / "artifacts" / "models").exists() or not any(
        (home / "artifacts" / "models").iterdir()
    )


def test_train_with_a_base_imports_it_then_grows_the_specialists_on_it(
    tmp_path: Path, tokenizer
) -> None:
    """`sma train --base` where there is no model: the checkpoint is the generalist (v0001),
    the specialists grow on it (v0002), and what the checkpoint brought (its chat template,
    its stop tokens, where it came from) is kept by the versions grown from it. The branch is
    a rank-4 delta on the base's attention (`SMA_BRANCH_RANK`), which is all v0002 stores
    besides the gate rows."""
    folder = save_hf(hf_model("qwen2", tokenizer.get_vocab_size()), tokenizer, tmp_path / "qwen")
    home = tmp_path / "home"
    write_domain(home / "data", "general", synthetic_documents("general", 40))
    write_domain(home / "data", "ds", synthetic_documents("ds", 40))
    done = sma(home, "train", "--base", str(folder), env={"SMA_BRANCH_RANK": "4"})
    assert "imported qwen as v0001" in done.stdout, done.stdout
    models = home / "artifacts" / "models"
    first = json.loads((models / "v0001" / "config.json").read_text())
    grown = json.loads((models / "v0002" / "config.json").read_text())
    assert grown["model"]["specialists"] == ["ds"] and grown["parent"] == "v0001"
    for key in ("chat_template", "eos_tokens", "base"):
        assert grown[key] == first[key], key
    assert grown["model"]["n_kv_head"] == 1 and grown["model"]["qkv_bias"] is True
    assert grown["model"]["branch_rank"] == 4 == first["model"]["branch_rank"]
    assert grown["profile"]["specialist_lr"] >= jobs.LOW_RANK_LR
    # v0002 holds only what differs from the base: the branch's factors and the gate rows
    assert grown["delta_of"]["version"] == "v0001" == first["base"]["version"]
    stored = safe_open(str(models / "v0002" / "model.safetensors"), "pt").keys()
    ds = {k.rsplit(".", 1)[1] for k in stored if ".experts.ds." in k}
    assert ds == {"qkv_a", "qkv_b", "proj_a", "proj_b", "gate", "gate_tokens"}, ds
    assert all(".experts.ds." in k or k.endswith((".gate", ".gate_tokens")) for k in stored)
    out = sma(home, "generate", "the array", "--max-new-tokens", "4", "--force", "ds")
    assert out.stdout.startswith("the array")
    # a second `sma train` has a model: the base is not imported again
    again = sma(home, "train", "--base", str(folder))
    assert "imported" not in again.stdout and not (models / "v0003").exists()
    # without the base's weights the delta is no model, and says why
    base = models / "v0001" / "model.safetensors"
    base.write_bytes(base.read_bytes()[:-8] + b"\0" * 8)  # same size, other bytes
    broken = sma(home, "generate", "the array", check=False)
    assert broken.returncode == 2
    assert "holds only what differs from v0001" in broken.stderr, broken.stderr
