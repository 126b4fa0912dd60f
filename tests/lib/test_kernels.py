"""The compiled CPU decode attention against PyTorch's SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shiftable_lib import kernels


def position_major_cache(slots: int, context: int, heads: int, hd: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(slots, context, heads, hd, generator=gen) for _ in range(2))


@pytest.mark.parametrize("heads", [slice(0, 6), slice(2, 4)], ids=["all", "one-expert"])
def test_compiled_attention_equals_sdpa_and_ignores_what_lies_past_each_row(heads):
    slots, context, all_heads, hd = 5, 16, 6, 8
    k, v = position_major_cache(slots, context, all_heads, hd, seed=0)
    n, H = 4, heads.stop - heads.start  # slot 4 is free: never read
    q = torch.randn(n, H, 1, hd, generator=torch.Generator().manual_seed(1))
    pos = torch.tensor([0, 15, 6, 9])  # each row attends to positions 0..pos
    span = int(pos.max()) + 1
    keep = (torch.arange(span) <= pos[:, None]).view(n, 1, 1, span)
    keys, values = (b[:n, :span, heads].transpose(1, 2) for b in (k, v))
    expected = F.scaled_dot_product_attention(q, keys, values, attn_mask=keep)

    got = kernels.decode_attention(q, k, v, heads, pos)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

    past = torch.arange(context).view(1, context, 1, 1) > pos.view(n, 1, 1, 1)
    k[:n].masked_fill_(past, 1e4)  # keys and values past each row's position, and other
    v[:n].masked_fill_(past, -1e4)  # heads, must not matter
    k[:, :, [h for h in range(all_heads) if not heads.start <= h < heads.stop]] = float("nan")
    k[n:] = float("nan")
    torch.testing.assert_close(kernels.decode_attention(q, k, v, heads, pos), got)


@pytest.mark.parametrize("group", [2, 3])
@pytest.mark.parametrize("rows", [4, 20], ids=["fused", "batched"])
def test_grouped_query_attention_reads_each_key_head_for_its_group(group: int, rows: int):
    """With G query heads per key/value head, the compiled loop and PyTorch's paths
    (`cache.decode_attention`, fused SDPA below BATCHED_DECODE_ROWS rows, two matrix products
    from there) equal SDPA over keys and values repeated for each query head."""
    from shiftable_lib.cache import KVCache, decode_attention, visible

    kv_heads, hd, context = 2, 8, 24
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(rows, kv_heads * group, 1, hd, generator=gen)
    pos = torch.randint(0, context, (rows,), generator=gen)
    span = int(pos.max()) + 1
    keep = (torch.arange(span) <= pos[:, None]).view(rows, 1, 1, span)
    k, v = position_major_cache(rows, context, kv_heads, hd, seed=4)
    keys, values = (b[:, :span].transpose(1, 2).repeat_interleave(group, 1) for b in (k, v))
    expected = F.scaled_dot_product_attention(q, keys, values, attn_mask=keep)
    heads = slice(0, kv_heads)
    compiled = kernels.decode_attention(q, k, v, heads, pos)
    torch.testing.assert_close(compiled, expected, rtol=0, atol=1e-5)
    head_major = KVCache(
        k=[k.transpose(1, 2).contiguous()],
        v=[v.transpose(1, 2).contiguous()],
        gate_state=[],
        lengths=pos,
        experts=("general",),
    )
    torch.testing.assert_close(
        decode_attention(q, head_major, 0, heads, pos, visible(pos, span, q.dtype)),
        expected,
        rtol=0,
        atol=1e-5,
    )


def test_compiled_attention_is_only_used_where_it_applies(monkeypatch):
    k = torch.zeros(2, 4, 2, 8)
    q = torch.zeros(1, 2, 1, 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert kernels.supports(q)
    assert not kernels.supports(q.double())
    assert not kernels.supports(q.clone().requires_grad_())
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)  # PyTorch spreads rows over them
    assert not kernels.supports(q)
    pos = torch.zeros(1, dtype=torch.long)
    bad = [  # the loop has no bounds checks: each of these would read outside a buffer
        (torch.zeros(3, 2, 1, 8), k, k, slice(0, 2), torch.zeros(3, dtype=torch.long)),  # rows
        (q, k, k, slice(1, 3), pos),  # heads past the cache's
        (q, k, k, slice(-2, None), pos),  # negative
        (q, k, k, slice(0, 2, 2), pos),  # strided
        (torch.zeros(1, 2, 1, 16), k, k, slice(0, 2), pos),  # head size
        (q, k, torch.zeros(2, 3, 2, 8), slice(0, 2), pos),  # values unlike keys
        (q, k, k, slice(0, 2), torch.zeros(0, dtype=torch.long)),  # no position for the row
    ]
    for args in bad:
        with pytest.raises(ValueError, match="do not fit"):
            kernels.decode_attention(*args)
