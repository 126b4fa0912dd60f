"""The running system end to end: `sma up` on loopback, real processes, tiny profile."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client.parser import text_string_to_metric_families

from gateway.schemas import sse
from sma.v1 import inference_pb2, inference_pb2_grpc, registry_pb2, registry_pb2_grpc
from tests.conftest import synthetic_documents, write_domain
from tests.e2e.conftest import Stack, sse_events, wait_for

pytestmark = pytest.mark.slow


def state_snapshot(stack: Stack) -> dict:
    """Everything a bad request must leave alone."""
    data = stack.home / "data"
    return {
        "specialists": stack.http.get("/v1/specialists").json(),
        "serving": stack.health()["serving_version"],
        "versions": sorted(p.name for p in (stack.home / "artifacts" / "models").iterdir()),
        "data": sorted(str(p.relative_to(data)) for p in data.rglob("*")),
        "operations": [op["id"] for op in stack.http.get("/operations").json()],
    }


def test_first_start_serves_a_trained_model(stack: Stack) -> None:
    health = stack.health()
    assert health["initialized"] and health["ready"] and health["status"] == "ok"
    assert health["serving_version"] == health["loaded_version"]
    assert health["device"] == "cpu" and health["profile"] == "tiny"
    assert health["model"]["context"] == 64 and health["model"]["n_layer"] == 2
    assert sorted(health["specialists"]) == ["dl", "ds"]
    assert Path(health["tokenizer_path"]).is_file()
    assert {n: s["status"] for n, s in health["services"].items()} == {
        "registry": "SERVING",
        "training": "SERVING",
        "inference": "SERVING",
    }
    assert sorted(stack.http.get("/specialists").json()) == ["dl", "ds"]
    assert "Shiftable" in stack.http.get("/").text
    # the generalist was published as soon as it was written, and served while the
    # specialists trained
    versions = stack.http.get("/versions").json()
    assert [(v["id"], v["serving"], v["specialists"]) for v in versions] == [
        ("v0002", True, ["dl", "ds"]),
        ("v0001", False, []),
    ]


def test_the_terminal_shows_where_the_ui_is_and_the_first_start_progress(stack: Stack) -> None:
    """`sma up` names the UI's address before training starts, prints a line per phase (with
    its bar, the whole start's percentage and ETA), then which model serves."""
    log = stack.log.read_text()
    ui = log.index("sma: web UI and API on http://")
    training = log.index("sma: training the first model")
    assert ui < training
    lines = [line for line in log.splitlines() if line.startswith("sma: first start: ")]
    phases = [line.removeprefix("sma: first start: ").split(" ")[0] for line in lines]
    # read once a second: the tiny profile's phases take less, so only some of them show
    assert len(set(phases)) >= 2, phases
    percents = [int(re.search(r" (\d+)% ", line + " ").group(1)) for line in lines]
    assert percents == sorted(percents), percents  # the bars: tests/cli/test_up_progress.py
    serving = stack.health()["serving_version"]
    said = f"sma: model {serving} serving (specialists: dl, ds)"  # at its next read of /health
    assert wait_for(lambda: said in stack.log.read_text()[training:], timeout=10)


def test_every_grpc_server_reports_serving(stack: Stack) -> None:
    for service in ("registry", "training", "inference"):
        with grpc.insecure_channel(stack.grpc_address(service)) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


def test_generate_keeps_the_original_contract(stack: Stack) -> None:
    body = {"prompt": "the list", "max_new_tokens": 12, "temperature": 0, "top_k": 0}
    reply = stack.http.post("/generate", json=body)
    assert reply.status_code == 200, reply.text
    out = reply.json()
    assert out["prompt"] == "the list"
    assert out["full_text"] == out["prompt"] + out["completion"]
    assert sorted(out["specialists"]) == ["dl", "ds"]
    assert out["usage"]["completion_tokens"] >= 1
    assert set(out["active_weights"]) == {"ds", "dl"}
    assert out["finish_reason"] in ("length", "eos")


def test_a_chat_is_a_prompt_by_the_models_template(stack: Stack) -> None:
    """`messages` in place of `prompt`: a model trained here has the plain template (the
    messages a blank line apart), which /health reports; the reply shows the prompt made."""
    assert stack.health()["model"]["chat_template"] == "plain"
    chat = [
        {"role": "user", "content": "the list"},
        {"role": "assistant", "content": "of arrays"},
        {"role": "user", "content": "the dict"},
    ]
    body = {"messages": chat, "max_new_tokens": 4, "temperature": 0}
    out = stack.http.post("/generate", json=body).json()
    assert out["prompt"] == "the list\n\nof arrays\n\nthe dict"
    assert out["full_text"] == out["prompt"] + out["completion"]
    same = stack.http.post("/generate", json={**body, "messages": None, "prompt": out["prompt"]})
    assert same.json()["completion"] == out["completion"]
    with stack.http.stream("POST", "/generate/stream", json=body) as response:
        events = list(sse_events(response))
    assert events[-1][0] == "done" and events[-1][1]["prompt"] == out["prompt"]
    for bad in ({"max_new_tokens": 4}, {**body, "prompt": "the"}, {**body, "messages": []}):
        refused = stack.http.post("/generate", json=bad)
        assert refused.status_code == 422, bad


def test_stream_deltas_concatenate_to_the_completion(stack: Stack) -> None:
    body = {"prompt": "tensor gradient", "max_new_tokens": 16, "temperature": 0.0}
    whole = stack.http.post("/generate", json=body).json()
    with stack.http.stream("POST", "/generate/stream", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(response))
    tokens = [data for name, data in events if name == "token"]
    done = [data for name, data in events if name == "done"]
    # no count of token events: steps that pile up behind a slow reader are merged into one
    assert tokens and len(done) == 1
    assert "".join(t["text"] for t in tokens) == done[0]["completion"] == whole["completion"]
    assert done[0]["usage"]["completion_tokens"] == sum(len(t["token_ids"]) for t in tokens)


def test_inspect_gates_has_one_row_per_layer(stack: Stack) -> None:
    reply = stack.http.post("/inspect_gates", json={"prompt": "numpy array mean"}).json()
    assert reply["experts"][0] == "general" and set(reply["experts"][1:]) == {"ds", "dl"}
    assert len(reply["layers"]) == 2  # the tiny profile's layers
    for layer in reply["layers"]:
        assert abs(sum(layer["mean"].values()) - 1.0) < 1e-3


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/specialists", {"name": "../etc"}, 400),
        ("POST", "/specialists", {"name": "latin"}, 400),  # not UTF-8: named with its byte
        ("POST", "/specialists", {"name": "blank"}, 400),  # only whitespace
        ("POST", "/specialists", {"name": "linked"}, 400),  # a link out of data/
        ("POST", "/specialists", {"name": "General"}, 400),
        ("POST", "/specialists", {"name": "general"}, 400),
        ("POST", "/specialists", {"name": "nocorpus"}, 400),
        ("POST", "/specialists", {"name": "emptycorpus"}, 400),
        ("POST", "/specialists", {"name": "ds"}, 409),
        ("POST", "/specialists", {"name": 7}, 422),
        ("POST", "/specialists", {}, 422),
        ("DELETE", "/specialists/unknown", None, 404),
        ("DELETE", "/specialists/Bad%20Name", None, 400),
        ("POST", "/generate", {"prompt": "x", "max_new_tokens": 0}, 422),
        ("POST", "/generate", {"prompt": "x", "max_new_tokens": 5000}, 400),
        ("POST", "/generate", {"prompt": "x", "temperature": -1}, 422),
        ("POST", "/generate", {"prompt": "x", "top_k": "many"}, 422),
        ("POST", "/generate", {"prompt": ["x"]}, 422),
        ("POST", "/generate", {"prompt": "x", "routing": {"force": ["nobody"]}}, 404),
        ("POST", "/generate", None, 422),
        ("POST", "/generate/stream", {"prompt": "x", "max_new_tokens": 5000}, 400),
        ("GET", "/operations/op-doesnotexist", None, 404),
    ],
)
def test_bad_requests_get_a_clear_4xx_and_change_nothing(
    stack: Stack, method: str, path: str, body: object, status: int
) -> None:
    data = stack.home / "data"
    (data / "emptycorpus").mkdir(exist_ok=True)
    (data / "emptycorpus" / "empty.txt").write_text("")
    for name, content in [("latin", b"caf\xe9"), ("blank", b" \n\n\t\n")]:
        (data / name).mkdir(exist_ok=True)
        (data / name / "a.txt").write_bytes(content)
    if not (data / "linked").is_symlink():
        (data / "linked").symlink_to(stack.home / "artifacts", target_is_directory=True)
        (stack.home / "artifacts" / "outside.txt").write_text("not a corpus")
    before = state_snapshot(stack)
    reply = stack.http.request(method, path, json=body)
    assert reply.status_code == status, reply.text
    detail = reply.json()["detail"]
    assert detail and (isinstance(detail, list) or len(detail) > 10)
    assert state_snapshot(stack) == before


def test_oversized_body_is_refused(stack: Stack) -> None:
    reply = stack.http.post(
        "/generate",
        content=b'{"prompt": "' + b"a" * 2_000_000 + b'"}',
        headers={"content-type": "application/json"},
    )
    assert reply.status_code == 413


def test_the_longest_prompt_fits_the_body_limit_however_json_spells_it(stack: Stack) -> None:
    """100,000 characters outside the BMP, each escaped as a surrogate pair (12 bytes): 1.2 MB
    of body, taken and left-truncated to the context like any long prompt."""
    body = json.dumps({"prompt": "\U0001f600" * 100_000, "max_new_tokens": 2})
    assert len(body) > 1_200_000
    reply = stack.http.post(
        "/generate", content=body.encode(), headers={"content-type": "application/json"}
    )
    assert reply.status_code == 200, reply.text[:300]
    assert reply.json()["completion"] is not None


def test_a_chunked_body_is_cut_off_at_the_limit_and_never_read_whole(stack: Stack) -> None:
    """No Content-Length: the gateway counts the body as it arrives and answers 413 once it
    passes the limit, while the client is still sending its 100 MB; its memory stays put."""
    gateway = stack.pids()["gateway"]
    before = _rss_mb(gateway)
    host, port = stack.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(
            b"POST /generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"%x\r\n%s\r\n" % (64 * 1024, b"a" * 64 * 1024)
        conn.setblocking(False)
        sent, answer = 0, b""
        while sent < 100 * 1024 * 1024 and not answer:
            try:
                conn.sendall(chunk)
                sent += 64 * 1024
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                time.sleep(0.01)
            with contextlib.suppress(BlockingIOError):
                answer = conn.recv(4096)
        conn.settimeout(2)
        with contextlib.suppress(OSError):
            answer += conn.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"a" * 100 not in answer  # nothing of the body comes back
    assert sent < 50 * 1024 * 1024  # answered long before the client was done
    assert _rss_mb(gateway) - before < 50
    assert stack.http.get("/livez").status_code == 200


def test_an_invalid_body_is_not_echoed_in_the_error(stack: Stack) -> None:
    prompt = "secret " * 20_000  # over the prompt limit
    for body in (
        {"prompt": prompt},
        {"prompt": "x", "stop": ["s" * 300]},
        {"prompt": "x", "routing": {"force": ["n" * 500]}},
    ):
        reply = stack.http.post("/generate", json=body)
        assert reply.status_code == 422, reply.text
        assert len(reply.content) < 2000 and "secret secret" not in reply.text
        assert "sss" not in reply.text and "nnn" not in reply.text


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_a_reflection_only_client_lists_the_services_and_streams(stack: Stack) -> None:
    with grpc.insecure_channel(stack.grpc_address("inference")) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert "sma.v1.Inference" in database.get_services()
        pool = descriptor_pool.DescriptorPool(database)
        method = pool.FindServiceByName("sma.v1.Inference").methods_by_name["Generate"]
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        call = channel.unary_stream(
            "/sma.v1.Inference/Generate",
            request_serializer=request_cls.SerializeToString,
            response_deserializer=response_cls.FromString,
        )
        replies = list(call(request_cls(prompt="the", max_new_tokens=6, temperature=0), timeout=60))
        # the server may merge steps that pile up while a slow client reads into one reply
        tokens = [t for reply in replies for t in reply.token_ids]
        assert 1 <= len(tokens) <= 6 and "".join(r.text for r in replies)
        assert replies[-1].finish_reason != 0
        assert all(r.finish_reason == 0 for r in replies[:-1])
    for service, name in (("registry", "sma.v1.Registry"), ("training", "sma.v1.Training")):
        with grpc.insecure_channel(stack.grpc_address(service)) as channel:
            assert name in ProtoReflectionDescriptorDatabase(channel).get_services()


def test_a_client_that_disconnects_frees_its_slot(stack: Stack) -> None:
    with grpc.insecure_channel(stack.grpc_address("inference")) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        call = stub.Generate(
            inference_pb2.GenerateRequest(prompt="the", max_new_tokens=60, ignore_eos=True)
        )
        next(call)
        active = stub.GetModelInfo(inference_pb2.GetModelInfoRequest(), timeout=5).active_streams
        assert active == 1
        call.cancel()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            info = stub.GetModelInfo(inference_pb2.GetModelInfoRequest(), timeout=5)
            if info.active_streams == 0:
                break
            time.sleep(0.05)
        assert info.active_streams == 0 and info.queued == 0


def test_metrics_expose_serving_and_training_figures(stack: Stack) -> None:
    stack.http.post("/generate", json={"prompt": "the", "max_new_tokens": 4})
    stack.http.post("/generate/stream", json={"prompt": "the", "max_new_tokens": 4})
    stack.http.post("/generate", json={"prompt": "the", "max_new_tokens": -1})
    text = stack.http.get("/metrics").text
    for name in (
        "sma_http_requests_total",
        "sma_generated_tokens_total",
        "sma_time_to_first_token_seconds_bucket",
        "sma_inter_token_latency_seconds_bucket",
        "sma_operations_running",
    ):
        assert name in text, name
    assert "sma_model_loaded 1.0" in text
    # requests are counted by route template, not raw path
    assert 'method="POST",route="/generate",status="200"' in text
    assert 'method="POST",route="/generate/stream",status="200"' in text  # counted once sent
    assert 'method="POST",route="/generate",status="422"' in text


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a Prometheus text page as prometheus_client's parser reads it: (name,
    labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _scrape(stack: Stack, service: str = "gateway") -> dict[tuple[str, tuple], float]:
    if service == "gateway":
        return _samples(stack.http.get("/metrics").text)
    reply = httpx.get(stack.metrics_url(service), timeout=10)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    return _samples(reply.text)


def _moved(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_metrics_parse_and_count_a_known_workload(stack: Stack) -> None:
    """Four generations of known length, one forced to a specialist: the counters move by
    exactly that much on the gateway and on the inference server, and each live replica's
    loaded version is there."""
    services = ("gateway", "inference")
    before = {s: _scrape(stack, s) for s in services}
    greedy = {"prompt": "the list", "temperature": 0, "ignore_eos": True}
    replies = [stack.http.post("/generate", json={**greedy, "max_new_tokens": 4}) for _ in range(3)]
    forced = {**greedy, "max_new_tokens": 2, "routing": {"force": ["ds"]}}
    replies.append(stack.http.post("/generate", json=forced))
    assert all(r.status_code == 200 for r in replies)
    after = {s: _scrape(stack, s) for s in services}

    def moved(name: str, service: str = "gateway", **labels: str) -> float:
        return _moved(before[service], after[service], name, **labels)

    assert moved("sma_completion_tokens_total") == 14
    assert moved("sma_prompt_tokens_total") == sum(
        r.json()["usage"]["prompt_tokens"] for r in replies
    )
    assert moved("sma_finish_reasons_total", reason="length") == 4
    assert moved("sma_generation_seconds_count") == 4
    assert moved("sma_specialist_requests_total", expert="ds", how="forced") == 1
    routed = sum(
        after["gateway"][k] - before["gateway"].get(k, 0.0)
        for k in after["gateway"]
        if k[0] == "sma_specialist_requests_total" and ("how", "routed") in k[1]
    )
    assert routed == 3
    assert moved("sma_generated_tokens_total") == 14
    version = stack.http.get("/health").json()["serving_version"]
    loaded = [k for k in after["gateway"] if k[0] == "sma_replica_loaded_version"]
    assert loaded and all(dict(k[1])["version"] == version for k in loaded)
    # the inference server counted the same work as counters of its own, and its gRPC calls
    assert moved("sma_inference_requests_total", "inference") == 4
    assert moved("sma_inference_generated_tokens_total", "inference") == 14
    assert moved("sma_inference_decode_steps_total", "inference") >= 4
    assert moved("sma_inference_decode_seconds_total", "inference") > 0
    generate = {"grpc_service": "sma.v1.Inference", "grpc_method": "Generate"}
    generate["grpc_type"] = "server_stream"
    assert moved("grpc_server_started_total", "inference", **generate) == 4
    assert moved("grpc_server_handled_total", "inference", **generate, grpc_code="OK") == 4
    assert moved("grpc_server_handling_seconds_count", "inference", **generate) == 4
    assert moved("grpc_server_msg_sent_total", "inference", **generate) >= 4
    assert after["inference"][("sma_inference_loaded_version", (("version", version),))] == 1
    assert after["inference"][("sma_inference_active_streams", ())] == 0


def test_every_grpc_server_has_metrics_of_its_calls_and_its_work(stack: Stack) -> None:
    """Each service's /metrics parses, counts its gRPC calls by method and status code (a
    refused call included) and holds its own figures."""
    with grpc.insecure_channel(stack.grpc_address("registry")) as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        before = _scrape(stack, "registry")
        stub.ListSpecialists(registry_pb2.ListSpecialistsRequest(), timeout=5)
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetSpecialist(registry_pb2.GetSpecialistRequest(name="nobody"), timeout=5)
        assert refused.value.code() is grpc.StatusCode.NOT_FOUND
    after = _scrape(stack, "registry")
    unary = {"grpc_service": "sma.v1.Registry", "grpc_type": "unary"}
    ok = _moved(
        before,
        after,
        "grpc_server_handled_total",
        **unary,
        grpc_method="ListSpecialists",
        grpc_code="OK",
    )
    assert ok == 1
    missing = _moved(
        before,
        after,
        "grpc_server_handled_total",
        **unary,
        grpc_method="GetSpecialist",
        grpc_code="NOT_FOUND",
    )
    assert missing == 1
    specialists = stack.http.get("/specialists").json()  # the ready ones, by name
    ready = after[("sma_registry_specialists", (("state", "ready"),))]
    assert ready == len(specialists)
    version = stack.http.get("/health").json()["serving_version"]
    assert after[("sma_registry_serving_version", (("version", version),))] == 1
    assert after[("sma_registry_versions", ())] >= 1
    assert after[("process_resident_memory_bytes", ())] > 0
    training = _scrape(stack, "training")
    jobs = {dict(k[1])["kind"]: v for k, v in training.items() if k[0] == "sma_training_jobs_total"}
    assert jobs.get("train_all", 0) >= 1, jobs  # the first start trained the generalist
    assert training[("sma_training_queued_jobs", ())] == 0
    watched = [k for k in training if k[0] == "grpc_server_handled_total"]
    assert any(dict(k[1])["grpc_service"] == "sma.v1.Training" for k in watched)


def test_add_specialist_trains_publishes_and_serves_it(stack: Stack) -> None:
    write_domain(stack.home / "data", "web", synthetic_documents("dl", 30, seed=7))
    before = stack.health()["serving_version"]
    reply = stack.http.post("/specialists", json={"name": "web"})
    assert reply.status_code == 200, reply.text
    assert reply.json()["message"] == "Specialist 'web' is now configured."
    assert sorted(reply.json()["specialists"]) == ["dl", "ds", "web"]
    health = stack.health()
    assert health["serving_version"] != before
    assert health["loaded_version"] == health["serving_version"]
    out = stack.http.post("/generate", json={"prompt": "x", "max_new_tokens": 3}).json()
    assert "web" in out["active_weights"]
    corpus = reply.json()["corpus"]  # the corpus as read
    assert (corpus["files"], corpus["documents"]) == (1, 30) and not corpus["tokens_estimated"]
    assert corpus["tokens"] > corpus["heldout_tokens"] > 0 and 0 < corpus["heldout_share"] < 0.5
    outcome = reply.json()["outcome"]  # what the add did, from the version's own metrics
    assert outcome["version"] == health["serving_version"]
    assert outcome["specialist"]["before"] > 0 and 0 <= outcome["specialist"]["routing"] <= 1
    assert set(outcome["others"]) == {"general", "dl", "ds"}
    assert all(c["change"] * 100 <= outcome["max_drift"] for c in outcome["others"].values())


def test_a_corpus_too_small_to_learn_from_is_refused_before_anything_is_recorded(
    stack: Stack,
) -> None:
    write_domain(stack.home / "data", "scrap", synthetic_documents("ds", 2, seed=4))
    operations = stack.http.get("/operations").json()
    reply = stack.http.post("/specialists", json={"name": "scrap"})
    assert reply.status_code == 400, reply.text
    detail = reply.json()["detail"]
    assert "holds too little text to learn from" in detail and "tiny model needs at least" in detail
    assert "scrap" not in {s["name"] for s in stack.http.get("/v1/specialists").json()}
    assert stack.http.get("/operations").json() == operations


def test_two_concurrent_adds_give_one_409(stack: Stack) -> None:
    for name in ("one", "two"):
        write_domain(stack.home / "data", name, synthetic_documents("ds", 20, seed=len(name)))
    replies: dict[str, httpx.Response] = {}

    def add(name: str) -> None:
        with httpx.Client(base_url=stack.url, timeout=120) as client:
            replies[name] = client.post("/specialists", json={"name": name})

    threads = [threading.Thread(target=add, args=(n,)) for n in ("one", "two")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in replies.values())
    assert codes == [200, 409], {n: r.text for n, r in replies.items()}
    refused = next(r for r in replies.values() if r.status_code == 409)
    assert "op-" in refused.json()["detail"]


def test_add_without_waiting_returns_the_operation(stack: Stack) -> None:
    present = set(stack.http.get("/specialists").json())
    name = "three"
    write_domain(stack.home / "data", name, synthetic_documents("general", 20, seed=3))
    reply = stack.http.post("/specialists?wait=false", json={"name": name})
    assert reply.status_code == 202, reply.text
    op = reply.json()
    assert op["id"].startswith("op-") and op["kind"] == "add_specialist"
    assert op["state"] in ("pending", "running")
    with stack.http.stream("GET", f"/operations/{op['id']}/events") as response:
        states = [data["state"] for _, data in sse_events(response)]
    assert states[-1] == "succeeded"
    final = stack.http.get(f"/operations/{op['id']}").json()
    assert final["state"] == "succeeded" and final["progress"]["fraction"] == 1.0
    assert set(stack.http.get("/specialists").json()) == present | {name}


def test_an_add_cancelled_while_it_trains_changes_nothing(stack: Stack) -> None:
    write_domain(stack.home / "data", "later", synthetic_documents("dl", 20, seed=11))
    before = state_snapshot(stack)
    reply = stack.http.post("/specialists?wait=false", json={"name": "later"})
    assert reply.status_code == 202, reply.text
    op_id = reply.json()["id"]
    reply = stack.http.post(f"/operations/{op_id}/cancel")
    assert reply.status_code == 200, reply.text
    assert reply.json()["state"] == "cancelled"
    after = state_snapshot(stack)
    assert after.pop("operations") == [op_id, *before.pop("operations")]
    assert after == before  # no specialist record, no version, the corpus left where it was
    again = stack.http.post(f"/operations/{op_id}/cancel")
    assert again.status_code == 409 and "ended" in again.json()["detail"]
    assert stack.http.post("/operations/op-nope/cancel").status_code == 404


def test_versions_list_what_was_published_and_mark_the_serving_one(stack: Stack) -> None:
    versions = stack.http.get("/versions").json()
    serving = [v for v in versions if v["serving"]]
    assert len(serving) == 1 and serving[0]["id"] == stack.health()["serving_version"]
    assert sorted(serving[0]["specialists"]) == sorted(stack.http.get("/specialists").json())
    assert serving[0]["profile"] == "tiny" and serving[0]["metrics"]
    assert [v["id"] for v in versions] == sorted((v["id"] for v in versions), reverse=True)


def test_delete_moves_the_corpus_and_serves_a_model_without_it(stack: Stack) -> None:
    reply = stack.http.delete("/specialists/ds")
    assert reply.status_code == 200, reply.text
    assert reply.json()["message"] == "Specialist 'ds' has been deleted."
    assert "ds" not in reply.json()["specialists"]
    assert not (stack.home / "data" / "ds").exists()
    moved = list((stack.home / "data" / ".deleted").glob("ds-*"))
    assert len(moved) == 1 and list(moved[0].glob("*.txt"))
    out = stack.http.post("/generate", json={"prompt": "x", "max_new_tokens": 3}).json()
    assert "ds" not in out["active_weights"]


def test_a_rollback_serves_an_earlier_version_and_the_next_add_builds_on_it(
    stack: Stack,
) -> None:
    """Going back is its own call (POST /versions/{id}/rollback): to a version whose specialists
    are the ones the registry lists, and the next add trains on what serves, not the newest."""
    before = stack.health()["serving_version"]
    write_domain(stack.home / "data", "brief", synthetic_documents("ds", 20, seed=5))
    assert stack.http.post("/specialists", json={"name": "brief"}).status_code == 200
    assert stack.http.delete("/specialists/brief").status_code == 200
    newest = stack.health()["serving_version"]
    specialists = sorted(stack.http.get("/specialists").json())
    versions = {v["id"]: v for v in stack.http.get("/versions").json()}
    assert sorted(versions[before]["specialists"]) == specialists and newest != before

    mismatched = next(v for v in versions.values() if sorted(v["specialists"]) != specialists)
    for version, status, says in [
        (mismatched["id"], 409, "add or delete specialists to match it first"),
        ("v9999", 404, "v9999"),
    ]:
        reply = stack.http.post(f"/versions/{version}/rollback")
        assert reply.status_code == status and says in reply.json()["detail"], reply.text
    assert stack.health()["serving_version"] == newest  # a refusal changes nothing

    reply = stack.http.post(f"/versions/{before}/rollback")
    assert reply.status_code == 200, reply.text
    assert reply.json()["id"] == before and reply.json()["serving"]
    health = stack.health()
    assert health["serving_version"] == health["loaded_version"] == before
    assert sorted(stack.http.get("/specialists").json()) == specialists
    generated = stack.http.post("/generate", json={"prompt": "x", "max_new_tokens": 3})
    assert generated.status_code == 200
    assert stack.http.post(f"/versions/{before}/rollback").status_code == 200  # changes nothing

    # an add (here: a delete) trains on the version served, and so is newer than both
    reply = stack.http.delete(f"/specialists/{specialists[-1]}")
    assert reply.status_code == 200, reply.text
    config = stack.home / "artifacts" / "models" / stack.health()["serving_version"] / "config.json"
    assert json.loads(config.read_text())["parent"] == before


def test_the_last_specialist_cannot_be_deleted(stack: Stack) -> None:
    names = stack.http.get("/specialists").json()
    for name in names[:-1]:
        assert stack.http.delete(f"/specialists/{name}").status_code == 200
    last = stack.http.get("/specialists").json()
    assert len(last) == 1
    before = state_snapshot(stack)
    reply = stack.http.delete(f"/specialists/{last[0]}")
    assert reply.status_code == 409 and "last" in reply.json()["detail"]
    assert state_snapshot(stack) == before


def test_only_the_hosts_it_serves_are_answered(stack: Stack) -> None:
    """On loopback the gateway answers to its own names only, so a page elsewhere cannot reach
    it through a name of its own pointed at 127.0.0.1 (DNS rebinding); probes answer any Host.
    No CORS header is sent unless origins are configured."""
    hosts = [("localhost", 200), (f"127.0.0.1:{stack.port}", 200), ("evil.example", 400)]
    for host, status in hosts:
        reply = stack.http.get("/specialists", headers={"Host": host})
        assert reply.status_code == status, (host, reply.text)
    assert "Host header" in stack.http.get("/", headers={"Host": "evil.example"}).json()["detail"]
    assert stack.http.get("/readyz", headers={"Host": "10.1.2.3:8000"}).status_code == 200
    preflight = stack.http.options(
        "/generate",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in preflight.headers


def test_a_token_holding_a_unicode_line_break_stays_in_its_event() -> None:
    """U+0085, U+2028 and U+2029 end a line for str.splitlines, and so for readers built on it
    (httpx's iter_lines), though not for SSE: the gateway escapes them inside the JSON."""
    text = "a\u2028b\x85c\u2029d é"
    event = sse("token", {"text": text})
    name, data = event.splitlines()[:2]
    assert name == "event: token" and json.loads(data.removeprefix("data: ")) == {"text": text}
    assert event.endswith("\n\n") and "é" in event  # everything else is sent as it is
