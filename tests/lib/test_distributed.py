"""Data-parallel training under torchrun: two gloo processes on the CPU against one process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shiftable_lib.distributed import World
from tests.conftest import torchrun_ranks
from tests.e2e.conftest import tiny_home

pytestmark = pytest.mark.slow


def sma_train(home: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "SMA_THREADS": "1"}
    env.pop("SMA_HOME", None)
    command = [sys.executable, "-m", "shiftable.cli", "train", "--home", str(home)]
    command += ["--profile", "tiny", "--device", "cpu", *extra]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, _ = process.communicate(timeout=timeout)
    return process.returncode, out.decode(errors="replace")


def version(home: Path, name: str) -> tuple[dict, dict]:
    folder = home / "artifacts" / "models" / name
    return load_file(str(folder / "model.safetensors")), json.loads(
        (folder / "metrics.json").read_text()
    )


def test_two_processes_reach_the_weights_and_losses_of_one(tmp_path: Path) -> None:
    one, two = tiny_home(tmp_path / "one"), tiny_home(tmp_path / "two")
    code, out = finish(sma_train(one))
    assert code == 0, out
    code, out = finish(sma_train(two, "--nproc-per-node", "2"))
    assert code == 0, out
    assert out.count("trained specialists") == 1  # rank 0 alone reports
    for name in ("v0001", "v0002"):  # the generalist, then both specialists and the gate
        (w1, m1), (w2, m2) = version(one, name), version(two, name)
        assert w1.keys() == w2.keys()
        for key in w1:
            torch.testing.assert_close(w2[key], w1[key], rtol=1e-3, atol=1e-4, msg=key)
        phases = [k for k, v in m1["training"].items() if isinstance(v, dict) and "loss_curve" in v]
        assert phases and sorted(m1["training"]) == sorted(m2["training"])
        for specialist, found in m1["training"].get("calibration", {}).items():
            if specialist != "seconds":  # every rank calibrates the same model alike
                offset = m2["training"]["calibration"][specialist]["gate_offset"]
                assert offset == pytest.approx(found["gate_offset"], abs=1e-3)
        for phase in phases:
            curve1, curve2 = (
                m1["training"][phase]["loss_curve"],
                m2["training"][phase]["loss_curve"],
            )
            assert len(curve1) == len(curve2) > 1
            torch.testing.assert_close(
                torch.tensor(curve2), torch.tensor(curve1), rtol=1e-3, atol=1e-4
            )
        for domain, d in m1["domains"].items():
            assert m2["domains"][domain]["model_ppl"] == pytest.approx(d["model_ppl"], rel=1e-3)
    assert sorted(p.name for p in (two / "artifacts" / "models").iterdir()) == [
        "CURRENT",
        "v0001",
        "v0002",
    ]


def test_a_rank_that_dies_fails_the_job_and_publishes_nothing(tmp_path: Path) -> None:
    home = tiny_home(tmp_path / "home")
    models = home / "artifacts" / "models"
    job = sma_train(home, "--nproc-per-node", "2")
    try:
        deadline = time.monotonic() + 120
        while not (models / "v0001").is_dir():  # the generalist is out: specialists train next
            assert job.poll() is None and time.monotonic() < deadline, finish(job)[1]
            time.sleep(0.02)
        os.kill(torchrun_ranks(job.pid)[1], signal.SIGKILL)
        code, out = finish(job, timeout=120)  # no hang: torchrun stops the other rank
    finally:
        if job.poll() is None:
            job.kill()
    assert code != 0, out
    assert sorted(p.name for p in models.iterdir()) == ["CURRENT", "v0001"], out
    assert (models / "CURRENT").read_text().strip() == "v0001"
    assert not [p for p in models.iterdir() if p.name.startswith(".tmp")]
    # the home still trains: the specialists that were cut off are trained by a new job
    code, out = finish(sma_train(home))
    assert code == 0, out
    assert (models / "v0002").is_dir()


def test_a_global_batch_splits_into_disjoint_rows_per_rank() -> None:
    batch = torch.arange(8).view(8, 1)
    shards = [World(rank, 2).rows(batch).flatten().tolist() for rank in range(2)]
    assert shards == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert World().rows(batch) is batch
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        World(0, 3).rows(batch)


def test_an_unsplittable_batch_is_refused_before_training(tmp_path: Path) -> None:
    home = tiny_home(tmp_path / "home")
    code, out = finish(sma_train(home, "--nproc-per-node", "3"))  # tiny's batch is 8
    assert code != 0
    assert "does not split over 3 processes" in out
    assert not (home / "artifacts" / "models" / "v0001").exists()
    shutil.rmtree(home)
