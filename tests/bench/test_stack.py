"""Smoke test of `bench.stack`: `python -m bench.stack` against a real `sma up` on a tiny home.

The home gets tiny synthetic corpora, so the stack's first start trains the tiny profile
quickly; one run of the harness then measures a few tokens, one round, and two concurrency
levels, then its lifecycle part (an incremental add, then a full retrain); each part is
checked by a test of its own. It trains models in a real stack, hence `slow`, as the e2e stack
tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TINY_DRIFT, synthetic_documents, write_domain

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DECODE_ROWS = [
    "in-process, 1 stream",
    "gRPC Generate, 1 stream",
    "SSE /generate/stream, 1 stream",
    "gRPC, 1 concurrent (aggregate)",
    "gRPC, 2 concurrent (aggregate)",
    "gRPC 2 vs 1 stream",
]
LIFECYCLE_ROWS = ["POST /specialists incremental", "POST /specialists full_retrain"]


def bench_stack(home: Path, *extra: str, timeout: float) -> dict:
    command = [sys.executable, "-m", "bench.stack", "--home", str(home), "--profile", "tiny"]
    command += ["--tokens", "8", "--repeats", "1", "--concurrency", "1,2"]
    command += ["--threads", "1", "--train-threads", "1"]  # as the e2e stacks: shared cores
    command += ["--max-drift", str(TINY_DRIFT)]  # tests/conftest.py says why
    command += ["--device", "cpu", "--json", *extra]
    # its own process group, which the stack it starts joins: on a timeout the whole group is
    # stopped, so that no `sma up` outlives the test
    harness = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = harness.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_group(harness)
        raise AssertionError(f"bench.stack ran over {timeout} s") from None
    assert harness.returncode == 0, err[-4000:]
    return json.loads(out)


def stop_group(leader: subprocess.Popen) -> None:
    """SIGTERM to the group (`sma up` stops its servers on it), SIGKILL to what is left."""
    os.killpg(leader.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        leader.communicate(timeout=60)  # reaped, or the group never empties
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.killpg(leader.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(leader.pid, signal.SIGKILL)
    leader.wait()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """General text and one specialist: the least the lifecycle part needs."""
    root = tmp_path_factory.mktemp("bench-stack")
    for name in ("general", "ds"):
        write_domain(root / "data", name, synthetic_documents(name, 30))
    return root


@pytest.fixture(scope="module")
def report(home: Path) -> dict:
    """One whole run of the harness (its decode part, then its lifecycle part): each part is
    checked by a test of its own."""
    return bench_stack(home, timeout=600)


def test_decode_paths(report: dict) -> None:
    rows = {r["row"]: r for r in report["rows"]}
    assert list(rows)[: len(DECODE_ROWS)] == DECODE_ROWS
    for name in DECODE_ROWS[:-1]:
        assert rows[name]["unit"] == "tok/s" and rows[name]["value"] > 0
        assert rows[name]["ratio"] > 0
    assert rows["in-process, 1 stream"]["ratio"] == 1.0
    assert rows["gRPC 2 vs 1 stream"]["value"] > 0
    machine = report["machine"]
    assert machine["profile"] == "tiny" and machine["version"] == "v0002"
    assert machine["tokens"] == 8 and machine["torch_threads"] == 1
    assert set(report["step_us"]) == {"in-process", "gRPC", "SSE"}
    assert all(us > 0 for us in report["step_us"].values())
    assert set(report["outside_us_per_token"]) == set(report["step_us"])
    assert any(note.startswith("decode step, one stream") for note in report["notes"])


def test_lifecycle(report: dict, home: Path) -> None:
    rows = {r["row"]: r for r in report["rows"]}
    assert list(rows) == DECODE_ROWS + LIFECYCLE_ROWS
    assert rows[LIFECYCLE_ROWS[0]]["value"] > 0 and rows[LIFECYCLE_ROWS[1]]["value"] > 0
    # the added specialists are deleted again: their corpora are archived, not destroyed
    data = home / "data"
    assert sorted(p.name for p in data.iterdir() if not p.name.startswith(".")) == ["ds", "general"]
    assert any(p.name.startswith("benchnew") for p in (data / ".deleted").rglob("*"))
