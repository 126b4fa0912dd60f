"""Importing pretrained generalists: tiny random GPT-2, Llama and Qwen2 models made here with
`transformers` and saved as a Hugging Face directory (and a Llama as GGUF, written with
`gguf`), read into our model; our logits must be theirs, whole and through the KV cache."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from shiftable_lib import pretrained
from shiftable_lib.pretrained import ImportRefused, read_pretrained, unpermute
from shiftable_lib.routing import RouteTable
from shiftable_lib.sampling import Routing
from tests.conftest import perturbed
from tests.hf_models import FAMILIES, TEMPLATE, hf_model, save_hf

ATOL = 1e-4  # float32 on both sides: the order of summation differs, nothing else


@pytest.fixture(scope="module", params=list(FAMILIES))
def imported(request, tokenizer, tmp_path_factory):
    """(our model, theirs, what was read) for each family."""
    kind = request.param
    theirs = hf_model(kind, tokenizer.get_vocab_size())
    folder = save_hf(theirs, tokenizer, tmp_path_factory.mktemp(kind))
    read = read_pretrained(folder)
    return read.model(), theirs, read


def _ids(tokenizer, n: int = 2) -> torch.Tensor:
    text = "the tensor gradient of a list, and the array shape of the dict"
    ids = tokenizer.encode(text).ids[:20]
    return torch.tensor([ids] * n)


def test_the_imported_model_computes_the_checkpoints_logits(imported, tokenizer) -> None:
    ours, theirs, read = imported
    idx = _ids(tokenizer)
    with torch.no_grad():
        expected = theirs(idx).logits
        got, _ = ours(idx)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert read.chat_template == TEMPLATE
    assert read.eos_tokens and read.eos_tokens[0] == "<|endoftext|>"
    assert len(read.source["sha256"]) == 64


def test_cached_decoding_gives_the_checkpoints_logits_at_every_step(imported, tokenizer) -> None:
    """Prefill a prompt in two chunks, then decode token by token: each step's logits are those
    of the checkpoint's forward over the whole sequence at that position."""
    ours, theirs, _ = imported
    idx = _ids(tokenizer, 1)
    with torch.no_grad():
        expected = theirs(idx).logits[0]
        cache = ours.new_cache(2)
        routes = RouteTable.for_batch(ours.experts, Routing(), 1, idx.device)
        slots, prompt = torch.tensor([0]), 8
        first = ours.prefill(cache, slots, idx[:, :4], torch.tensor([4]), routes)[0]
        torch.testing.assert_close(first[0], expected[3], atol=ATOL, rtol=0)
        last = ours.prefill(cache, slots, idx[:, 4:prompt], torch.tensor([4]), routes, start=4)[0]
        torch.testing.assert_close(last[0], expected[prompt - 1], atol=ATOL, rtol=0)
        for t in range(prompt, idx.shape[1]):
            logits, _ = ours.decode(cache, idx[:, t], routes)
            torch.testing.assert_close(logits[0], expected[t], atol=ATOL, rtol=0)


@pytest.mark.parametrize("rank", [0, 4])
def test_a_specialist_grown_on_an_imported_base_changes_nothing_until_trained(
    imported, tokenizer, rank: int
) -> None:
    """The invariants of a from-scratch model hold on every family: a new branch (a copy of
    the base attention, biases included, or a zero low-rank delta on it, with a dormant gate
    row) leaves every logit as it was, woken as well; removing it gives the base back."""
    *_, read = imported
    idx = _ids(tokenizer)
    model = read.model(replace(read.cfg, branch_rank=rank))
    with torch.no_grad():
        before, _ = model(idx)
        model.add_specialist("ds")
        grown, _ = model(idx)
        model.wake_specialists(["ds"])
        woken, _ = model(idx)
        forced, _ = model(idx, Routing(force=("ds",)))
        model.remove_specialist("ds")
        after, _ = model(idx)
    for logits in (grown, woken, forced, after):
        torch.testing.assert_close(logits, before, atol=ATOL, rtol=0)


def test_a_gguf_file_imports_to_the_same_weights(tokenizer, tmp_path: Path) -> None:
    """A Llama written as llama.cpp's converter writes one (q and k rows permuted, names of
    its own, the vocabulary in the file), in float32 and with a Q8_0-quantised projection."""
    theirs = hf_model("llama", tokenizer.get_vocab_size())
    folder = save_hf(theirs, tokenizer, tmp_path / "hf")
    reference = read_pretrained(folder)
    cfg = reference.cfg
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.hidden)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.kv_heads)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    types = [
        gguf.TokenType.CONTROL if t == "<|endoftext|>" else gguf.TokenType.NORMAL for t in tokens
    ]
    writer.add_token_types(types)
    writer.add_eos_token_id(vocab["<|endoftext|>"])
    writer.add_chat_template(TEMPLATE)
    sd = {k: v.detach().numpy() for k, v in theirs.state_dict().items()}

    def permute(w: np.ndarray, heads: int) -> np.ndarray:  # as llama.cpp's converter does
        return (
            w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape)
        )

    quantised = "blk.0.ffn_up.weight"  # Q8_0 packs rows in blocks of 32
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    for i in range(cfg.n_layer):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        names = {
            "attn_norm": "input_layernorm",
            "ffn_norm": "post_attention_layernorm",
            "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj",
            "ffn_gate": "mlp.gate_proj",
            "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj",
        }
        for ours, theirs_name in names.items():
            data = sd[f"{p}{theirs_name}.weight"]
            if f"{b}{ours}.weight" == quantised:
                q8 = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
                writer.add_tensor(f"{b}{ours}.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            else:
                writer.add_tensor(f"{b}{ours}.weight", data)
        writer.add_tensor(
            f"{b}attn_q.weight", permute(sd[f"{p}self_attn.q_proj.weight"], cfg.n_head)
        )
        writer.add_tensor(
            f"{b}attn_k.weight", permute(sd[f"{p}self_attn.k_proj.weight"], cfg.kv_heads)
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    read = read_pretrained(path)
    assert read.cfg == reference.cfg
    assert read.chat_template == TEMPLATE and read.eos_tokens == ("<|endoftext|>",)
    assert read.source["format"] == "gguf"
    for name, tensor in reference.state.items():
        tolerance = 0.005 if name == "blocks.0.mlp.fc.weight" else 0.0  # Q8_0 rounds
        torch.testing.assert_close(read.state[name], tensor, atol=tolerance, rtol=0, msg=name)
    text = "the tensor gradient of a list <|endoftext|> and the dict"
    assert read.tokenizer.encode(text).ids == tokenizer.encode(text).ids


def test_unpermute_undoes_llama_cpps_row_order() -> None:
    w = torch.arange(4 * 8 * 3, dtype=torch.float32).reshape(32, 3)  # 4 heads of size 8
    permuted = w.reshape(4, 2, 4, 3).transpose(1, 2).reshape(32, 3)
    torch.testing.assert_close(unpermute(permuted, 4), w)


def test_what_is_not_supported_is_refused_by_name(tokenizer, tmp_path: Path) -> None:
    theirs = hf_model("llama", tokenizer.get_vocab_size())
    folder = save_hf(theirs, tokenizer, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())

    def refused(changes: dict, says: str) -> None:
        (folder / "config.json").write_text(json.dumps({**config, **changes}))
        with pytest.raises(ImportRefused, match=says):
            read_pretrained(folder)

    refused({"model_type": "mixtral"}, "model_type 'mixtral' is not supported")
    refused({"hidden_act": "gelu"}, "activation 'gelu' is not supported")
    refused({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rotary scaling 'llama3'")
    refused({"head_dim": 16}, "head_dim 16")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ImportRefused, match="serves at most 64 positions"):
        read_pretrained(folder, context=128)
    assert read_pretrained(folder, context=16).cfg.context == 16
    for weights in folder.glob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ImportRefused, match="pickle, which is never loaded"):
        read_pretrained(folder)
    with pytest.raises(ImportRefused, match="neither a Hugging Face model directory"):
        read_pretrained(folder / "config.json")
    with pytest.raises(ImportRefused, match="does not exist"):
        read_pretrained(tmp_path / "nothing")
    assert pretrained.FAMILIES == ("gpt2", "llama", "qwen2")


def test_documents_are_separated_by_the_versions_own_end_token(tmp_path: Path) -> None:
    """A vocabulary without our `<|endoftext|>` (Llama 2's and TinyLlama's end with `</s>`):
    training text separates documents with the version's stop token, and says so when it has
    none."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from shiftable_lib.corpus import Domain
    from shiftable_lib.train import tokenize_domain

    vocab = {"</s>": 0, "<unk>": 1, "a": 2, "b": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["</s>"])
    domain = Domain("ds", train=["a b", "b"], heldout=["a"], calibration=[])
    tokens = tokenize_domain(tok, domain, stop_tokens=("</s>",))
    assert tokens.train.tolist() == [2, 3, 0, 3, 0] and tokens.heldout.tolist() == [2, 0]
    with pytest.raises(ValueError, match="no stop token to separate documents"):
        tokenize_domain(tok, domain)


def test_a_trained_low_rank_branch_decodes_as_it_scores_whole_sequences(
    imported, tokenizer
) -> None:
    """A low-rank branch's weights are the base's plus B A wherever the model reads them: in
    whole sequences, in the cache's prefill and decode (whose joined weights are kept between
    calls, and remade once a factor changes), forced, mixed by the gate, or its top one."""
    *_, read = imported
    model = read.model(replace(read.cfg, branch_rank=3))
    model.add_specialist("ds")
    model.wake_specialists(["ds"])
    perturbed(model, seed=1)  # B != 0: the branch differs from the base
    idx = _ids(tokenizer, 1)
    for routing in (Routing(), Routing(force=("ds",)), Routing(mode="top1")):
        with torch.no_grad():
            for _ in range(2):  # the second time from the kept weights, once a factor changed
                expected = model(idx, routing)[0][0]
                cache = model.new_cache(1)
                routes = RouteTable.for_batch(model.experts, routing, 1, idx.device)
                first = model.prefill(
                    cache, torch.tensor([0]), idx[:, :5], torch.tensor([5]), routes
                )
                torch.testing.assert_close(first[0][0], expected[4], atol=ATOL, rtol=0)
                for t in range(5, idx.shape[1]):
                    logits, _ = model.decode(cache, idx[:, t], routes)
                    torch.testing.assert_close(logits[0], expected[t], atol=ATOL, rtol=0)
                model.blocks[0].attn.experts["ds"].qkv_b.mul_(3.0)
    base = model(idx, Routing(force=("general",)))[0]
    assert not torch.allclose(model(idx, Routing(force=("ds",)))[0], base, atol=1e-3)
    # what it stores: the factors, not copies of the projections
    names = [n for n in model.state_dict() if ".experts.ds." in n]
    assert not any(n.endswith(("qkv.weight", "proj.weight")) for n in names)
    assert {n.rsplit(".", 1)[1] for n in names} == {
        "qkv_a",
        "qkv_b",
        "proj_a",
        "proj_b",
        "gate",
        "gate_tokens",
    }


def test_a_branch_is_a_delta_only_where_that_is_smaller_than_a_copy() -> None:
    from shiftable_lib.jobs import branch_rank
    from shiftable_lib.model import ModelConfig

    smol = ModelConfig(
        vocab_size=49152, context=2048, n_layer=30, n_head=9, n_kv_head=3, d_model=576
    )
    assert branch_rank(smol, 64) == 64 and branch_rank(smol, 0) == 0
    tiny = ModelConfig(vocab_size=64, context=16, n_layer=1, n_head=4, n_kv_head=1, d_model=32)
    # q, k, v: 48 x 32 and the output 32 x 32 hold 2,560 weights; rank 17 holds 2,448
    assert branch_rank(tiny, 17) == 17 and branch_rank(tiny, 18) == 0
    with pytest.raises(ValueError, match="branch_rank"):
        ModelConfig(vocab_size=64, context=16, n_layer=1, n_head=4, d_model=32, branch_rank=33)
