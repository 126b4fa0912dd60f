"""The inference worker's torch threads: each version decodes on the count its dtype calls for,
set in the helper thread that makes its engine and in the thread that steps it."""

from __future__ import annotations

import importlib.util
import multiprocessing
import threading
from pathlib import Path

import torch

from services.inference.worker import Worker, _Prepared
from tests.services.inference.conftest import SHIFTABLE


def prepare_apart(worker: Worker, version_id: str) -> _Prepared:
    """`Worker.prepare` in a helper thread of its own, as a `Load` runs it."""
    prepared: list[_Prepared] = []
    helper = threading.Thread(target=lambda: prepared.append(worker.prepare(version_id)))
    helper.start()
    helper.join()
    return prepared[0]


def test_a_version_served_in_bfloat16_on_the_cpu_decodes_on_its_own_thread_count(
    models: Path,
) -> None:
    """float32 on one thread (the compiled attention loop's cache layout), bfloat16 on two
    (bound by memory bandwidth), and back: each swap sets the step loop's count."""
    conn, _ = multiprocessing.Pipe()
    cpu = torch.device("cpu")
    before = torch.get_num_threads()
    try:
        for dtype, threads in (("float32", 1), ("bfloat16", 2), ("float32", 1)):
            worker = Worker(conn, models, cpu, 2, dtype=dtype, threads=1, bf16_threads=2)
            engine, loaded = prepare_apart(worker, SHIFTABLE)
            assert (loaded.dtype, loaded.threads) == (dtype, threads)
            assert next(engine.model.parameters()).dtype == getattr(torch, dtype)
            # the compiled loop's layout: float32 on one thread, where numba is installed
            with_loop = dtype == "float32" and importlib.util.find_spec("numba") is not None
            assert engine.cache.position_major == with_loop
            worker.adopt(engine, loaded)
            assert torch.get_num_threads() == threads
            assert worker.engine_version == SHIFTABLE
    finally:
        torch.set_num_threads(before)


def test_an_explicit_thread_count_serves_every_dtype(models: Path) -> None:
    """With SMA_THREADS set, bf16_threads is that same count (`Settings.decode_threads`)."""
    conn, _ = multiprocessing.Pipe()
    before = torch.get_num_threads()
    try:
        worker = Worker(conn, models, torch.device("cpu"), 2, dtype="bfloat16", threads=1)
        engine, loaded = prepare_apart(worker, SHIFTABLE)
        assert (loaded.dtype, loaded.threads) == ("bfloat16", 1)
        worker.adopt(engine, loaded)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_load_in_a_helper_thread_leaves_the_step_loops_count_alone(models: Path) -> None:
    """The step loop, a thread that has not run a parallel operation yet, adopts a float32
    version on one thread; a helper thread then prepares a bfloat16 one on two (a hot swap,
    or a load that fails after it). The step loop still decodes on one: torch would otherwise
    hand a new thread the last count any thread set, at its first parallel operation."""
    conn, _ = multiprocessing.Pipe()
    cpu = torch.device("cpu")
    before = torch.get_num_threads()
    counts: list[int] = []

    def step_loop() -> None:
        narrow = Worker(conn, models, cpu, 2, dtype="float32", threads=1, bf16_threads=2)
        narrow.adopt(*prepare_apart(narrow, SHIFTABLE))  # as a first Load: made apart
        wide = Worker(conn, models, cpu, 2, dtype="bfloat16", threads=1, bf16_threads=2)
        assert prepare_apart(wide, SHIFTABLE)[1].threads == 2
        torch.ones(64, 64) @ torch.ones(64, 64)  # a parallel operation, as a decode step
        counts.append(torch.get_num_threads())

    try:
        loop = threading.Thread(target=step_loop)
        loop.start()
        loop.join()
        assert counts == [1]
    finally:
        torch.set_num_threads(before)
