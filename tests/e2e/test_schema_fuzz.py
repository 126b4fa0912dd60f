"""Schema fuzzing: schemathesis over the gateway's own OpenAPI schema, against a real stack.

Every operation that /openapi.json lists gets a fixed number of generated requests (Hypothesis,
derandomized: the same requests on every run; first valid bodies and parameters, then invalid
ones), sent to the running gateway. No response may be a 5xx, and each must have a status code
and content type the schema documents for the operation and match the schema declared for it.
Requests go to http://127.0.0.1:PORT, a Host the gateway answers to; the schema declares no
header parameters, so none is generated (a Host not its own would get a 400).

Left out: the routes that change the model (gateway.app.ADMIN_ROUTES), since the stack is
shared by the whole module and a generated request could hit a real name:
- `POST /specialists` trains and publishes a specialist (minutes here; a generated name with a
  corpus, `ds` say, would retrain it);
- `DELETE /specialists/{name}` could delete `ds` or `dl`;
- `POST /versions/{version_id}/rollback` could serve an older version.
tests/e2e/test_stack.py checks how the first two refuse bad input. `POST /operations/{op_id}/cancel`
is fuzzed: nothing runs, so it answers 404 or 409.

Generation is fuzzed like the rest: the schema lets `max_new_tokens` be up to 100 000, and the
server refuses (400) any at or over the model's context (64 tokens in the tiny profile), so no
request generates for long.

The SSE routes (`/generate/stream`, `/operations/{op_id}/events`) declare `text/event-stream`
without a schema (an event stream is not one JSON document, and OpenAPI 3.1 has no way to
describe its events), so schemathesis checks their status and content type only; this test
checks the rest of a 200 itself: every event's data is JSON, and the stream ends with its last
event (`done`, or the operation) rather than an `error` event or nothing.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.app import ADMIN_ROUTES

pytestmark = pytest.mark.slow

FUZZED_ADMIN = {"POST /operations/{op_id}/cancel"}  # changes nothing when nothing runs
EXAMPLES = {GenerationMode.POSITIVE: 30, GenerationMode.NEGATIVE: 15}  # per operation
SSE_OPERATIONS = {"POST /generate/stream", "GET /operations/{op_id}/events"}
REQUEST_TIMEOUT = 60.0
MAX_EVENTS = 1000  # read an event stream to its end (schemathesis stops at 20 by default)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def changes_model(label: str) -> bool:
    method, path = label.split(" ", 1)
    admin = any(method == m and r.fullmatch(path) for m, r in ADMIN_ROUTES)
    return admin and label not in FUZZED_ADMIN


def sse_problem(response: schemathesis.Response) -> str | None:
    """What is wrong with a 200 event stream, or None."""
    media = response.headers.get("content-type", [""])[0]
    if not media.startswith("text/event-stream"):
        return f"content type {media!r}, not text/event-stream"
    if response.stream_cut_short:
        return f"the stream was cut short after {MAX_EVENTS} events or {REQUEST_TIMEOUT} s"
    events = []
    for block in response.content.decode().split("\n\n"):
        if not block.strip():
            continue
        try:
            fields = dict(line.split(": ", 1) for line in block.splitlines())
            events.append((fields["event"], json.loads(fields["data"])))
        except (KeyError, ValueError) as exc:
            return f"malformed event {block[:200]!r}: {exc!r}"
    if not events:
        return "an empty event stream"
    name, data = events[-1]
    if name not in ("done", "operation"):
        return f"the stream ended with {name!r}: {data}"
    return None


def test_schema_fuzz(stack) -> None:
    config = schemathesis.Config.from_dict(
        {
            "max-stream-events": MAX_EVENTS,
            "output": {"sanitization": {"enabled": False}},  # `max_new_tokens` is no secret
        }
    )
    schema = schemathesis.openapi.from_url(f"{stack.url}/openapi.json", config=config, timeout=30)
    every = [result.ok() for result in schema.get_all_operations()]
    excluded = sorted(op.label for op in every if changes_model(op.label))
    operations = [op for op in every if op.label not in excluded]

    cases: Counter[str] = Counter()
    statuses: Counter[tuple[str, int]] = Counter()
    failures: dict[tuple[str, str], str] = {}  # (operation, what failed) -> its first case
    no_negative: list[str] = []
    session = requests.Session()
    started = time.monotonic()

    def record(case: schemathesis.Case, title: str, detail: str) -> None:
        key = (case.operation.label, title)
        if key not in failures:
            curl = case.as_curl_command(base_url=stack.url)
            failures[key] = f"{curl[:2000]}\n{detail[:2000]}"

    def run_one(case: schemathesis.Case) -> None:
        label = case.operation.label
        cases[label] += 1
        try:
            response = case.call(base_url=stack.url, session=session, timeout=REQUEST_TIMEOUT)
        except requests.RequestException as exc:
            record(case, f"no response ({type(exc).__name__})", str(exc))
            return
        statuses[(label, response.status_code)] += 1
        body = response.content[:500].decode(errors="replace")
        try:
            case.validate_response(response, checks=CHECKS)
        except (FailureGroup, Failure) as exc:
            for failure in exc.exceptions if isinstance(exc, FailureGroup) else [exc]:
                title = f"{failure.title} ({response.status_code})"
                record(case, title, f"{failure.message}\n{body}")
        sse = label in SSE_OPERATIONS and response.status_code == 200
        if sse and (problem := sse_problem(response)):
            record(case, "bad event stream", problem)

    # each operation as generated, then those of one operation again with a real one's id (the
    # first start's, ended), for their 200 and 409 answers: a generated id names none
    real_id = stack.http.get("/operations", params={"limit": 1}).json()[0]["id"]
    passes = [(op, mode, n, {}) for op in operations for mode, n in EXAMPLES.items()]
    passes += [
        (op, GenerationMode.POSITIVE, 1, {"path_parameters": {"op_id": real_id}})
        for op in operations
        if op.path_parameters.get("op_id") is not None
    ]
    for operation, mode, examples, fixed in passes:
        strategy = operation.as_strategy(generation_mode=mode, **fixed)
        test = given(case=strategy)(run_one)
        test = settings(
            max_examples=examples,
            derandomize=True,  # the same requests on every run
            database=None,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],  # failures are collected, not shrunk
            suppress_health_check=list(HealthCheck),
        )(test)
        try:
            test()
        except Unsatisfiable:  # nothing to make invalid (no parameters, or any string goes)
            if mode is not GenerationMode.NEGATIVE:
                raise
            no_negative.append(operation.label)

    elapsed = time.monotonic() - started
    labels = sorted(cases)
    summary = (
        f"{len(operations)} operations ({len(excluded)} left out: {excluded}), "
        f"{sum(cases.values())} requests in {elapsed:.0f} s; by operation: {dict(cases)}; "
        f"statuses: {dict(sorted(statuses.items()))}; no invalid input for {no_negative}"
    )
    print(summary)
    report = "\n\n".join(f"{op}: {title}\n{detail}" for (op, title), detail in failures.items())
    assert not failures, f"{len(failures)} failures ({summary}):\n\n{report}\n\n{stack.tail()}"
    assert {"POST /specialists", "DELETE /specialists/{name}"} <= set(excluded), excluded
    assert {"POST /generate", "POST /generate/stream", "POST /inspect_gates"} <= set(labels)
    assert len(operations) >= 12, labels
    with_inputs = [op.label for op in operations if op.body or any(op.iter_parameters())]
    assert all(cases[label] >= 10 for label in with_inputs), cases
    assert {
        ("POST /generate", 200),
        ("POST /generate/stream", 200),
        ("GET /operations/{op_id}", 200),
        ("GET /operations/{op_id}/events", 200),
        ("POST /operations/{op_id}/cancel", 409),
    } <= set(statuses), statuses
