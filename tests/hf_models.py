"""Tiny random Hugging Face checkpoints of each family we import, made on the spot with
`transformers` (a few hundred KB each): what `sma import` reads in the tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"


def _llama_like(config: type, vocab: int, **changes: object):
    """A tiny Llama-style config: 2 layers of d=32 with 4 query heads."""
    shape = {
        "vocab_size": vocab,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 64,
    }
    return config(**shape, **changes)


FAMILIES = {
    "gpt2": lambda v: transformers.GPT2Config(
        vocab_size=v, n_positions=64, n_embd=32, n_layer=2, n_head=4
    ),
    # grouped-query attention (2 key/value heads), its own rope_theta and eps
    "llama": lambda v: _llama_like(
        transformers.LlamaConfig,
        v,
        num_key_value_heads=2,
        rope_theta=1000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    "llama-untied": lambda v: _llama_like(
        transformers.LlamaConfig, v, num_key_value_heads=4, tie_word_embeddings=False
    ),
    # q, k and v biases, one key/value head for all four query heads
    "qwen2": lambda v: _llama_like(
        transformers.Qwen2Config, v, num_key_value_heads=1, tie_word_embeddings=True
    ),
}


def hf_model(kind: str, vocab: int):
    torch.manual_seed(0)
    config = FAMILIES[kind](vocab)
    config.eos_token_id = config.bos_token_id = 0  # the tiny tokenizer's <|endoftext|>
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # random biases and norm weights, so that each place is checked
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_hf(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": TEMPLATE, "eos_token": "<|endoftext|>"})
    )
    return folder
