"""What the inference tests share: a tiny trained home (once per session), the library's own
completion to compare against, a running core, and the servicer on a loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch

from services.common import Service, start_server
from services.inference.core import InferenceCore
from services.inference.messages import Chunk
from services.inference.server import SERVICE_NAME, InferenceServicer
from shiftable_lib import checkpoint
from shiftable_lib.generate import Engine, Sequence, complete
from shiftable_lib.sampling import SamplingParams
from sma.v1 import inference_pb2_grpc
from tests.conftest import train_tiny_home

GENERALIST, SHIFTABLE = "v0001", "v0002"  # what train_all publishes: generalist, then specialists
EXPERTS = ("general", "dl", "ds")
PROMPTS = ["the list of", "numpy array mean", "tensor gradient"]
GREEDY = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
LONG = SamplingParams(max_new_tokens=63, temperature=0, ignore_eos=True)  # the whole context


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from more threads, and the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_home(tmp_path_factory.mktemp("home"))


@functools.cache
def _version(models: Path, version: str) -> checkpoint.ModelVersion:
    return checkpoint.load_version(models, version)


def reference(models: Path, version: str, prompt: str, params: SamplingParams) -> Sequence:
    """The library's own completion, one request alone, to compare the service against."""
    loaded = _version(models, version)
    return complete(Engine(loaded.model, loaded.tokenizer, max_batch=1), [prompt], params)[0]


@contextlib.asynccontextmanager
async def running_core(
    models: Path, version: str | None = SHIFTABLE, device: str = "cpu", **limits: int
) -> AsyncIterator[InferenceCore]:
    core = InferenceCore(models, device, **limits)
    try:
        if version is not None:
            await core.load(version)
        yield core
    finally:
        await asyncio.to_thread(core.close)


@contextlib.asynccontextmanager
async def serving(core: InferenceCore) -> AsyncIterator[inference_pb2_grpc.InferenceStub]:
    """The servicer on a free loopback port, and a client stub connected to it."""
    service = Service(
        SERVICE_NAME, inference_pb2_grpc.add_InferenceServicer_to_server, InferenceServicer(core)
    )
    server = await start_server("127.0.0.1:0", [service])
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield inference_pb2_grpc.InferenceStub(channel)
    finally:
        await server.grpc_server.stop(None)


async def collect(stream: AsyncIterator[Chunk]) -> list[Chunk]:
    return [chunk async for chunk in stream]


async def eventually(condition: Callable[[], object], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come true in time"
        await asyncio.sleep(0.005)


def joined(chunks: list[Chunk]) -> tuple[str, list[int]]:
    return "".join(c.text for c in chunks), [i for c in chunks for i in c.token_ids]
