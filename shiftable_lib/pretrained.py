"""Pretrained generalists: a local Hugging Face directory or a GGUF file, read into our model.

Supported families: GPT-2, and Llama-style models (Llama, SmolLM and SmolLM2, TinyLlama:
RMSNorm, rotary positions, SwiGLU, grouped-query attention) with Qwen2's biases on q, k and v.
Anything else is refused, naming what is unsupported. Only safetensors and GGUF are read
(never a pickle), from paths only: nothing here reaches the network.

Our layout keeps one expert's q, k and v projections as one matrix (the query heads, then the
key heads, then the value heads) and a SwiGLU's gate and up projections as one (gate first),
so each family's weights are concatenated into those. llama.cpp's converter stores a Llama's q
and k rows permuted for its interleaved rotary layout; they are put back in the rotate-half
order that Hugging Face's models (and ours) use.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import Tensor

from shiftable_lib.errors import ShiftableError
from shiftable_lib.model import ModelConfig, ShiftableLM

DEFAULT_CONTEXT = 2048  # a checkpoint's longer context costs KV cache in every decode slot
FAMILIES = ("gpt2", "llama", "qwen2")


class ImportRefused(ShiftableError, ValueError):
    """The path holds no model we can read, or one of a kind we do not support."""


@dataclass
class Pretrained:
    """A checkpoint read into our names: the model's shape and weights, its tokenizer, its chat
    template ("" when it has none) and the tokens that end a generation."""

    family: str
    cfg: ModelConfig
    state: dict[str, Tensor]
    tokenizer: Tokenizer
    chat_template: str = ""
    eos_tokens: tuple[str, ...] = ()
    source: dict = field(default_factory=dict)  # what it was read from: format, name, sha256

    def model(self, cfg: ModelConfig | None = None) -> ShiftableLM:
        """The generalist, in float32, with the checkpoint's weights (and dormant gate rows);
        `cfg`: the checkpoint's with other choices of ours (`branch_rank`)."""
        model = ShiftableLM(cfg or self.cfg)
        expected = model.state_dict()
        missing = [k for k in expected if k not in self.state and not _is_gate(k)]
        if missing:
            raise ImportRefused(f"the checkpoint lacks {missing[0]} (and {len(missing) - 1} more)")
        for name, tensor in self.state.items():
            if tensor.shape != expected[name].shape:
                raise ImportRefused(
                    f"{name}: the checkpoint's is {tuple(tensor.shape)}, the config makes "
                    f"{tuple(expected[name].shape)}"
                )
        model.load_state_dict({**expected, **self.state}, strict=True)
        return model.eval()


def _is_gate(name: str) -> bool:
    return name.endswith((".gate", ".gate_tokens"))


def read_pretrained(path: Path, context: int = 0) -> Pretrained:
    """Read a Hugging Face model directory or a `.gguf` file. `context` caps the positions the
    model serves (0 = the checkpoint's, at most DEFAULT_CONTEXT); ImportRefused says why a
    path cannot be read."""
    path = Path(path)
    if path.is_dir():
        return _read_hf(path, context)
    if path.is_file() and path.suffix == ".gguf":
        return _read_gguf(path, context)
    if not path.exists():
        raise ImportRefused(f"{path} does not exist")
    raise ImportRefused(
        f"{path} is neither a Hugging Face model directory (config.json, *.safetensors, "
        "tokenizer.json) nor a .gguf file"
    )


def _context(available: int, asked: int) -> int:
    if asked < 0:
        raise ImportRefused(f"context must be positive, not {asked}")
    if asked > available:
        raise ImportRefused(f"the checkpoint serves at most {available} positions, not {asked}")
    return asked or min(available, DEFAULT_CONTEXT)


# ---- Hugging Face directories -------------------------------------------------------------------


def _read_hf(folder: Path, context: int) -> Pretrained:
    config = _json(folder / "config.json")
    family = config.get("model_type", "")
    if family not in FAMILIES:
        raise ImportRefused(
            f"model_type {family!r} is not supported: only {', '.join(FAMILIES)} (GPT-2 and "
            "Llama-style models: Llama, SmolLM, TinyLlama, Qwen2)"
        )
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.glob("*.bin"))
        also = f" ({pickles[0]} is a pickle, which is never loaded)" if pickles else ""
        raise ImportRefused(f"{folder} has no *.safetensors weights{also}")
    if not (folder / "tokenizer.json").is_file():
        raise ImportRefused(f"{folder} has no tokenizer.json")
    tensors = _safetensors(files)
    weights = _Weights(tensors, tensors.__getitem__)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    if family == "gpt2":
        cfg = _gpt2_config(config, context)
        state = _gpt2_hf(weights, cfg)
    else:
        cfg = _llama_config(config, family, context)
        state = _llama_hf(weights, cfg, family)
    weights.check_all_used()
    tok_config = _json(folder / "tokenizer_config.json", required=False)
    return Pretrained(
        family=family,
        cfg=cfg,
        state=state,
        tokenizer=tokenizer,
        chat_template=_chat_template(folder, tok_config),
        eos_tokens=_hf_eos(folder, config, tok_config, tokenizer),
        source={
            "format": "huggingface",
            "name": folder.name,
            "sha256": _digest([folder / "config.json", *files, folder / "tokenizer.json"]),
        },
    )


def _json(path: Path, required: bool = True) -> dict:
    if not path.is_file():
        if required:
            raise ImportRefused(f"{path.parent} has no {path.name}")
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ImportRefused(f"{path} cannot be read: {exc}") from exc


def _safetensors(files: list[Path]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                out[key] = f.get_tensor(key)
    return out


def _rope_theta(config: dict) -> float:
    """transformers 5 writes it under rope_parameters; earlier versions at the top level."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    kinds = [params.get("rope_type"), scaling.get("rope_type"), scaling.get("type")]
    for kind in kinds:
        if kind not in (None, "default"):
            raise ImportRefused(f"rotary scaling {kind!r} is not supported (only plain RoPE)")
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def _gpt2_config(config: dict, context: int) -> ModelConfig:
    activation = config.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ImportRefused(f"GPT-2 activation {activation!r} is not supported (gelu_new only)")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if config.get(flag):
            raise ImportRefused(f"GPT-2 with {flag} is not supported")
    if not config.get("scale_attn_weights", True):
        raise ImportRefused("GPT-2 without scale_attn_weights is not supported")
    d = config["n_embd"]
    return ModelConfig(
        vocab_size=config["vocab_size"],
        context=_context(config.get("n_positions", 1024), context),
        n_layer=config["n_layer"],
        n_head=config["n_head"],
        d_model=d,
        d_ff=config.get("n_inner") or 4 * d,
        norm_eps=config.get("layer_norm_epsilon", 1e-5),
        qkv_bias=True,
        proj_bias=True,
        mlp_bias=True,
        tied=config.get("tie_word_embeddings", True),
    )


def _llama_config(config: dict, family: str, context: int) -> ModelConfig:
    if config.get("hidden_act", "silu") != "silu":
        raise ImportRefused(f"activation {config['hidden_act']!r} is not supported (silu only)")
    if config.get("use_sliding_window") or (family == "llama" and config.get("sliding_window")):
        raise ImportRefused("sliding-window attention is not supported")
    d, heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim") not in (None, d // heads) or d % heads:
        raise ImportRefused(
            f"head_dim {config.get('head_dim')} is not hidden_size / num_attention_heads "
            f"({d} / {heads}): not supported"
        )
    attention_bias = bool(config.get("attention_bias", False))
    return ModelConfig(
        vocab_size=config["vocab_size"],
        context=_context(config.get("max_position_embeddings", 2048), context),
        n_layer=config["num_hidden_layers"],
        n_head=heads,
        d_model=d,
        n_kv_head=config.get("num_key_value_heads") or heads,
        d_ff=config["intermediate_size"],
        norm="rmsnorm",
        norm_eps=config.get("rms_norm_eps", 1e-6),
        positions="rope",
        rope_theta=_rope_theta(config),
        mlp="swiglu",
        qkv_bias=family == "qwen2" or attention_bias,
        proj_bias=attention_bias,
        mlp_bias=bool(config.get("mlp_bias", False)),
        tied=bool(config.get("tie_word_embeddings", family != "llama")),
    )


class _Weights:
    """A checkpoint's tensors by name, read (a GGUF tensor: dequantised) when taken, each at
    most once: what is left at the end is a weight we would silently drop, so it is refused."""

    def __init__(self, names: Iterable[str], read: Callable[[str], Tensor]) -> None:
        self.names, self.read = set(names), read
        self.ignore: Callable[[str], bool] = lambda _: False
        self.used: set[str] = set()

    def take(self, *names: str) -> Tensor:
        """The first of `names` the checkpoint has (prefixes differ between savers)."""
        for name in names:
            if name in self.names:
                self.used.add(name)
                return self.read(name).float()
        raise ImportRefused(f"the checkpoint has no {names[0]}")

    def check_all_used(self) -> None:
        left = sorted(n for n in self.names if n not in self.used and not self.ignore(n))
        if left:
            raise ImportRefused(
                f"the checkpoint holds weights this family has no place for: {left[0]}"
                + (f" (and {len(left) - 1} more)" if len(left) > 1 else "")
            )


def _prefixed(weights: _Weights, prefix: str) -> Callable[[str], Tensor]:
    return lambda name: weights.take(prefix + name, name)


def _expert(i: int) -> str:
    return f"blocks.{i}.attn.experts.general"


def _gpt2_hf(weights: _Weights, cfg: ModelConfig) -> dict[str, Tensor]:
    # GPT2LMHeadModel saves under transformer.; its attention's causal masks are buffers
    weights.ignore = lambda n: (
        n.endswith((".attn.bias", ".attn.masked_bias")) or (cfg.tied and n == "lm_head.weight")
    )
    w = _prefixed(weights, "transformer.")
    state = {"wte.weight": w("wte.weight"), "wpe.weight": w("wpe.weight")[: cfg.context]}
    for i in range(cfg.n_layer):
        h, e = f"h.{i}.", _expert(i)
        for ours, theirs in (("ln_1", "ln_1"), ("ln_2", "ln_2")):
            state[f"blocks.{i}.{ours}.weight"] = w(f"{h}{theirs}.weight")
            state[f"blocks.{i}.{ours}.bias"] = w(f"{h}{theirs}.bias")
        # Conv1D keeps its weight as (in, out): transposed into a Linear's (out, in)
        for ours, theirs in (
            (f"{e}.qkv", "attn.c_attn"),
            (f"{e}.proj", "attn.c_proj"),
            (f"blocks.{i}.mlp.fc", "mlp.c_fc"),
            (f"blocks.{i}.mlp.proj", "mlp.c_proj"),
        ):
            state[f"{ours}.weight"] = w(f"{h}{theirs}.weight").T.contiguous()
            state[f"{ours}.bias"] = w(f"{h}{theirs}.bias")
    state["ln_f.weight"], state["ln_f.bias"] = w("ln_f.weight"), w("ln_f.bias")
    if not cfg.tied:
        state["lm_head.weight"] = weights.take("lm_head.weight")
    return state


def _llama_hf(weights: _Weights, cfg: ModelConfig, family: str) -> dict[str, Tensor]:
    weights.ignore = lambda n: (
        n.endswith("rotary_emb.inv_freq") or (cfg.tied and n == "lm_head.weight")
    )
    w = _prefixed(weights, "model.")
    state = {"wte.weight": w("embed_tokens.weight")}
    for i in range(cfg.n_layer):
        layer, e = f"layers.{i}.", _expert(i)
        attn, mlp = f"{layer}self_attn.", f"{layer}mlp."
        state[f"blocks.{i}.ln_1.weight"] = w(f"{layer}input_layernorm.weight")
        state[f"blocks.{i}.ln_2.weight"] = w(f"{layer}post_attention_layernorm.weight")
        state[f"{e}.qkv.weight"] = torch.cat([w(f"{attn}{p}_proj.weight") for p in "qkv"])
        if cfg.qkv_bias:
            state[f"{e}.qkv.bias"] = torch.cat([w(f"{attn}{p}_proj.bias") for p in "qkv"])
        state[f"{e}.proj.weight"] = w(f"{attn}o_proj.weight")
        if cfg.proj_bias:
            state[f"{e}.proj.bias"] = w(f"{attn}o_proj.bias")
        state[f"blocks.{i}.mlp.fc.weight"] = torch.cat(
            [w(f"{mlp}gate_proj.weight"), w(f"{mlp}up_proj.weight")]
        )
        state[f"blocks.{i}.mlp.proj.weight"] = w(f"{mlp}down_proj.weight")
        if cfg.mlp_bias:
            state[f"blocks.{i}.mlp.fc.bias"] = torch.cat(
                [w(f"{mlp}gate_proj.bias"), w(f"{mlp}up_proj.bias")]
            )
            state[f"blocks.{i}.mlp.proj.bias"] = w(f"{mlp}down_proj.bias")
    state["ln_f.weight"] = w("norm.weight")
    if not cfg.tied:
        state["lm_head.weight"] = weights.take("lm_head.weight")
    return state


def _chat_template(folder: Path, tok_config: dict) -> str:
    """The model's own template: chat_template.jinja (transformers 5 writes it apart), else
    tokenizer_config.json's (a string, or a list of named templates: the default one)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    template = tok_config.get("chat_template") or ""
    if isinstance(template, list):
        named = {t.get("name"): t.get("template", "") for t in template}
        return named.get("default", "")
    return template


def _token_text(token: object) -> str:
    """tokenizer_config.json writes a special token as its text or as {"content": text}."""
    if isinstance(token, dict):
        return str(token.get("content", ""))
    return token if isinstance(token, str) else ""


def _hf_eos(folder: Path, config: dict, tok_config: dict, tok: Tokenizer) -> tuple[str, ...]:
    """Every token that ends a generation: generation_config.json's ids (what transformers'
    generate stops at), config.json's, and the tokenizer's eos_token."""
    ids: list[int] = []
    for source in (_json(folder / "generation_config.json", required=False), config):
        value = source.get("eos_token_id")
        ids += value if isinstance(value, list) else [value] if isinstance(value, int) else []
    texts = [tok.id_to_token(i) for i in ids]
    texts.append(_token_text(tok_config.get("eos_token")))
    return tuple(dict.fromkeys(t for t in texts if t and tok.token_to_id(t) is not None))


def _digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


# ---- GGUF ---------------------------------------------------------------------------------------


def _read_gguf(path: Path, context: int) -> Pretrained:
    import gguf  # only an import of a .gguf file needs it

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as exc:
        raise ImportRefused(f"{path} is not a GGUF file we can read: {exc}") from exc
    fields = {name: f.contents() for name, f in reader.fields.items()}
    arch = fields.get("general.architecture", "")
    if arch not in FAMILIES:
        raise ImportRefused(
            f"GGUF architecture {arch!r} is not supported: only {', '.join(FAMILIES)}"
        )
    tensors = {t.name: t for t in reader.tensors}

    def tensor(name: str) -> Tensor:  # one `_Weights` found in the file
        t = tensors[name]
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists the fastest dimension first
        return torch.from_numpy(np.array(data, dtype=np.float32).reshape(shape))  # a copy: writable

    tokenizer, eos = _gguf_tokenizer(fields, path)
    cfg = _gguf_config(
        fields, arch, tokenizer.get_vocab_size(), "output.weight" in tensors, context
    )
    weights = _Weights(tensors, tensor)
    state = _gguf_state(weights, cfg, arch)
    weights.check_all_used()
    return Pretrained(
        family=arch,
        cfg=cfg,
        state=state,
        tokenizer=tokenizer,
        chat_template=fields.get("tokenizer.chat_template", ""),
        eos_tokens=eos,
        source={"format": "gguf", "name": path.name, "sha256": _digest([path])},
    )


def _gguf_config(fields: dict, arch: str, vocab: int, untied: bool, context: int) -> ModelConfig:
    def get(key: str, default: object = None) -> object:
        value = fields.get(f"{arch}.{key}", default)
        if value is None:
            raise ImportRefused(f"the GGUF file has no {arch}.{key}")
        return value

    def real(key: str, default: float) -> float:
        """A float32 field as the float it was written from (1e-05, not 9.99999974e-06)."""
        return float(str(np.float32(get(key, default))))

    if fields.get(f"{arch}.rope.scaling.type", "none") not in ("none", ""):
        raise ImportRefused(
            f"rotary scaling {fields[f'{arch}.rope.scaling.type']!r} is not supported"
        )
    d, heads = int(get("embedding_length")), int(get("attention.head_count"))
    common = {
        "vocab_size": vocab,
        "context": _context(int(get("context_length")), context),
        "n_layer": int(get("block_count")),
        "n_head": heads,
        "d_model": d,
        "d_ff": int(get("feed_forward_length")),
        "tied": not untied,
    }
    if arch == "gpt2":
        eps = real("attention.layer_norm_epsilon", 1e-5)
        return ModelConfig(**common, norm_eps=eps, qkv_bias=True, proj_bias=True, mlp_bias=True)
    return ModelConfig(
        **common,
        n_kv_head=int(get("attention.head_count_kv", heads)),
        norm="rmsnorm",
        norm_eps=real("attention.layer_norm_rms_epsilon", 1e-6),
        positions="rope",
        rope_theta=real("rope.freq_base", 10000.0),
        mlp="swiglu",
        qkv_bias=arch == "qwen2",
    )


def unpermute(w: Tensor, heads: int) -> Tensor:
    """Undo llama.cpp's reordering of a q or k projection's rows (its rotary pairs are adjacent
    rows, Hugging Face's are half a head apart)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _gguf_state(weights: _Weights, cfg: ModelConfig, arch: str) -> dict[str, Tensor]:
    w = weights.take
    state = {"wte.weight": w("token_embd.weight")}
    if arch == "gpt2":
        state["wpe.weight"] = w("position_embd.weight")[: cfg.context]
    for i in range(cfg.n_layer):
        b, e = f"blk.{i}.", _expert(i)
        state[f"blocks.{i}.ln_1.weight"] = w(f"{b}attn_norm.weight")
        state[f"blocks.{i}.ln_2.weight"] = w(f"{b}ffn_norm.weight")
        state[f"{e}.proj.weight"] = w(f"{b}attn_output.weight")
        state[f"blocks.{i}.mlp.proj.weight"] = w(f"{b}ffn_down.weight")
        if arch == "gpt2":
            state[f"{e}.qkv.weight"] = w(f"{b}attn_qkv.weight")
            state[f"blocks.{i}.mlp.fc.weight"] = w(f"{b}ffn_up.weight")
            for ours, theirs in (
                ("ln_1", "attn_norm"),
                ("ln_2", "ffn_norm"),
                ("attn.experts.general.qkv", "attn_qkv"),
                ("attn.experts.general.proj", "attn_output"),
                ("mlp.fc", "ffn_up"),
                ("mlp.proj", "ffn_down"),
            ):
                state[f"blocks.{i}.{ours}.bias"] = w(f"{b}{theirs}.bias")
            continue
        q, k = w(f"{b}attn_q.weight"), w(f"{b}attn_k.weight")
        if arch == "llama":
            q, k = unpermute(q, cfg.n_head), unpermute(k, cfg.kv_heads)
        state[f"{e}.qkv.weight"] = torch.cat([q, k, w(f"{b}attn_v.weight")])
        if cfg.qkv_bias:
            state[f"{e}.qkv.bias"] = torch.cat([w(f"{b}attn_{p}.bias") for p in "qkv"])
        state[f"blocks.{i}.mlp.fc.weight"] = torch.cat(
            [w(f"{b}ffn_gate.weight"), w(f"{b}ffn_up.weight")]
        )
    state["ln_f.weight"] = w("output_norm.weight")
    if arch == "gpt2":
        state["ln_f.bias"] = w("output_norm.bias")
    if not cfg.tied:
        state["lm_head.weight"] = w("output.weight")
    return state


# llama.cpp's names for the pre-tokenizers of byte-level BPE vocabularies we can rebuild
_PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "default": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "smollm": lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    ),
}


def _gguf_tokenizer(fields: dict, path: Path) -> tuple[Tokenizer, tuple[str, ...]]:
    """The vocabulary GGUF carries, rebuilt as a `tokenizers` byte-level BPE; and its EOS."""
    import gguf

    kind = fields.get("tokenizer.ggml.model", "")
    if kind != "gpt2":
        raise ImportRefused(
            f"{path.name} holds a {kind or 'missing'!r} vocabulary: only byte-level BPE ('gpt2') "
            "is rebuilt from GGUF; import the model's Hugging Face directory instead"
        )
    pre = fields.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise ImportRefused(
            f"{path.name}'s pre-tokenizer {pre!r} is not one we can rebuild "
            f"({', '.join(_PRE_TOKENIZERS)}); import the model's Hugging Face directory instead"
        )
    tokens = list(fields["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    special = {int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)}
    types = list(fields.get("tokenizer.ggml.token_type", []))
    if marked := [t for t, kind in zip(tokens, types, strict=False) if kind in special]:
        tok.add_special_tokens(marked)  # never split, never made of other tokens
    eos = fields.get("tokenizer.ggml.eos_token_id")
    return tok, (tokens[int(eos)],) if eos is not None and 0 <= int(eos) < len(tokens) else ()
