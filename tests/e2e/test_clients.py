"""Clients people already use, against a real stack: the official `openai` client on the
OpenAI-compatible API, and our own gRPC client package in a virtual environment without torch."""

from __future__ import annotations

import json
import math
import os
import secrets
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch

from bench import api_eval
from shiftable_lib import checkpoint
from tests.conftest import synthetic_documents, write_domain
from tests.e2e.conftest import Stack, wait_for

ROOT = Path(__file__).resolve().parents[2]

PROMPT = "the list of numpy array"


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def _serving(stack: Stack) -> checkpoint.ModelVersion:
    version = stack.http.get("/health").json()["serving_version"]
    return checkpoint.load_version(stack.home / "artifacts" / "models", version)


def test_models_are_the_model_and_one_per_specialist(stack: Stack, client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    health = stack.http.get("/health").json()
    assert set(models) == {"shiftable", "shiftable:dl", "shiftable:ds"}
    assert {m.version for m in models.values()} == {health["serving_version"]}
    assert models["shiftable:ds"].parent == "shiftable"
    assert models["shiftable"].max_model_len == health["model"]["context"]


def test_streamed_completions_equal_the_whole_ones(client: openai.OpenAI) -> None:
    """Greedy with a seed: the streamed text is the text of the whole reply, for completions
    and chat alike, and usage and finish reasons are reported."""
    kwargs = {"model": "shiftable", "max_tokens": 12, "temperature": 0, "seed": 7}
    whole = client.completions.create(prompt=PROMPT, **kwargs)
    chunks = list(
        client.completions.create(
            prompt=PROMPT, stream=True, stream_options={"include_usage": True}, **kwargs
        )
    )
    assert whole.object == "text_completion" and whole.choices[0].text
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage == whole.usage and not chunks[-1].choices
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == whole.choices[0].finish_reason and not any(finish[:-1])
    assert whole.usage.completion_tokens <= 12
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    # echo and logprobs, streamed: the prompt's tokens come first, then each new one's
    scored = {**kwargs, "echo": True, "logprobs": 1}
    echoed = client.completions.create(prompt=PROMPT, **scored).choices[0]
    parts = [c.choices[0] for c in client.completions.create(prompt=PROMPT, stream=True, **scored)]
    assert "".join(p.text for p in parts) == echoed.text == PROMPT + whole.choices[0].text
    for field in ("tokens", "token_logprobs", "text_offset"):
        streamed = [v for p in parts for v in getattr(p.logprobs, field)]
        assert streamed == getattr(echoed.logprobs, field)

    messages = [{"role": "user", "content": PROMPT}]
    chat = client.chat.completions.create(messages=messages, **kwargs)
    streamed = list(client.chat.completions.create(messages=messages, stream=True, **kwargs))
    assert chat.choices[0].message.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in streamed)
    assert text == chat.choices[0].message.content
    assert streamed[0].choices[0].delta.role == "assistant"
    # the plain chat template: a from-scratch model continues the user's text
    assert chat.choices[0].message.content == whole.choices[0].text


def test_echo_scores_a_text_as_the_library_does(stack: Stack, client: openai.OpenAI) -> None:
    """`echo` + `logprobs` with max_tokens 0 scores each token of a text: the log-softmax of
    the serving model's forward over it, token by token, with the most likely alternative."""
    reply = client.completions.create(
        model="shiftable", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1
    )
    choice = reply.choices[0]
    assert choice.text == PROMPT and reply.usage.completion_tokens == 0
    loaded = _serving(stack)
    ids = loaded.tokenizer.encode(PROMPT, add_special_tokens=False).ids
    with torch.no_grad():
        logits, _ = loaded.model(torch.tensor([ids]))
    expected = logits[0].log_softmax(-1)
    scored = choice.logprobs
    assert "".join(scored.tokens) == PROMPT and scored.token_logprobs[0] is None
    assert scored.text_offset == _offsets(scored.tokens)  # an ASCII text: characters are bytes
    for p, value in enumerate(scored.token_logprobs[1:]):
        assert value == pytest.approx(expected[p, ids[p + 1]].item(), abs=1e-4)
        best = expected[p].argmax().item()
        top = scored.top_logprobs[p + 1]
        assert top[loaded.tokenizer.decode([best])] == pytest.approx(
            expected[p, best].item(), abs=1e-4
        )
    total = sum(scored.token_logprobs[1:])
    assert math.isfinite(total) and total < 0

    # and a completion's own tokens, generated greedily, are each the most likely one
    gen = client.completions.create(
        model="shiftable", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2
    )
    logprobs = gen.choices[0].logprobs
    assert "".join(logprobs.tokens) == gen.choices[0].text or gen.choices[0].finish_reason == "stop"
    for token, value, top in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        assert value == max(top.values()) and top[token] == value and len(top) == 2

    chat = client.chat.completions.create(
        model="shiftable",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 3 and c.logprob == c.top_logprobs[0].logprob for c in content)
    assert bytes(b for c in content for b in c.bytes).decode() == chat.choices[0].message.content


def _offsets(tokens: list[str]) -> list[int]:
    out, at = [], 0
    for t in tokens:
        out.append(at)
        at += len(t)
    return out


def test_perplexity_through_the_api_is_sma_evals(stack: Stack) -> None:
    """`bench/api_eval.py` on this stack: each domain's held-out perplexity scored from
    outside (echo + logprobs) is `sma eval`'s, but for the one prediction a window's last
    token would make, which a prompt that fills the context leaves out."""
    result = api_eval.measure(stack.home, stack.url, "cpu")
    assert set(result["domains"]) == {"general", "ds", "dl"}
    for row in result["domains"].values():
        assert math.isfinite(row["api"]) and abs(row["difference"]) < 0.03, row


def test_a_specialist_model_forces_that_specialist(client: openai.OpenAI) -> None:
    forced = client.completions.create(
        model="shiftable:ds", prompt=PROMPT, max_tokens=4, temperature=0
    )
    assert forced.choices[0].gate_weights["ds"] == pytest.approx(1.0)
    soft = client.completions.create(model="shiftable", prompt=PROMPT, max_tokens=4, temperature=0)
    weights = soft.choices[0].gate_weights
    assert set(weights) == {"general", "dl", "ds"} and sum(weights.values()) == pytest.approx(
        1, abs=1e-3
    )
    excluded = client.completions.create(
        model="shiftable", prompt=PROMPT, max_tokens=4, extra_body={"exclude": ["ds"]}
    )
    assert excluded.choices[0].gate_weights["ds"] == 0


def test_token_id_prompts_batches_and_n(stack: Stack, client: openai.OpenAI) -> None:
    ids = stack.http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    kwargs = {"model": "shiftable", "max_tokens": 5, "temperature": 0}
    as_text = client.completions.create(prompt=PROMPT, **kwargs)
    as_ids = client.completions.create(prompt=ids, **kwargs)
    assert as_ids.choices[0].text == as_text.choices[0].text
    batch = client.completions.create(prompt=[PROMPT, "tensor gradient"], n=2, **kwargs)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text == as_text.choices[0].text  # greedy
    sampled = client.completions.create(
        model="shiftable", prompt=[ids, ids], max_tokens=5, temperature=1.0, seed=3, n=1
    )
    again = client.completions.create(
        model="shiftable", prompt=[ids, ids], max_tokens=5, temperature=1.0, seed=3, n=1
    )
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]
    assert sampled.usage.prompt_tokens == 2 * len(ids)


def test_the_tokenizer_over_http(stack: Stack) -> None:
    info = stack.http.get("/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] > 0
    tokens = stack.http.post(
        "/tokenize", json={"prompt": PROMPT, "add_special_tokens": False, "return_token_strs": True}
    ).json()
    assert tokens["count"] == len(tokens["tokens"]) and "".join(tokens["token_strs"]) == PROMPT
    back = stack.http.post("/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert back == {"prompt": PROMPT}
    eos = stack.http.post("/tokenize", json={"prompt": info["eos_token"]}).json()["tokens"]
    assert len(eos) == 1
    chat = stack.http.post(
        "/tokenize", json={"messages": [{"role": "user", "content": PROMPT}]}
    ).json()
    assert chat["tokens"] == tokens["tokens"]


@pytest.mark.parametrize(
    ("kwargs", "error", "param"),
    [
        ({"model": "nope"}, openai.NotFoundError, "model"),
        ({"model": "shiftable:law"}, openai.NotFoundError, "model"),
        ({"temperature": -1}, openai.BadRequestError, "temperature"),
        ({"max_tokens": 10_000}, openai.BadRequestError, None),  # past the context
        ({"logprobs": 30}, openai.BadRequestError, "logprobs"),
        ({"extra_body": {"colour": "red"}}, openai.BadRequestError, "colour"),
        ({"frequency_penalty": 1.0}, openai.BadRequestError, "penalty"),
        (
            {"model": "shiftable:ds", "extra_body": {"force": ["dl"]}},
            openai.BadRequestError,
            "force",
        ),
        ({"extra_body": {"force": ["law"]}}, openai.NotFoundError, None),
    ],
)
def test_refusals_come_in_openais_shape(client: openai.OpenAI, kwargs, error, param) -> None:
    request = {"model": "shiftable", "prompt": PROMPT, "max_tokens": 4, **kwargs}
    with pytest.raises(error) as caught:
        client.completions.create(**request)
    body = caught.value.body
    assert isinstance(body, dict) and body["message"] and body["type"]
    assert body.get("param") == param
    if error is openai.NotFoundError and param == "model":
        assert body["code"] == "model_not_found"


def test_refusals_outside_the_schema_come_in_openais_shape_too(stack: Stack) -> None:
    """A body that is not JSON, an unknown route method, an unsupported stream option."""
    broken = stack.http.post(
        "/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert broken.status_code == 400 and broken.json()["error"]["type"] == "invalid_request_error"
    wrong = stack.http.get("/v1/completions")
    assert wrong.status_code == 405 and "error" in wrong.json()
    usage = stack.http.post(
        "/v1/completions",
        json={
            "model": "shiftable",
            "prompt": PROMPT,
            "stream": True,
            "stream_options": {"continuous_usage_stats": True},
        },
    )
    assert usage.status_code == 400 and usage.json()["error"]["param"] == "stream_options"
    typed = stack.http.post("/v1/completions", json={"model": "shiftable", "prompt": 5})
    assert typed.status_code == 400 and typed.json()["error"]["param"] == "prompt"


def test_an_empty_chat_still_generates(client: openai.OpenAI) -> None:
    for limit in (3, None):
        reply = client.chat.completions.create(
            model="shiftable", messages=[{"role": "user", "content": ""}], max_tokens=limit
        )
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage.completion_tokens >= 1


def test_a_prompt_that_does_not_fit_is_refused_not_cut(stack: Stack, client: openai.OpenAI) -> None:
    context = stack.http.get("/health").json()["model"]["context"]
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="shiftable", prompt=[5] * context, max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(
            model="shiftable", messages=[{"role": "user", "content": "list " * 4 * context}]
        )


CLIENT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from shiftable_client import Client

    inference, registry, operation = sys.argv[1:4]
    out = {}
    try:
        import torch  # noqa: F401
        out["torch"] = True
    except ImportError:
        out["torch"] = False
    with Client(inference, registry=registry) as client:
        deltas = list(client.generate("the list of", max_new_tokens=6, temperature=0))
        out["text"] = "".join(d.text for d in deltas)
        out["finish"] = deltas[-1].finish_reason
        out["experts"] = list(client.inspect_gates("the list of").experts)
        out["updates"] = [(u.state, u.fraction) for u in client.watch_operation(operation)]
        out["specialists"] = sorted(s.name for s in client.specialists() if s.state == "ready")
    print(json.dumps(out))
    """
)


def test_the_client_package_streams_and_watches_an_add_without_torch(
    stack: Stack, tmp_path: Path
) -> None:
    """`clients/python` installs on its own into a fresh virtual environment (no torch comes
    with it), streams a generation, inspects the gate and follows an add to its end."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run(
        [python, "-m", "pip", "install", "-q", str(ROOT / "clients" / "python")],
        check=True,
        timeout=600,
    )
    write_domain(stack.home / "data", "web", synthetic_documents("dl", 20, seed=5))
    request_id = "add-web-" + secrets.token_hex(4)
    reply = stack.http.post(
        "/specialists?wait=false", json={"name": "web"}, headers={"X-Request-Id": request_id}
    )
    assert reply.status_code == 202, reply.text
    assert reply.headers["x-request-id"] == request_id
    run = subprocess.run(
        [
            python,
            "-c",
            CLIENT_SCRIPT,
            stack.grpc_address("inference"),
            stack.grpc_address("registry"),
            reply.json()["id"],
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # not the repository: only what the venv installed is importable
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["torch"] is False
    assert out["text"] and out["finish"] in ("length", "eos")
    assert out["experts"][0] == "general"
    assert out["updates"][-1] == ["succeeded", 1.0]
    assert "web" in out["specialists"]
    # the add's id is in the gateway's lines and the training server's, for that add
    lines = _log_lines(stack, request_id)
    assert any("sma.gateway.access" in line and "/specialists" in line for line in lines)
    assert any("sma.training" in line and "web" in line for line in lines), lines
    # the job's own lines too, written as it runs and ends, long after the call that queued it
    job_lines = _log_lines(stack, request_id, expected=4)
    assert any("sma.training" in line and "SUCCEEDED" in line for line in job_lines), job_lines


def _log_lines(stack: Stack, request_id: str, expected: int = 2) -> list[str]:
    """The stack's log lines of `request_id`, once there are `expected` of them (a server
    writes its line as the reply goes, so the line may follow the reply by a moment)."""

    def found() -> list[str]:
        text = stack.log.read_text(errors="replace")
        lines = [line for line in text.splitlines() if f"[{request_id}]" in line]
        return lines if len(lines) >= expected else []

    return wait_for(found, timeout=15)


def test_a_request_id_follows_a_generation_through_the_gateway_and_inference(
    stack: Stack,
) -> None:
    request_id = "gen-" + secrets.token_hex(4)
    reply = stack.http.post(
        "/generate",
        json={"prompt": "the list", "max_new_tokens": 3},
        headers={"X-Request-Id": request_id},
    )
    assert reply.status_code == 200 and reply.headers["x-request-id"] == request_id
    lines = _log_lines(stack, request_id)
    assert any("sma.gateway.access" in line and '"POST /generate" 200' in line for line in lines)
    assert any("sma.inference" in line and "generated 3 tokens" in line for line in lines), lines
    # an id that cannot go in a log line as it is gets replaced; none given, one is made
    odd = stack.http.get("/health", headers={"X-Request-Id": "two words"})
    made = stack.http.get("/health")
    assert odd.headers["x-request-id"] != "two words"
    assert len(made.headers["x-request-id"]) == 16


LM_EVAL_TASK = """
task: shiftable_text
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""

LM_EVAL_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import lm_eval
    from lm_eval.tasks import TaskManager

    url, context, tasks = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"base_url={url},model=shiftable,max_length={context},max_retries=1",
        tasks=["shiftable_text"],
        task_manager=TaskManager(include_path=tasks),
    )
    print(json.dumps(results["results"]["shiftable_text"], default=str))
    """
)


def test_lm_eval_scores_a_local_text_task_through_the_api(stack: Stack, tmp_path: Path) -> None:
    """EleutherAI's harness, model `local-completions`, finds the server's tokenizer by itself
    (`/tokenizer_info`, `/tokenize`: offline, there is no other tokenizer named `shiftable` it
    could load) and scores a local text task by echo + logprobs: finite bits per byte."""
    data = tmp_path / "docs.jsonl"
    docs = synthetic_documents("ds", 3, seed=21)
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "shiftable_text.yaml").write_text(LM_EVAL_TASK.format(data=data))
    context = stack.http.get("/health").json()["model"]["context"]
    cache = tmp_path / "hf"
    env = {
        **os.environ,
        "HF_HOME": str(cache),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
    }
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            LM_EVAL_SCRIPT,
            f"{stack.url}/v1/completions",
            str(context),
            str(tasks),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    scores = json.loads(run.stdout.strip().splitlines()[-1])
    bits = scores["bits_per_byte,none"]
    assert math.isfinite(bits) and 0 < bits < 20, scores
