"""Smoke test of `bench.serve_dtype` on tiny shapes: both dtypes decode, the table says what
`auto` chooses for each model, and a home's current version is timed beside them."""

from __future__ import annotations

from pathlib import Path

import torch

from bench.serve_dtype import measure, print_table
from shiftable_lib import checkpoint
from tests.conftest import train_tiny_home


def test_both_dtypes_decode_and_auto_is_named(home: Path) -> None:
    train_tiny_home(home)
    result = measure("cpu", home, shapes=((1, 32), (2, 64)), new_tokens=4)
    assert result["cpu_has_bf16"] == checkpoint.cpu_has_bf16()
    assert list(result["models"])[:2] == ["1 x 32", "2 x 64"] and len(result["models"]) == 3
    for row in result["models"].values():
        assert row["float32"] > 0 and row["bfloat16"] > 0
        # models this small are below the threshold: float32
        assert row["mib"] * 2**20 < checkpoint.CPU_BF16_MIN_BYTES and row["auto"] == "float32"
    table = print_table(result)
    assert "| 2 x 64 |" in table and table.count("float32 |") == 3
    assert torch.get_num_threads() == result["threads"]
