"""API keys on a running stack (`sma up` with SMA_API_KEY and SMA_ADMIN_KEY): every REST route
and every RPC of every service, without a key, with a wrong one, with a user key and with an
admin key. The services present the admin key to each other, so the stack itself works as
before: it trains, serves, and follows the registry."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from sma.v1 import (
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)
from tests.conftest import synthetic_documents, write_domain
from tests.e2e.conftest import Stack, tiny_home

pytestmark = pytest.mark.slow

USER = "user-key-0123456789abcdef"
OTHER_USER = "user-key-fedcba9876543210"
ADMIN = "admin-key-0123456789abcdef"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    keys = {"SMA_API_KEY": f"{USER},{OTHER_USER}", "SMA_ADMIN_KEY": ADMIN}
    keys["SMA_CORS_ORIGINS"] = "https://app.example"  # a page elsewhere that may call the API
    keys["SMA_MAX_STREAMS_PER_CLIENT"] = "2"
    running = Stack(tiny_home(tmp_path_factory.mktemp("auth")), env=keys).start()
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


def as_(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def test_open_routes_answer_without_a_key(stack: Stack) -> None:
    for path in ("/", "/health", "/livez", "/readyz", "/metrics", "/openapi.json"):
        assert stack.http.get(path).status_code == 200, path
    assert stack.http.get("/health").json()["initialized"]  # the stack works with its keys


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/specialists", None),
        ("GET", "/v1/specialists", None),
        ("POST", "/generate", {"prompt": "the", "max_new_tokens": 2}),
        ("POST", "/generate/stream", {"prompt": "the", "max_new_tokens": 2}),
        ("POST", "/inspect_gates", {"prompt": "the"}),
        ("GET", "/operations", None),
        ("GET", "/versions", None),
    ],
)
def test_reading_and_generating_need_a_user_key(
    stack: Stack, method: str, path: str, body: object
) -> None:
    for key, status in [(None, 401), ("not-a-key-at-all-0000", 401), (USER, 200)]:
        reply = stack.http.request(method, path, json=body, headers=as_(key))
        assert reply.status_code == status, (key, reply.text)
        if status == 401:
            assert reply.headers["www-authenticate"] == "Bearer"
            assert "key" in reply.json()["detail"]
    assert stack.http.request(method, path, json=body, headers=as_(ADMIN)).status_code == 200
    assert stack.http.request(method, path, json=body, headers=as_(OTHER_USER)).status_code == 200


def test_changing_the_model_needs_the_admin_key(stack: Stack) -> None:
    write_domain(stack.home / "data", "web", synthetic_documents("dl", 20, seed=3))
    before = stack.http.get("/specialists", headers=as_(USER)).json()
    for method, path, body in [
        ("POST", "/specialists", {"name": "web"}),
        ("DELETE", "/specialists/ds", None),
        ("POST", "/operations/op-000000000000/cancel", None),
        ("POST", "/versions/v0001/rollback", None),
    ]:
        assert stack.http.request(method, path, json=body).status_code == 401
        reply = stack.http.request(method, path, json=body, headers=as_(USER))
        assert reply.status_code == 403 and "admin key" in reply.json()["detail"]
    assert stack.http.get("/specialists", headers=as_(USER)).json() == before  # nothing changed
    reply = stack.http.post("/specialists", json={"name": "web"}, headers=as_(ADMIN))
    assert reply.status_code == 200, reply.text
    assert "web" in stack.http.get("/specialists", headers=as_(USER)).json()


def call(stack: Stack, service: str, method: str, request: object, key: str | None) -> object:
    """One RPC straight to a service, past the gateway; a stream is read to its end."""
    stubs = {
        "registry": registry_pb2_grpc.RegistryStub,
        "training": training_pb2_grpc.TrainingStub,
        "inference": inference_pb2_grpc.InferenceStub,
    }
    with grpc.insecure_channel(stack.grpc_address(service)) as channel:
        rpc = getattr(stubs[service](channel), method)
        metadata = (("authorization", f"Bearer {key}"),) if key else ()
        reply = rpc(request, timeout=10, metadata=metadata)
        return list(reply) if method in ("Generate", "WatchJob") else reply


READS = [
    ("registry", "ListSpecialists", registry_pb2.ListSpecialistsRequest()),
    ("registry", "GetServing", registry_pb2.GetServingRequest()),
    ("training", "ListJobs", training_pb2.ListJobsRequest()),
    ("inference", "GetModelInfo", inference_pb2.GetModelInfoRequest()),
    ("inference", "Generate", inference_pb2.GenerateRequest(prompt="the", max_new_tokens=2)),
]
# mutations a raw client could try behind the gateway's back; none gets past the key check
WRITES = [
    ("registry", "DeleteSpecialist", registry_pb2.DeleteSpecialistRequest(name="ds")),
    (
        "registry",
        "PublishVersion",
        registry_pb2.PublishVersionRequest(version=common_pb2.ModelVersion(id="v0001")),
    ),
    ("registry", "ReportLoaded", registry_pb2.ReportLoadedRequest(version_id="v0001")),
    ("registry", "RollbackVersion", registry_pb2.RollbackVersionRequest(version_id="v0001")),
    (
        "training",
        "StartJob",
        training_pb2.StartJobRequest(kind=training_pb2.JOB_KIND_REMOVE_SPECIALIST, specialist="ds"),
    ),
    ("training", "CancelJob", training_pb2.CancelJobRequest(id="job-x")),
]


@pytest.mark.parametrize(("service", "method", "request_"), READS + WRITES)
def test_every_rpc_needs_a_key_and_mutations_the_admin_one(
    stack: Stack, service: str, method: str, request_: object
) -> None:
    serving = stack.http.get("/health").json()["serving_version"]
    for key, code in [(None, "UNAUTHENTICATED"), ("not-a-key-at-all-0000", "UNAUTHENTICATED")]:
        with pytest.raises(grpc.RpcError) as refused:
            call(stack, service, method, request_, key)
        assert refused.value.code().name == code, (service, method, key)
    if (service, method, request_) in WRITES:
        with pytest.raises(grpc.RpcError) as refused:
            call(stack, service, method, request_, USER)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "admin key" in refused.value.details()
    else:
        call(stack, service, method, request_, USER)
    health = stack.http.get("/health").json()
    assert health["serving_version"] == serving and "ds" in health["specialists"]


def test_health_and_reflection_stay_open(stack: Stack) -> None:
    for service in ("registry", "training", "inference"):
        with grpc.insecure_channel(stack.grpc_address(service)) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert status.status == health_pb2.HealthCheckResponse.SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            (answer,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
            assert any(s.name.startswith("sma.v1.") for s in answer.list_services_response.service)


def test_a_malformed_key_setting_stops_the_server_with_the_reason(tmp_path) -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "shiftable", "serve", "registry"],
        env={"SMA_HOME": str(tmp_path), "SMA_ADMIN_KEY": "short", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "SMA_ADMIN_KEY: every key needs 16 or more" in done.stderr


def test_the_http_client_is_never_told_the_keys(stack: Stack) -> None:
    """No reply, refused or not, repeats a key that was sent."""
    for key in (USER, "not-a-key-at-all-0000"):
        reply = stack.http.post("/specialists", json={"name": "x"}, headers=as_(key))
        assert key not in reply.text
    assert USER not in httpx.get(f"{stack.url}/health").text


def test_a_configured_origin_may_call_from_the_browser_and_no_other(stack: Stack) -> None:
    for origin, allowed in [("https://app.example", True), ("https://evil.example", False)]:
        preflight = stack.http.options(
            "/generate",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert (preflight.headers.get("access-control-allow-origin") == origin) == allowed
        reply = stack.http.post(
            "/generate",
            json={"prompt": "the", "max_new_tokens": 2},
            headers={"Origin": origin, **as_(USER)},
        )
        assert reply.status_code == 200  # the browser, not the server, withholds the answer
        assert (reply.headers.get("access-control-allow-origin") == origin) == allowed


def test_one_client_cannot_take_every_generation_slot(stack: Stack) -> None:
    """With inference frozen, a client's generations stay open: past SMA_MAX_STREAMS_PER_CLIENT
    (2 here) the next one gets 429 at once, while another client (another key) still gets in.
    All of them complete once inference runs again."""
    inference = stack.pids()["inference"]
    body = {"prompt": "the", "max_new_tokens": 4}
    replies: list[int] = []

    def generate(key: str) -> None:
        reply = stack.http.post("/generate", json=body, headers=as_(key), timeout=60)
        replies.append(reply.status_code)

    os.kill(inference, signal.SIGSTOP)
    try:
        held = [threading.Thread(target=generate, args=(key,)) for key in (USER, USER, OTHER_USER)]
        for thread in held:
            thread.start()
            time.sleep(0.3)  # in the gateway, waiting on inference
        refused = stack.http.post("/generate", json=body, headers=as_(USER), timeout=10)
        assert refused.status_code == 429, refused.text
        assert "SMA_MAX_STREAMS_PER_CLIENT" in refused.json()["detail"]
        assert replies == []  # the held ones are all still waiting
    finally:
        os.kill(inference, signal.SIGCONT)
    for thread in held:
        thread.join(60)
    assert replies == [200, 200, 200]
    assert stack.http.post("/generate", json=body, headers=as_(USER)).status_code == 200
