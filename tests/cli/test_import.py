"""`sma import`, end to end: a tiny random Llama saved as a Hugging Face directory becomes the
current version, which `sma generate` then serves as `transformers` would."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.cli.test_cli import sma
from tests.conftest import synthetic_documents
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
