"""The ways `bench.stack` decodes one prompt (in this process, over gRPC, over SSE), and what
it reads of the machine: the stack's CPU time by process, the CPU model.

Only public interfaces: the library's `Engine`, the `sma.v1` gRPC API and the gateway's REST
API. The CPU accounting reads /proc (Linux) and tells the stack's processes apart by their
command lines.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import time
from pathlib import Path

import grpc
import httpx

from shiftable_lib.generate import Engine
from shiftable_lib.sampling import SamplingParams
from sma.v1 import inference_pb2, inference_pb2_grpc

# the first whose greedy completion runs to --tokens without EOS is used
PROMPTS = ("The list of files in the module", "import numpy as np\n", "def main():\n")


def choose_prompt(engine: Engine, tokens: int) -> tuple[str, int]:
    """The first prompt whose greedy completion (EOS allowed) is `tokens` long, else the one
    that runs longest; and that length (greedy is deterministic, so the gateway's matches)."""
    params = SamplingParams(max_new_tokens=tokens, temperature=0.0)
    best = ("", -1)
    for prompt in PROMPTS:
        seq = engine.submit(prompt, params)
        while engine.has_work():
            engine.step()
        if len(seq.output_ids) > best[1]:
            best = (prompt, len(seq.output_ids))
        if best[1] >= tokens:
            break
    return best


def inprocess_once(
    engine: Engine, prompt: str, tokens: int, steps: list[float]
) -> tuple[int, float]:
    """Tokens and wall time of one greedy completion; appends each decode step's time to
    `steps` (timed as the inference worker times its own: `Info.decode_seconds`)."""
    params = SamplingParams(max_new_tokens=tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    seq = engine.submit(prompt, params)
    while seq.finish_reason is None:
        before = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - before)
    return len(seq.output_ids), time.perf_counter() - start


def grpc_once(address: str, prompt: str, tokens: int, streams: int) -> tuple[int, float]:
    """Total completion tokens of `streams` concurrent Generate calls, and the wall time from
    starting the first to the last message of the last (connection set up beforehand)."""
    request = inference_pb2.GenerateRequest(
        prompt=prompt, max_new_tokens=tokens, temperature=0.0, top_k=0, top_p=1.0, seed=0
    )
    request.ignore_eos = True

    async def run() -> tuple[int, float]:
        async with grpc.aio.insecure_channel(address) as channel:
            await channel.channel_ready()
            stub = inference_pb2_grpc.InferenceStub(channel)

            async def one() -> int:
                usage = 0
                async for message in stub.Generate(request):
                    usage = message.usage.completion_tokens or usage
                return usage

            start = time.perf_counter()
            counts = await asyncio.gather(*(one() for _ in range(streams)))
            return sum(counts), time.perf_counter() - start

    return asyncio.run(run())


def sse_once(
    http: httpx.Client, prompt: str, tokens: int, ignore_eos: bool
) -> tuple[int, float, str | None]:
    """Tokens streamed (sum of token_ids), wall time to the `done` event, finish reason.
    `ignore_eos` only where the gateway's GenerateBody has it (else it would answer 422)."""
    body = {"prompt": prompt, "max_new_tokens": tokens, "temperature": 0.0, "seed": 0}
    body |= {"ignore_eos": True} if ignore_eos else {}
    count, finish, event = 0, None, ""
    start = time.perf_counter()
    with http.stream("POST", "/generate/stream", json=body, timeout=None) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = json.loads(line.removeprefix("data: "))
                if event == "token":
                    count += len(data["token_ids"])
                elif event == "done":
                    finish = data.get("finish_reason")
                    break
                else:
                    raise RuntimeError(f"SSE {event}: {data}")
    return count, time.perf_counter() - start, finish


def stack_cpu(root: int) -> dict[str, float]:
    """CPU seconds (user + system) used so far by the process tree under `root`, by role: each
    server by its `sma serve` name, the inference worker, everything else as "sma up"; and by
    this process as "client". Empty where there is no /proc (Linux only)."""
    tick = os.sysconf("SC_CLK_TCK")
    procs: dict[int, tuple[int, list[str], float]] = {}  # pid -> (parent, command, seconds)
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # gone meanwhile
            continue
        seconds = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        procs[int(entry.name)] = (int(fields[1]), command, seconds)
    if root not in procs:
        return {}
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in procs.items():
        children.setdefault(parent, []).append(pid)
    used: dict[str, float] = {}
    todo = [(root, "sma up")]
    while todo:
        pid, role = todo.pop()
        command, seconds = procs[pid][1], procs[pid][2]
        if "serve" in command[:-1]:
            role = command[command.index("serve") + 1]
        elif any("spawn_main" in word for word in command):  # a multiprocessing child
            role = f"{role} worker"
        used[role] = used.get(role, 0.0) + seconds
        todo += [(child, role) for child in children.get(pid, [])]
    times = os.times()
    used["client"] = times.user + times.system
    return used


def cpu_model() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return (re.findall(r"model name\s*:\s*(.*)", info) or [platform.machine()])[0]
