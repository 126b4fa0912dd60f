"""Benchmark a live `sma up` stack: decode tokens/s (in-process, gRPC, SSE) and add times.

Decode speed of one stream in-process vs over gRPC vs over SSE, the batching gain of concurrent
gRPC streams, and the wall time of an incremental add vs a full retrain, in one run. For the
single-stream rounds it also notes each process's CPU per token, and splits a stream's time into
the decode steps (the worker's own, from `GetModelInfo.decode_seconds`, against the same steps
in-process) and what it spends per token outside them.

Starts `sma up` on a free block of loopback ports (log in a temp folder), waits for /health
`ready`, measures, and stops the stack with SIGTERM. A home without a model gets one trained by
the stack's first start (with --profile). Every decode is greedy from one fixed prompt, and the
stack's inference server and this process use the same torch thread count (--threads).

The lifecycle part adds specialists `benchnew*` built from the first documents of an existing
specialist's corpus, then DELETEs them again: the home keeps the new model versions, and the
deleted corpora move to data/.deleted/ (nothing is destroyed).

    python -m bench.stack --home sma-home [--profile cpu] [--tokens 128] [--repeats 3] \\
        [--concurrency 1,8,32] [--threads N] [--train-threads N] [--device cpu|cuda] \\
        [--json] [--skip-lifecycle]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import torch

from bench.stack_paths import (
    choose_prompt,
    cpu_model,
    grpc_once,
    inprocess_once,
    sse_once,
    stack_cpu,
)
from shiftable_lib import checkpoint
from shiftable_lib.config import Settings
from shiftable_lib.corpus import DOCUMENT_SEPARATOR, GENERAL, read_documents
from shiftable_lib.generate import Engine
from sma.v1 import inference_pb2, inference_pb2_grpc

READY_TIMEOUT_S = 3600.0  # a first start trains the model before it is ready: allow a long one
ANSWER_TIMEOUT_S = 120.0  # the gateway answers /health early, whether it is training or not
CONCURRENCY = (1, 8, 32)
NEW_DOCS = 100  # documents copied into each new specialist corpus (at most half the source)

Samples = list[tuple[int, float]]  # (tokens, seconds) of each round


def free_port_block(n: int = 4, host: str = "127.0.0.1") -> int:
    """A port P with P .. P+n-1 all free, and P+1001 .. P+n+999: a gateway port whose derived
    gRPC and metrics ports are free too (the benchmarks and the tests start stacks side by side
    with it)."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20_000, 60_000)
        try:
            for port in [*range(base, base + n), *range(base + 1001, base + n + 1000)]:
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return base
    raise OSError("no free block of ports")


def start_stack(
    home: Path,
    profile: str,
    device: str,
    port: int,
    threads: int,
    log: Path,
    train_threads: int = 0,
    max_drift: float | None = None,
) -> subprocess.Popen:
    """`sma up` on `home`; `max_drift` is its SMA_MAX_DRIFT (None: the default)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMA_")}  # no stray ports
    env["SMA_THREADS"] = str(threads)
    env["SMA_TRAIN_THREADS"] = str(train_threads)
    if max_drift is not None:
        env["SMA_MAX_DRIFT"] = str(max_drift)
    command = [sys.executable, "-m", "shiftable.cli", "up", "--home", str(home)]
    command += ["--profile", profile, "--device", device, "--port", str(port)]
    with open(log, "ab") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)


def stop_stack(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_ready(http: httpx.Client, process: subprocess.Popen, log: Path) -> dict:
    """/health once it says ready. A first start trains a model first, but the gateway answers
    /health meanwhile: if it has not answered within ANSWER_TIMEOUT_S (e.g. it crashes at
    start and the supervisor keeps restarting it), give up with the log rather than wait."""
    start = time.monotonic()
    answered = False
    while time.monotonic() - start < READY_TIMEOUT_S:
        if process.poll() is not None:
            break
        if not answered and time.monotonic() - start > ANSWER_TIMEOUT_S:
            break
        try:
            health = http.get("/health", timeout=5.0).json()
            answered = True
            if health.get("ready"):
                return health
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
    state = "never answered /health" if not answered else "is not ready"
    raise RuntimeError(f"the stack {state} (exit code {process.poll()}):\n{tail}")


def fresh_name(base: str, data_dir: Path, taken: list[str]) -> str:
    name, i = base, 1
    while name in taken or (data_dir / name).exists():
        i += 1
        name = f"{base}{i}"
    return name


def lifecycle(http: httpx.Client, data_dir: Path) -> dict:
    """Seconds from POST /specialists to its 200 (the new specialist serves): an incremental
    add of one new corpus, then (after deleting it) a full retrain with a copy of it."""
    served = http.get("/specialists").raise_for_status().json()
    source = next(s for s in served if s != GENERAL and (data_dir / s).is_dir())
    docs = read_documents(data_dir / source)
    docs = docs[: min(NEW_DOCS, max(1, len(docs) // 2))]
    seconds: dict[str, float] = {}
    names: list[str] = []
    for full in (False, True):
        name = fresh_name("benchnew", data_dir, served + names)
        names.append(name)
        (data_dir / name).mkdir(parents=True)
        (data_dir / name / "corpus.txt").write_text(DOCUMENT_SEPARATOR.join(docs) + "\n")
        start = time.perf_counter()
        reply = http.post("/specialists", json={"name": name, "full_retrain": full}, timeout=None)
        seconds["full" if full else "incremental"] = time.perf_counter() - start
        if reply.status_code != 200:
            raise RuntimeError(f"POST /specialists {name}: {reply.status_code} {reply.text}")
        reply = http.delete(f"/specialists/{name}", timeout=None)  # corpus -> data/.deleted/
        if reply.status_code != 200:
            raise RuntimeError(f"DELETE /specialists/{name}: {reply.status_code} {reply.text}")
    return {"source": source, "documents": len(docs), "names": names, **seconds}


def rate(samples: Samples) -> float:
    return statistics.median(n / s for n, s in samples)


def paired(samples: Samples, base: Samples) -> float:
    """Median over rounds of the round's ratio: a slow or fast spell of the machine cancels."""
    return statistics.median(
        (n / s) / (m / t) for (n, s), (m, t) in zip(samples, base, strict=True)
    )


def measure(args: argparse.Namespace, settings: Settings, profile: str) -> dict:
    """Start the stack, take every sample, stop it: the raw material of `summarize`."""
    port = free_port_block()
    log = Path(tempfile.mkdtemp(prefix="bench-stack-")) / "stack.log"
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60.0)
    # the inference port the stack derives from the gateway's (Settings.grpc_port)
    address = Settings(
        home=settings.home, host="127.0.0.1", port=port, inference_port=0, inference_addr=""
    ).grpc_target("inference")
    process = start_stack(
        settings.home, profile, args.device, port, args.threads, log, args.train_threads,
        args.max_drift,
    )  # fmt: skip
    raw: dict = {"notes": [f"stack log: {log}"], "load_before": os.getloadavg()[0]}
    worker = ThreadPoolExecutor(max_workers=1)
    channel = grpc.insecure_channel(address)  # connects when first used
    stub = inference_pb2_grpc.InferenceStub(channel)

    def model_info() -> inference_pb2.GetModelInfoResponse:
        return stub.GetModelInfo(inference_pb2.GetModelInfoRequest(), timeout=30)

    try:
        wait_ready(http, process, log)
        raw["info"] = info = model_info()
        # in the dtype the server chose for it (SMA_SERVE_DTYPE)
        version = checkpoint.load_version(
            settings.models_dir, info.version_id, args.device, settings.serve_dtype
        )
        # as in the server: the engine is built on one thread and stepped on another (`worker`,
        # like its step thread). Which thread first runs torch's parallel regions matters: on a
        # busy machine, stepping on that same thread with several threads was far slower
        engine = Engine(version.model, version.tokenizer, info.max_batch)
        prompt, reach = worker.submit(choose_prompt, engine, args.tokens).result()
        raw["prompt"] = prompt
        schemas = http.get("/openapi.json").json().get("components", {}).get("schemas", {})
        raw["sse_eos"] = sse_eos = "ignore_eos" in schemas.get("GenerateBody", {}).get(
            "properties", {}
        )
        if not sse_eos and reach < args.tokens:
            raw["notes"].append(
                f"every prompt hits EOS before {args.tokens} tokens (best {reach}) and the "
                "gateway has no ignore_eos: the SSE row is over shorter streams (more prefill "
                "and overhead per token), not strictly comparable"
            )
        if info.max_batch < max(args.concurrency):
            raw["notes"].append(f"max_batch is {info.max_batch}: streams beyond it queue")
        one: dict[str, Samples] = {"in-process": [], "gRPC": [], "SSE": []}
        finishes: list[str | None] = []
        cpu: dict[str, dict[str, float]] = {"gRPC": {}, "SSE": {}}  # CPU seconds by role
        # decode steps of the measured rounds: in this process, and in the stack's worker
        step_times: list[float] = []
        worker_steps = {"gRPC": [0, 0.0], "SSE": [0, 0.0]}  # steps, seconds
        paths = {
            "in-process": lambda: worker.submit(
                inprocess_once, engine, prompt, args.tokens, step_times if round_ else []
            ).result(),
            "gRPC": lambda: grpc_once(address, prompt, args.tokens, 1),
            "SSE": lambda: sse_once(http, prompt, args.tokens, sse_eos),
        }
        for round_ in range(args.repeats + 1):  # round 0 warms every path up
            # each round runs the three back to back, in turn forwards and backwards, so that a
            # drift in the machine's speed hits them alike (ratios are taken within a round)
            order = list(paths) if round_ % 2 else list(reversed(paths))
            got = {}
            for name in order:
                counted = name in cpu and round_ > 0  # the stack's CPU, for the stack's paths
                first = model_info() if counted else None
                before = stack_cpu(process.pid) if counted else {}
                got[name] = paths[name]()
                if counted:
                    for role, seconds in stack_cpu(process.pid).items():
                        cpu[name][role] = cpu[name].get(role, 0.0) + seconds - before.get(role, 0.0)
                    last = model_info()
                    worker_steps[name][0] += last.decode_steps - first.decode_steps
                    worker_steps[name][1] += last.decode_seconds - first.decode_seconds
            if round_:
                one["in-process"].append(got["in-process"])
                one["gRPC"].append(got["gRPC"])
                n, seconds, finish = got["SSE"]
                one["SSE"].append((n, seconds))
                finishes.append(finish)
        if min(n for n, _ in one["SSE"]) < args.tokens:
            raw["notes"].append(
                f"SSE streams ended early: {one['SSE']} (tokens, s), finish {finishes}"
            )
        conc: dict[int, Samples] = {n: [] for n in args.concurrency}
        grpc_once(address, prompt, args.tokens, max(args.concurrency))  # warm the batched shapes
        for _ in range(args.repeats):
            for n in args.concurrency:
                conc[n].append(grpc_once(address, prompt, args.tokens, n))
        life = None
        if not args.skip_lifecycle:
            life = lifecycle(http, settings.data_dir)
    finally:
        worker.shutdown()
        http.close()
        channel.close()
        stop_stack(process)
    raw |= {"one": one, "cpu": cpu, "step_times": step_times, "worker_steps": worker_steps}
    return raw | {"conc": conc, "life": life}


def summarize(raw: dict, args: argparse.Namespace) -> dict:
    """Rows (value, unit, ratio, goal), the machine, notes, and the per-token splits."""
    one, notes, info = raw["one"], raw["notes"], raw["info"]
    single = {k: rate(v) for k, v in one.items()}
    base = single["in-process"]
    rows: list[dict] = []

    def row(name: str, value: float, unit: str, ratio: float | None, goal: str = "") -> None:
        rows.append({"row": name, "value": round(value, 2), "unit": unit, "goal": goal,
                     "ratio": None if ratio is None else round(ratio, 3)})  # fmt: skip

    row("in-process, 1 stream", base, "tok/s", 1.0)
    inproc = one["in-process"]
    row("gRPC Generate, 1 stream", single["gRPC"], "tok/s", paired(one["gRPC"], inproc), ">=0.9x")
    sse = paired(one["SSE"], inproc)
    row("SSE /generate/stream, 1 stream", single["SSE"], "tok/s", sse, ">=0.85x")
    conc = raw["conc"]
    for n in args.concurrency:
        row(f"gRPC, {n} concurrent (aggregate)", rate(conc[n]), "tok/s", rate(conc[n]) / base)
    most, fewest = max(args.concurrency), min(args.concurrency)
    goal = ">=8x" if (most, fewest) == (32, 1) else ""
    row(f"gRPC {most} vs {fewest} stream", paired(conc[most], conc[fewest]), "x", None, goal)
    if (life := raw["life"]) is not None:
        row("POST /specialists incremental", life["incremental"], "s", None)
        row("POST /specialists full_retrain", life["full"], "s", life["full"] / life["incremental"])
        notes.append(
            f"lifecycle: {life['documents']} documents of {life['source']!r} as "
            f"{life['names']} (ratio = full / incremental); corpora moved to data/.deleted/"
        )
    # CPU time per streamed token, by process: what one stream costs each core beyond decoding
    cpu_per_token = {
        path: {
            role: round(seconds / sum(n for n, *_ in one[path]) * 1e6)
            for role, seconds in sorted(raw["cpu"][path].items())
            if seconds > 0
        }
        for path in raw["cpu"]
    }
    for path, roles in cpu_per_token.items():
        if roles:
            used = ", ".join(f"{role} {us}" for role, us in roles.items())
            notes.append(f"CPU us per token, one {path} stream: {used}")
    # the same decode step in this process and in the stack's worker, and what each path spends
    # per token outside its steps (hand-off, protocol, client)
    step_times = raw["step_times"]
    step_us = {"in-process": statistics.fmean(step_times) * 1e6}
    outside_us = {
        "in-process": (sum(s for _, s in inproc) - sum(step_times)) / len(step_times) * 1e6
    }
    for path, (n_steps, seconds) in raw["worker_steps"].items():
        if n_steps:
            step_us[path] = seconds / n_steps * 1e6
            outside_us[path] = (sum(s for _, s in one[path]) - seconds) / n_steps * 1e6
    base_step = step_us["in-process"]
    notes.append(
        "decode step, one stream (mean us): "
        + ", ".join(f"{path} {us:.0f} ({us / base_step:.2f}x)" for path, us in step_us.items())
        + "; per token outside the steps: "
        + ", ".join(f"{path} {us:.0f}" for path, us in outside_us.items())
    )
    machine = {
        "cpus": os.cpu_count(),
        "cpu": cpu_model(),
        "device": args.device,
        "loadavg_1m_before_after": [round(raw["load_before"], 2), round(os.getloadavg()[0], 2)],
        "torch": torch.__version__,
        "torch_threads": args.threads,
        "profile": info.profile,
        "version": info.version_id,
        "max_batch": info.max_batch,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "prompt": raw["prompt"],
        "sse_ignore_eos": raw["sse_eos"],
    }
    return {
        "rows": rows,
        "machine": machine,
        "cpu_us_per_token": cpu_per_token,
        "step_us": step_us,
        "outside_us_per_token": outside_us,
        "notes": notes,
    }


def print_report(report: dict) -> None:
    print(f"{'row':34} {'value':>10} {'unit':6} {'ratio':>8}  goal")
    for r in report["rows"]:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        print(f"{r['row']:34} {r['value']:>10.2f} {r['unit']:6} {ratio:>8}  {r['goal']}")
    print("ratio: vs in-process for tok/s rows (1 stream: the median of each round's ratio);")
    print("       full retrain / incremental for the last; N vs 1: median of each round's ratio")
    print("machine: " + ", ".join(f"{k} {v!r}" for k, v in report["machine"].items()))
    for note in report["notes"]:
        print(f"note: {note}")


def concurrency(text: str) -> tuple[int, ...]:
    levels = tuple(sorted({int(n) for n in text.split(",")}))
    if len(levels) < 2 or levels[0] < 1:
        raise argparse.ArgumentTypeError("two or more stream counts >= 1, e.g. 1,8,32")
    return levels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--profile", default="cpu", help="for a first training only")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per stream")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; medians are reported")
    parser.add_argument(
        "--concurrency",
        type=concurrency,
        default=CONCURRENCY,
        help="concurrent gRPC streams to compare, comma-separated (default 1,8,32)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (SMA_THREADS); 0 = the stack's default",
    )
    parser.add_argument(
        "--train-threads",
        type=int,
        default=0,
        help="torch threads of the stack's training jobs (SMA_TRAIN_THREADS); 0 = all cores",
    )
    parser.add_argument(
        "--device", default="cpu", help="where the stack and the in-process engine decode"
    )
    parser.add_argument(
        "--max-drift",
        type=float,
        default=None,
        metavar="PERCENT",
        help="the stack's SMA_MAX_DRIFT for the lifecycle's add and delete (default: its own)",
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--skip-lifecycle", action="store_true")
    args = parser.parse_args(argv)

    home = args.home.resolve()
    args.threads = args.threads or Settings(home=home).decode_threads()  # as the worker's
    settings = Settings(home=home, threads=args.threads)
    profile = args.profile
    if (current := checkpoint.current_version(settings.models_dir)) is not None:
        # the stack must not disagree with the model
        profile = checkpoint.load_version(settings.models_dir, current).profile.name
    torch.set_num_threads(args.threads)
    report = summarize(measure(args, settings, profile), args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)


if __name__ == "__main__":
    main()
