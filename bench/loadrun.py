"""A long load run for the reliability report: many SSE clients while specialists hot-swap.

Starts `sma up` (bench.stack's helpers: a free block of loopback ports, readiness through
/health) on a home with tiny synthetic corpora (general and two specialists) unless `--home`
already has a model. Then `--clients` threads stream `POST /generate/stream` back to back for
`--duration` seconds, each request with a random prompt and temperature, reading every event;
meanwhile `--swaps` hot swaps run one after the other, each an add of a new specialist (its
corpus written under data/<name>/ first) and later its delete, each waited for. Records:

- every stream's outcome: `completed` (a `done` event whose finish reason is not `cancelled`),
  `cut` (an `error` event, an end without `done`, a transport error, an HTTP status other than
  200 and 429), or `429` (the queue or a per-client limit: a legitimate answer, counted apart);
- tokens per second over the whole run, time to first token (p50, p99), stream latency;
- each swap's operations: seconds until the call returned, serving version before and after,
  and how many streams were in flight meanwhile (the swap happened under load);
- the memory (VmRSS, and VmHWM: the peak) of every stack process, from /proc, before the load
  and after it: the `sma up` supervisor, the four servers (pids from <home>/state/stack.json)
  and the inference server's decode worker (its spawned child).

"Before" is the ready, idle stack, so "delta" includes the first requests' one-off
allocations (buffers, the batch's KV cache) as well as whatever the swaps leave behind.

Prints markdown tables (to paste into docs/reliability.md); `--json PATH` writes the raw
figures, every stream included. Exit code 1 when any stream was cut short, a `done` event's
usage disagreed with the tokens streamed, a swap failed, a stack process was restarted (its
pid changed) or no stream completed: usable as a check. For each cut stream the stack log
lines written while it ran are printed (the log is <home>/loadrun.log). A temporary home is
removed after a clean run (unless `--keep`) and kept after a failed one.

    python -m bench.loadrun [--home H] [--profile tiny] [--clients 16] [--duration 280] \\
        [--swaps 2] [--tokens 32] [--threads N] [--train-threads N] [--seed 0] [--json PATH] \\
        [--keep]

With the defaults (`--profile tiny`, a temporary home) a run takes about 5 minutes: the first
start trains in seconds, then 280 s of load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from bench.stack import free_port_block, fresh_name, start_stack, stop_stack, wait_ready
from shiftable_lib.corpus import DOCUMENT_SEPARATOR, GENERAL
from shiftable_lib.versions import current_version

# Words of the synthetic corpora: a generalist and two specialists to start with, and the
# domain of the specialists the swaps add. Tiny corpora train in seconds with `--profile tiny`.
WORDS = {
    GENERAL: (
        "the list dict string file open read write module function class return value if else"
        " for while print format path os sys time json error"
    ).split(),
    "ds": (
        "array matrix numpy mean variance regression sample frame axis dtype scipy linalg"
        " sparse fft interpolate optimize stats"
    ).split(),
    "dl": (
        "tensor gradient layer torch backward optimizer loss batch cuda autograd relu conv"
        " dropout embedding attention"
    ).split(),
}
SWAP_WORDS = (
    "request response header route server client socket json status cookie session url"
    " query proxy cache token"
).split()
SWAP_BASE = "loadswap"  # the swaps' specialists: loadswap, loadswap2, ...
TEMPERATURES = (0.0, 0.5, 0.8, 1.0, 1.3)  # greedy included: every sampling path is exercised
STREAM_TIMEOUT = httpx.Timeout(120.0, connect=10.0)  # a stalled stream ends as `cut`, not a hang
ROLES = ("supervisor", "registry", "training", "inference", "inference worker", "gateway")
EXCERPT_LINES = 60  # log lines shown per cut stream
EXCERPTS = 5  # cut streams whose log lines are shown
SPLITLINES_ONLY = "\x85\u2028\u2029"  # line breaks to str.splitlines, not to SSE


@dataclass
class Stream:
    """One request of a client. Times are monotonic seconds; `log_from`/`log_to` are the stack
    log's size when it started and ended, so a cut stream's log lines can be found again."""

    client: int
    start: float
    end: float
    first: float | None
    tokens: int
    outcome: str  # "completed" | "cut" | "429"
    detail: str = ""  # why it was cut, or the finish reason
    version: str = ""  # the version that served it (from the `done` event)
    usage_tokens: int | None = None  # completion_tokens of `done`: must equal `tokens`
    log_from: int = 0
    log_to: int = 0
    odd_separators: int = 0  # events whose data has a SPLITLINES_ONLY character (sse_lines)


@dataclass
class Swap:
    """One operation of a hot swap: an add or a delete, timed from the call to its answer."""

    operation: str  # "add" | "delete"
    name: str
    start: float
    seconds: float
    status: int
    version_before: str | None
    version_after: str | None
    replicas_after: list[dict] = field(default_factory=list)
    detail: str = ""


# ---- the home and the stack's processes ----------------------------------------------------


def synthetic_documents(words: list[str], n: int, rng: random.Random) -> list[str]:
    """`n` documents of 40-120 words drawn from `words` (as the tests' tiny corpora)."""
    return [
        " ".join(rng.choice(words) for _ in range(rng.randint(40, 120))) + "." for _ in range(n)
    ]


def write_corpus(data_dir: Path, name: str, docs: list[str]) -> None:
    folder = data_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.txt").write_text(DOCUMENT_SEPARATOR.join(docs) + "\n", encoding="utf-8")


def seed_home(home: Path, documents: int, seed: int) -> bool:
    """Give a home with neither a model nor a general corpus the synthetic corpora, so that the
    first start trains in seconds instead of building the demo corpus. True if it wrote them."""
    data = home / "data"
    if current_version(home / "artifacts" / "models") is not None or (data / GENERAL).exists():
        return False
    for name, words in WORDS.items():
        write_corpus(
            data, name, synthetic_documents(words, documents, random.Random(f"{seed}{name}"))
        )
    return True


def served_profile(home: Path, default: str) -> str:
    """The profile of the home's current model, else `default`: the stack must not be started
    with a profile that disagrees with the model it serves (read from config.json, so that no
    weights are loaded here)."""
    models = home / "artifacts" / "models"
    if (version := current_version(models)) is None:
        return default
    return json.loads((models / version / "config.json").read_text())["profile"]["name"]


def proc_children(parent: int) -> list[tuple[int, bytes]]:
    """(pid, command line) of the processes whose parent is `parent`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (proc / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
        if ppid == parent:
            found.append((int(proc.name), command))
    return found


def stack_pids(home: Path, supervisor: int, timeout: float = 60.0) -> dict[str, int]:
    """Role -> pid of every stack process. The servers' pids are the ones `sma up` records in
    state/stack.json (checked to be this supervisor's record, not a stale one from an earlier
    stack in the same home); the decode worker is the inference server's child started by
    multiprocessing's spawn (not its resource tracker). Waits for the worker: it is started
    once the server has a version to load."""
    deadline = time.monotonic() + timeout
    record: dict = {}
    while time.monotonic() < deadline:
        try:
            record = json.loads((home / "state" / "stack.json").read_text())
        except (OSError, ValueError):
            record = {}
        if record.get("supervisor") == supervisor:
            children: dict[str, int] = record["children"]
            workers = [
                pid
                for pid, command in proc_children(children["inference"])
                if b"spawn_main" in command and b"resource_tracker" not in command
            ]
            if len(workers) == 1:
                found = {"supervisor": supervisor, **children, "inference worker": workers[0]}
                return {role: found[role] for role in ROLES}  # the tables' order
        time.sleep(0.5)
    raise RuntimeError(f"no stack.json of supervisor {supervisor} with one inference worker")


def memory(pid: int) -> dict[str, int | None]:
    """VmRSS and VmHWM (the peak RSS) of `pid` in KiB; None for a process that is gone."""
    found: dict[str, int | None] = {"rss_kib": None, "hwm_kib": None}
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found["rss_kib" if key == "VmRSS" else "hwm_kib"] = int(value.split()[0])
    return found


def snapshot(pids: dict[str, int]) -> dict[str, dict]:
    return {role: {"pid": pid, **memory(pid)} for role, pid in pids.items()}


def log_size(log: Path) -> int:
    try:
        return log.stat().st_size
    except OSError:
        return 0


# ---- the clients ---------------------------------------------------------------------------


def random_prompt(rng: random.Random) -> str:
    """1-12 words from every domain's vocabulary, so the gate routes to every expert."""
    words = [w for ws in WORDS.values() for w in ws]
    return " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))


def stream_once(
    http: httpx.Client, client: int, rng: random.Random, tokens: int, log: Path
) -> Stream:
    """One `POST /generate/stream`, every event read as it arrives. The gateway sends `token`
    events, then `done` (or, after a first token, `error`); an error before the first token is
    a plain HTTP status."""
    body = {
        "prompt": random_prompt(rng),
        "max_new_tokens": tokens,
        "temperature": rng.choice(TEMPERATURES),
        "seed": rng.randrange(2**31),
    }
    stream = Stream(client, time.monotonic(), 0.0, None, 0, "cut", log_from=log_size(log))
    try:
        with http.stream("POST", "/generate/stream", json=body) as response:
            if response.status_code != 200:
                text = response.read().decode(errors="replace")[:300]
                stream.outcome = "429" if response.status_code == 429 else "cut"
                stream.detail = f"HTTP {response.status_code}: {text}"
            else:
                read_events(response, stream)
    except httpx.HTTPError as exc:  # refused, reset, or stalled past STREAM_TIMEOUT
        stream.outcome, stream.detail = "cut", f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # an event this reader cannot parse: counted, never a dead client
        stream.outcome, stream.detail = "cut", f"unreadable stream: {type(exc).__name__}: {exc}"
    stream.end = time.monotonic()
    stream.log_to = log_size(log)
    return stream


def sse_lines(response: httpx.Response) -> Iterator[str]:
    """The lines of an SSE body, split as the SSE spec says: at LF (and CRLF) only. Not httpx's
    `iter_lines`, which splits like `str.splitlines`, also at U+0085, U+2028 and U+2029: the
    gateway's JSON (`ensure_ascii=False`) carries those raw when a token's text has one, and
    that reader would cut the `data:` line in two. Whole lines are decoded, so a character
    split across two chunks is not damaged."""
    pending = b""
    for chunk in response.iter_bytes():
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            yield line.removesuffix(b"\r").decode()
    if pending:
        yield pending.removesuffix(b"\r").decode()


def read_events(response: httpx.Response, stream: Stream) -> None:
    """Fill `stream` from an SSE response: tokens, first-token time, and how it ended."""
    name = ""
    for line in sse_lines(response):
        if line.startswith("event: "):
            name = line[7:]
            continue
        if not line.startswith("data: "):
            continue
        if any(c in line for c in SPLITLINES_ONLY):
            stream.odd_separators += 1
        data = json.loads(line[6:])
        if name == "token":
            stream.first = stream.first or time.monotonic()
            stream.tokens += len(data["token_ids"])
        elif name == "done":
            finish = data.get("finish_reason")
            stream.version = data.get("version", "")
            stream.usage_tokens = data.get("usage", {}).get("completion_tokens")
            # nobody here cancels a stream: a `cancelled` finish is the server cutting it
            stream.outcome = "cut" if finish == "cancelled" else "completed"
            stream.detail = f"finish {finish}"
            return
        elif name == "error":
            stream.detail = f"error event: {data}"
            return
        else:
            stream.detail = f"unknown event {name!r}: {data}"
            return
    stream.detail = f"ended after {stream.tokens} tokens without a done event"


def client_loop(
    index: int,
    url: str,
    args: argparse.Namespace,
    stop: threading.Event,
    log: Path,
    out: list[Stream],
) -> None:
    """Stream back to back until `stop`; each client its own connection and random sequence
    (seeded, so a run's requests can be repeated)."""
    rng = random.Random(f"{args.seed}-{index}")
    with httpx.Client(base_url=url, timeout=STREAM_TIMEOUT) as http:
        while not stop.is_set():
            stream = stream_once(http, index, rng, args.tokens, log)
            out.append(stream)
            if stream.outcome == "429":
                time.sleep(0.2)  # back off as a polite client would; a 429 is not a failure


# ---- the swaps -----------------------------------------------------------------------------


def serving(http: httpx.Client) -> dict:
    """/health, or {} when it does not answer: a gateway down mid-run is reported through the
    streams and the pids, not as a crash of this command that would lose the figures."""
    try:
        return http.get("/health", timeout=30.0).raise_for_status().json()
    except (httpx.HTTPError, ValueError):
        return {}


def timed(http: httpx.Client, operation: str, name: str) -> Swap:
    """One add or delete, waited for (the routes block until the operation ends: `wait=true` is
    their default), with the serving version on each side."""
    before = serving(http).get("serving_version")
    start = time.monotonic()
    try:
        if operation == "add":
            reply = http.post("/specialists", json={"name": name}, timeout=None)
        else:
            reply = http.delete(f"/specialists/{name}", timeout=None)
        status, detail = reply.status_code, "" if reply.status_code == 200 else reply.text[:500]
    except httpx.HTTPError as exc:  # status 0: no answer at all
        status, detail = 0, f"{type(exc).__name__}: {exc}"
    seconds = time.monotonic() - start
    after = serving(http)
    return Swap(
        operation=operation,
        name=name,
        start=start,
        seconds=seconds,
        status=status,
        version_before=before,
        version_after=after.get("serving_version"),
        replicas_after=after.get("replicas", []),
        detail=detail,
    )


def run_swaps(
    url: str, data_dir: Path, args: argparse.Namespace, begin: float, swaps: list[Swap]
) -> None:
    """`args.swaps` swaps spread over the run: swap i adds at 10% of its share of the duration
    and deletes at 55% (or at once, if the add took longer), so that each operation, and the
    streams that straddle it, happen while every client is streaming."""
    share = args.duration / max(1, args.swaps)
    rng = random.Random(f"{args.seed}-swaps")
    names: list[str] = []
    with httpx.Client(base_url=url, timeout=60.0) as http:
        served = http.get("/specialists").raise_for_status().json()
        for i in range(args.swaps):
            name = fresh_name(SWAP_BASE, data_dir, served + names)
            names.append(name)
            write_corpus(data_dir, name, synthetic_documents(SWAP_WORDS, args.documents, rng))
            time.sleep(max(0.0, begin + share * (i + 0.1) - time.monotonic()))
            swaps.append(add := timed(http, "add", name))
            if add.status != 200:
                continue  # nothing to delete; the failure is reported
            time.sleep(max(0.0, begin + share * (i + 0.55) - time.monotonic()))
            swaps.append(timed(http, "delete", name))


# ---- the run -------------------------------------------------------------------------------


def load(url: str, home: Path, args: argparse.Namespace, log: Path) -> tuple[list, list, float]:
    """Clients for `args.duration` seconds, or until the last swap has answered if later (a
    swap is only a swap under load). Returns the streams, the swaps and the wall time."""
    stop = threading.Event()
    per_client: list[list[Stream]] = [[] for _ in range(args.clients)]
    threads = [
        threading.Thread(target=client_loop, args=(i, url, args, stop, log, per_client[i]))
        for i in range(args.clients)
    ]
    begin = time.monotonic()
    for thread in threads:
        thread.start()
    swaps: list[Swap] = []
    try:
        run_swaps(url, home / "data", args, begin, swaps)
        time.sleep(max(0.0, begin + args.duration - time.monotonic()))
    finally:  # the clients stop starting streams; those running end as they would
        stop.set()
        for thread in threads:
            thread.join()
    elapsed = time.monotonic() - begin
    return [s for mine in per_client for s in mine], swaps, elapsed


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (None without values): p99 of few samples is their maximum."""
    if not values:
        return None
    ranked = sorted(values)
    return ranked[max(0, math.ceil(p / 100 * len(ranked)) - 1)]


def summarize(streams: list[Stream], swaps: list[Swap], elapsed: float) -> dict:
    outcomes = Counter(s.outcome for s in streams)
    ttft = [s.first - s.start for s in streams if s.first is not None]
    latency = [s.end - s.start for s in streams if s.outcome == "completed"]
    in_flight = []
    for swap in swaps:  # streams that overlapped the operation, and how they ended
        during = [s for s in streams if s.start < swap.start + swap.seconds and s.end > swap.start]
        in_flight.append(dict(Counter(s.outcome for s in during)))
    return {
        "elapsed_s": elapsed,
        "started": len(streams),
        "completed": outcomes["completed"],
        "cut": outcomes["cut"],
        "rejected_429": outcomes["429"],
        "tokens": sum(s.tokens for s in streams),
        "tokens_per_s": sum(s.tokens for s in streams) / elapsed,
        "completed_per_s": outcomes["completed"] / elapsed,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "latency_p50_s": percentile(latency, 50),
        "latency_p99_s": percentile(latency, 99),
        "mean_tokens_per_completed": (
            statistics.fmean(s.tokens for s in streams if s.outcome == "completed")
            if outcomes["completed"]
            else None
        ),
        # a `done` whose usage disagrees with the tokens streamed: tokens lost on the way
        "usage_mismatches": sum(
            1 for s in streams if s.usage_tokens is not None and s.usage_tokens != s.tokens
        ),
        # events carrying a character that a splitlines-based reader (httpx's iter_lines)
        # takes for a line break: such a reader would have failed on these streams
        "events_with_splitlines_breaks": sum(s.odd_separators for s in streams),
        "streams_with_splitlines_breaks": sum(1 for s in streams if s.odd_separators),
        "versions_served": dict(Counter(s.version for s in streams if s.version)),
        "streams_during_swaps": in_flight,
    }


def excerpts(streams: list[Stream], log: Path) -> list[dict]:
    """For the first EXCERPTS cut streams: the stack log lines written while each ran (from
    the log's size when it started to its size when it ended, plus what followed within 2 KB),
    at most EXCERPT_LINES of them."""
    found = []
    try:
        text = log.read_bytes()
    except OSError:
        return found
    for s in [s for s in streams if s.outcome == "cut"][:EXCERPTS]:
        piece = text[s.log_from : s.log_to + 2048].decode(errors="replace").splitlines()
        found.append({"client": s.client, "detail": s.detail, "lines": piece[-EXCERPT_LINES:]})
    return found


def problems(report: dict) -> list[str]:
    """Why the run fails as a check (the exit code is 1 when this is not empty)."""
    found = []
    streams = report["streams"]
    if streams["cut"]:
        found.append(f"{streams['cut']} stream(s) cut short")
    if not streams["completed"]:
        found.append("no stream completed")
    if streams["usage_mismatches"]:
        found.append(f"{streams['usage_mismatches']} stream(s) whose usage disagrees with tokens")
    for swap in report["swaps"]:
        if swap["status"] != 200:
            found.append(f"{swap['operation']} {swap['name']}: HTTP {swap['status']}")
    if len(report["swaps"]) < 2 * report["config"]["swaps"]:
        found.append(f"{len(report['swaps'])} swap operations of {2 * report['config']['swaps']}")
    for role, after in report["memory"]["after"].items():
        before = report["memory"]["before"][role]
        if after["pid"] != before["pid"] or after["rss_kib"] is None:
            found.append(f"{role} was restarted or is gone (pid {before['pid']} -> {after['pid']})")
    return found


def measure(args: argparse.Namespace, home: Path) -> dict:
    """Start the stack, load it while swapping, stop it: the raw figures."""
    seeded = seed_home(home, args.documents, args.seed)
    profile = served_profile(home, args.profile)
    port = free_port_block()
    url = f"http://127.0.0.1:{port}"
    log = home / "loadrun.log"
    load_before = os.getloadavg()[0]  # other work on the machine skews the rates: say how much
    process = start_stack(
        home, profile, "cpu", port, args.threads, log, args.train_threads, args.max_drift
    )
    started = time.monotonic()
    try:
        with httpx.Client(base_url=url, timeout=60.0) as http:
            health = wait_ready(http, process, log)
        ready_s = time.monotonic() - started
        pids = stack_pids(home, process.pid)
        before = snapshot(pids)
        streams, swaps, elapsed = load(url, home, args, log)
        time.sleep(1.0)  # the last streams' buffers are released; the stack is idle again
        # the servers' pids as the supervisor records them now: a restart shows as a new pid
        try:
            now = stack_pids(home, process.pid, timeout=10.0)
        except RuntimeError:
            now = {role: pids[role] for role in pids if memory(pids[role])["rss_kib"] is not None}
        after = snapshot({role: now.get(role, -1) for role in pids})
        with httpx.Client(base_url=url, timeout=60.0) as http:
            final = serving(http)
    finally:
        stop_stack(process)
    return {
        "config": {
            "home": str(home),
            "seeded_corpora": seeded,
            "profile": profile,
            "clients": args.clients,
            "duration_s": args.duration,
            "swaps": args.swaps,
            "tokens": args.tokens,
            "threads": args.threads,
            "train_threads": args.train_threads,
            "seed": args.seed,
            "cpus": os.cpu_count(),
            "loadavg_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        },
        "ready_s": ready_s,
        "version_at_start": health.get("serving_version"),
        "version_at_end": final.get("serving_version"),
        "model": health.get("model"),
        "streams": summarize(streams, swaps, elapsed),
        "swaps": [asdict(s) for s in swaps],
        "memory": {"before": before, "after": after},
        "cut_log": excerpts(streams, log),
        "log": str(log),
        "raw_streams": [asdict(s) for s in streams],
    }


# ---- the report ----------------------------------------------------------------------------


def mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f}"


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"


def print_report(report: dict) -> None:
    c, s = report["config"], report["streams"]
    print(
        f"Load run: {c['clients']} clients x {s['elapsed_s']:.0f} s, {c['tokens']} new tokens "
        f"per request, {c['swaps']} hot swaps; profile {c['profile']}, {c['cpus']} CPUs "
        f"(load average {c['loadavg_1m_before_after'][0]} before, "
        f"{c['loadavg_1m_before_after'][1]} after); "
        f"stack ready in {report['ready_s']:.0f} s; served {report['version_at_start']} at the "
        f"start, {report['version_at_end']} at the end"
    )
    print()
    print("| figure | value |")
    print("|---|---|")
    versions = ", ".join(f"{v} ({n})" for v, n in sorted(s["versions_served"].items()))
    odd = f"{s['events_with_splitlines_breaks']} in {s['streams_with_splitlines_breaks']} streams"
    rows = [
        ("streams started", s["started"]),
        ("streams completed", s["completed"]),
        ("streams cut short", s["cut"]),
        ("429 (limit reached)", s["rejected_429"]),
        ("tokens streamed", s["tokens"]),
        ("tokens/s (all clients)", f"{s['tokens_per_s']:.1f}"),
        ("completed streams/s", f"{s['completed_per_s']:.2f}"),
        ("time to first token p50", ms(s["ttft_p50_s"])),
        ("time to first token p99", ms(s["ttft_p99_s"])),
        ("stream latency p50", ms(s["latency_p50_s"])),
        ("stream latency p99", ms(s["latency_p99_s"])),
        ("versions that served completed streams", versions or "-"),
        ("events with U+0085/U+2028/U+2029 in their data", odd),
    ]
    for name, value in rows:
        print(f"| {name} | {value} |")
    print()
    if report["swaps"]:
        print(
            "| hot swap | specialist | took | HTTP | serving before | serving after "
            "| streams meanwhile (completed / cut / 429) |"
        )
        print("|---|---|---|---|---|---|---|")
        for swap, during in zip(report["swaps"], s["streams_during_swaps"], strict=True):
            meanwhile = "/".join(str(during.get(k, 0)) for k in ("completed", "cut", "429"))
            print(
                f"| {swap['operation']} | {swap['name']} | {swap['seconds']:.1f} s | "
                f"{swap['status']} | {swap['version_before']} | {swap['version_after']} | "
                f"{meanwhile} |"
            )
        print()
    print("| process | pid | RSS before (MiB) | RSS after (MiB) | delta (MiB) | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    before, after = report["memory"]["before"], report["memory"]["after"]
    for role in before:
        b, a = before[role], after[role]
        delta = "-"
        if a["rss_kib"] is not None and b["rss_kib"] is not None:
            delta = f"{(a['rss_kib'] - b['rss_kib']) / 1024:+.1f}"
        pid = str(b["pid"]) if a["pid"] == b["pid"] else f"{b['pid']} -> {a['pid']}"
        print(
            f"| {role} | {pid} | {mib(b['rss_kib'])} | {mib(a['rss_kib'])} | {delta} | "
            f"{mib(a['hwm_kib'])} |"
        )
    total_b = sum(v["rss_kib"] or 0 for v in before.values())
    total_a = sum(v["rss_kib"] or 0 for v in after.values())
    print(f"| all | | {mib(total_b)} | {mib(total_a)} | {(total_a - total_b) / 1024:+.1f} | |")
    print()
    for found in report["problems"]:
        print(f"PROBLEM: {found}")
    for excerpt in report["cut_log"]:
        print(f"\ncut stream of client {excerpt['client']}: {excerpt['detail']}")
        print("stack log meanwhile:")
        for line in excerpt["lines"]:
            print(f"    {line}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, help="default: a temporary home with tiny corpora")
    parser.add_argument("--profile", default="tiny", help="for a first start (default tiny)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent streaming clients")
    parser.add_argument("--duration", type=float, default=280.0, help="seconds of load")
    parser.add_argument("--swaps", type=int, default=2, help="add + delete pairs during the load")
    parser.add_argument("--tokens", type=int, default=32, help="max_new_tokens per request")
    parser.add_argument("--documents", type=int, default=40, help="per synthetic corpus")
    parser.add_argument(
        "--threads", type=int, default=0, help="SMA_THREADS of the stack; 0 = its default"
    )
    parser.add_argument(
        "--train-threads", type=int, default=0, help="SMA_TRAIN_THREADS; 0 = all cores"
    )
    parser.add_argument(
        "--max-drift",
        type=float,
        default=None,
        metavar="PERCENT",
        help="the stack's SMA_MAX_DRIFT for the hot swaps' adds (default: its own)",
    )
    parser.add_argument("--seed", type=int, default=0, help="prompts, temperatures, corpora")
    parser.add_argument("--json", type=Path, help="write the raw figures (every stream) here")
    parser.add_argument("--keep", action="store_true", help="keep a temporary home after all")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.swaps < 0 or args.duration <= 0:
        parser.error("--clients >= 1, --swaps >= 0 and --duration > 0")

    temporary = args.home is None
    home = (Path(tempfile.mkdtemp(prefix="sma-loadrun-")) if temporary else args.home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    report = measure(args, home)
    report["problems"] = problems(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
    if temporary and not report["problems"] and not args.keep:
        shutil.rmtree(home, ignore_errors=True)
    else:  # a failed run's home is kept: its log, state and versions explain the failure
        print(f"home: {home} (stack log: {report['log']})")
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
