"""`bench.fused` where it cannot run (a CPU, as in CI) says so, and runs nothing."""

from __future__ import annotations

import pytest
import torch

from bench import fused as bench_fused
from shiftable_lib import fused


@pytest.mark.skipif(torch.cuda.is_available() and fused.available(), reason="has a GPU")
def test_without_a_gpu_it_says_what_it_needs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        bench_fused.main([])
    assert exited.value.code == 2
    assert "needs a CUDA GPU and Triton" in capsys.readouterr().err
    assert fused.enabled  # the switch is left as it was


@pytest.mark.skipif(
    not (torch.cuda.is_available() and fused.available()), reason="needs CUDA and Triton"
)
def test_on_a_gpu_each_product_is_timed_both_ways() -> None:
    model = bench_fused.ShiftableLM(bench_fused.SMOLLM2).cuda().bfloat16().eval()
    with torch.inference_mode():
        table = bench_fused.products(model, 4)
    assert len(table) == 4 and all(a > 0 and b > 0 for a, b in table.values())
