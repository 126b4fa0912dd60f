"""Hostile callers and a hostile host, end to end: sampling values at the very edge of what the
REST schema admits, streamed in the same batch as ordinary requests, and a disk that refuses
the model version an add writes.

The first is the REST twin of the inference service's gRPC poison-mix test: JSON reaches
values gRPC cannot carry (5e-324 is 0 in the wire's float32), so the gateway's own translation
is under test too. The second stands in for a full disk with RLIMIT_FSIZE, which needs no root:
the training server's job processes inherit it, and Python ignores SIGXFSZ, so a write past it
fails with EFBIG much as one to a full disk fails with ENOSPC.
"""

from __future__ import annotations

import json
import random
import resource
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from shiftable_lib.sampling import MAX_PROMPT_CHARS, MAX_TEMPERATURE, MAX_TOP_K
from tests.conftest import synthetic_documents, write_domain
from tests.e2e.conftest import Stack, job_processes, sse_events, wait_for

pytestmark = pytest.mark.slow

TOKENS = 40  # per stream (ignore_eos): long enough for the eight to share decode steps
STREAMS = 8  # at once, the stack's SMA_MAX_BATCH: one batch holds every one of them

# The most extreme bodies the schema admits. Float32 (the wire) makes 5e-324 and -0.0 a zero
# temperature (greedy) and 1e-40 a subnormal; 5e-324 as top_p would be a zero there, which the
# inference service refuses, so the gateway must send the smallest positive float32 instead.
POISON: list[dict] = [
    {"temperature": 1e-40},
    {"temperature": 5e-324, "top_k": 3},
    {"temperature": -0.0},
    {"temperature": 1e-30, "top_p": 1e-30},
    {"temperature": 1.0, "top_p": 5e-324},
    {"temperature": MAX_TEMPERATURE, "top_k": MAX_TOP_K},
    {"temperature": MAX_TEMPERATURE, "seed": 2**63 - 1, "routing": {"mode": "topk", "k": 64}},
    {"temperature": 0.7, "stop": ["\u0000" * 256] * 16},  # every stop string at its limit
    {"prompt": ("tensor gradient " * 7000)[:MAX_PROMPT_CHARS]},  # the longest prompt
]

# Bodies the schema must refuse (422) before anything runs: raw JSON, for the NaN and
# Infinity literals json.dumps would not write; the field the refusal must name.
REFUSED: list[tuple[str, str]] = [
    ('{"prompt": "x", "temperature": NaN}', "temperature"),
    ('{"prompt": "x", "temperature": Infinity}', "temperature"),
    ('{"prompt": "x", "temperature": 1e999}', "temperature"),  # overflows to inf
    ('{"prompt": "x", "temperature": -1e-300}', "temperature"),
    ('{"prompt": "x", "temperature": 100.00000000001}', "temperature"),
    ('{"prompt": "x", "top_p": 0}', "top_p"),
    ('{"prompt": "x", "top_p": -0.0}', "top_p"),
    ('{"prompt": "x", "top_p": NaN}', "top_p"),
    ('{"prompt": "x", "top_p": 1.0000000001}', "top_p"),
    ('{"prompt": "x", "top_k": -1}', "top_k"),
    ('{"prompt": "x", "top_k": 1000001}', "top_k"),
    ('{"prompt": "x", "seed": -1}', "seed"),
    ('{"prompt": "x", "seed": 9223372036854775808}', "seed"),
    ('{"prompt": "x", "max_new_tokens": 0}', "max_new_tokens"),
    ('{"prompt": "x", "routing": {"mode": "topk", "k": 65}}', "k"),
    ('{"prompt": "x", "stop": [""]}', "stop"),
    (json.dumps({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}), "prompt"),
]


def stream(stack: Stack, body: dict, start: threading.Barrier) -> tuple[int, list, float, float]:
    """One /generate/stream call on its own connection: status, events, and when its first and
    last events came (to show the calls overlapped)."""
    with httpx.Client(base_url=stack.url, timeout=60.0) as client:
        start.wait(timeout=30)
        with client.stream("POST", "/generate/stream", json=body) as response:
            if response.status_code != 200:
                response.read()
                return response.status_code, [("http", response.json())], 0.0, 0.0
            events, first = [], 0.0
            for event in sse_events(response):
                first = first or time.monotonic()
                events.append(event)
            return 200, events, first, time.monotonic()


def snapshot(stack: Stack) -> dict:
    """What a refused request must leave alone."""
    health = stack.health() or {}
    return {
        "serving": health.get("serving_version"),
        "streams": (health["model"]["active_streams"], health["model"]["queued"]),
        "versions": sorted(p.name for p in (stack.home / "artifacts" / "models").iterdir()),
        "operations": [op["id"] for op in stack.http.get("/operations").json()],
        "specialists": stack.http.get("/v1/specialists").json(),
    }


def test_extreme_sampling_values_over_rest_hurt_no_other_stream(stack: Stack) -> None:
    """Three rounds of eight concurrent streams, four poisoned with the schema's extremes and
    four ordinary, shuffled so that each lands next to the other kind in the batch: all eight
    end with a `done` and exactly their tokens. Values outside the schema get a 422 naming
    the field and change nothing."""
    rng = random.Random(0)
    base = {"prompt": "the list", "max_new_tokens": TOKENS, "ignore_eos": True}
    normal = [{"temperature": 0.0}, {"temperature": 0.0}, {"seed": 1}, {"temperature": 0.8}]
    for round_ in range(3):
        poison = [POISON[(4 * round_ + i) % len(POISON)] for i in range(4)]
        mix = [("poison", f) for f in poison] + [("normal", f) for f in normal]
        rng.shuffle(mix)
        start = threading.Barrier(STREAMS)
        with ThreadPoolExecutor(STREAMS) as pool:
            results = list(pool.map(lambda m, b=start: stream(stack, {**base, **m[1]}, b), mix))
        spans: dict[str, list[tuple[float, float]]] = {"poison": [], "normal": []}
        for (kind, fields), (status, events, first, last) in zip(mix, results, strict=True):
            shown = {k: v for k, v in fields.items() if k != "prompt"}
            assert status == 200, (shown, events)
            names = [name for name, _ in events]
            assert names == ["token"] * (len(names) - 1) + ["done"], (shown, events[-1])
            done = events[-1][1]
            tokens = [data for name, data in events if name == "token"]
            assert done["finish_reason"] == "length", (shown, done)
            assert sum(len(t["token_ids"]) for t in tokens) == TOKENS, shown
            assert done["usage"]["completion_tokens"] == TOKENS, shown
            assert "".join(t["text"] for t in tokens) == done["completion"], shown
            spans[kind].append((first, last))
        # a mix indeed: some poisoned stream was decoding while an ordinary one was
        assert any(
            p0 < n1 and n0 < p1 for p0, p1 in spans["poison"] for n0, n1 in spans["normal"]
        ), (round_, spans)

    # every stream of the rounds lets go of its slot (the figures lag the streams a little)
    before = wait_for(lambda: (s := snapshot(stack))["streams"] == (0, 0) and s, timeout=10)
    for raw, field in REFUSED:
        reply = stack.http.post(
            "/generate/stream", content=raw.encode(), headers={"content-type": "application/json"}
        )
        assert reply.status_code == 422, (raw[:80], reply.text[:300])
        detail = reply.json()["detail"]
        assert any(field in map(str, d["loc"]) for d in detail), (raw[:80], detail)
        assert len(reply.content) < 2000  # the 100 001-character prompt is not echoed
    assert snapshot(stack) == before
    status, events, _, _ = stream(stack, base, threading.Barrier(1))
    assert status == 200 and events[-1][0] == "done"
    assert events[-1][1]["usage"]["completion_tokens"] == TOKENS


FILE_LIMIT = 16 * 1024  # bytes: over a tokenizer.json (~5 KB), far under any model.safetensors


def job_child(training: int) -> tuple[int, int] | None:
    """(pid, file size limit) of the training server's job process, once its Python has started
    (it ignores SIGXFSZ from then on, so a write past the limit fails rather than kills)."""
    for pid in job_processes(training):
        try:
            limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:  # gone already
            continue
        ignored = int(next(line.split()[1] for line in status if line.startswith("SigIgn:")), 16)
        if ignored >> (signal.SIGXFSZ - 1) & 1:
            soft = next(line for line in limits if line.startswith("Max file size")).split()[3]
            return pid, resource.RLIM_INFINITY if soft == "unlimited" else int(soft)
    return None


def finished(stack: Stack, op_id: str) -> dict | None:
    op = stack.http.get(f"/operations/{op_id}", timeout=5).json()
    return op if op["state"] in ("succeeded", "failed", "cancelled") else None


def test_an_add_whose_version_cannot_be_written_fails_cleanly_and_can_be_retried(
    stack: Stack,
) -> None:
    """The disk refuses the new version's weights (a file size limit on the training server,
    inherited by the job process it spawns): the add fails saying the write failed, the model
    that served serves on, no version or temporary is left under artifacts/models, and the
    specialist is recorded as failed, not served. Once the disk takes writes again, the same
    add is simply asked for again and succeeds, in a fresh job process without the limit."""
    models = stack.home / "artifacts" / "models"
    weights = {p.parent.name: p.stat().st_size for p in models.glob("v*/model.safetensors")}
    assert weights and min(weights.values()) > 8 * FILE_LIMIT, weights
    health = stack.health()
    serving, loaded = health["serving_version"], health["loaded_version"]
    names = stack.http.get("/specialists").json()
    listing = sorted(p.name for p in models.iterdir())  # hidden names too (.tmp-*)
    current = (models / "CURRENT").read_text()
    training = stack.pids()["training"]
    write_domain(stack.home / "data", "nospace", synthetic_documents("ds", 30, seed=31))

    original = resource.prlimit(training, resource.RLIMIT_FSIZE)
    resource.prlimit(training, resource.RLIMIT_FSIZE, (FILE_LIMIT, original[1]))
    try:
        started = time.monotonic()
        reply = stack.http.post("/specialists?wait=false", json={"name": "nospace"})
        assert reply.status_code == 202, reply.text
        op_id = reply.json()["id"]
        child, limit = wait_for(lambda: job_child(training), timeout=60, every=0.02)
        assert limit == FILE_LIMIT  # spawned after the limit was set: it has it too
        final = wait_for(lambda: finished(stack, op_id), timeout=120)
        took = time.monotonic() - started
    finally:
        resource.prlimit(training, resource.RLIMIT_FSIZE, original)

    # the write failed with EFBIG (not a SIGXFSZ kill), and the error says so
    assert final["state"] == "failed" and final["version"] is None, final
    assert final["error"].startswith(f"training job {final['job_id']} failed: "), final
    assert "File too large (os error 27)" in final["error"], final
    assert "serializ" in final["error"], final  # writing the weights, not reading the corpus
    assert took < 60, took
    # nothing half-written: save_version's .tmp-* folder went with the failure
    assert sorted(p.name for p in models.iterdir()) == listing
    assert (models / "CURRENT").read_text() == current
    assert not list((stack.home / "artifacts").rglob("*tmp*"))
    # the old model serves on, and the training server lived through it
    health = stack.health()
    assert (health["serving_version"], health["loaded_version"]) == (serving, loaded)
    assert health["services"]["training"]["status"] == "SERVING"
    assert stack.pids()["training"] == training
    reply = stack.http.post("/generate", json={"prompt": "the", "max_new_tokens": 3})
    assert reply.status_code == 200 and reply.json()["version"] == serving, reply.text
    # recorded as a failed add, with its reason; not served
    assert stack.http.get("/specialists").json() == names
    detail = {s["name"]: s for s in stack.http.get("/v1/specialists").json()}
    assert detail["nospace"]["state"] == "failed", detail["nospace"]
    assert detail["nospace"]["error"] == final["error"]

    # the disk takes writes again: the same add, asked again, replaces the failed record
    reply = stack.http.post("/specialists?wait=false", json={"name": "nospace"})
    assert reply.status_code == 202, reply.text
    retry_id = reply.json()["id"]
    pid, limit = wait_for(lambda: job_child(training), timeout=60, every=0.02)
    assert pid != child and limit == resource.RLIM_INFINITY  # a fresh process, limit lifted
    final = wait_for(lambda: finished(stack, retry_id), timeout=120)
    assert final["state"] == "succeeded", final
    new = final["version"]
    assert sorted(p.name for p in models.iterdir()) == sorted([*listing, new])
    assert stack.wait_ready(60)["serving_version"] == new
    assert sorted(stack.http.get("/specialists").json()) == sorted([*names, "nospace"])
    detail = {s["name"]: s for s in stack.http.get("/v1/specialists").json()}
    assert detail["nospace"]["state"] == "ready" and detail["nospace"]["error"] is None
    out = stack.http.post("/generate", json={"prompt": "numpy array", "max_new_tokens": 3})
    assert out.status_code == 200 and "nospace" in out.json()["active_weights"], out.text
