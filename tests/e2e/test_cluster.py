"""The stack as Kubernetes runs it, on loopback: every pod of the rendered `cpu` overlay is a
process running its container's command with its container's environment, on an address of its
own (bench/loopback.py says what stands in for the cluster). One registry, one training, two
inference replicas and two gateways; the home claim is one shared folder, the registry's claim
another, and nothing else is shared.

Through one gateway: the original REST contract, streams spread over both replicas, an add
that the *other* gateway started and that outlives it (this one takes the operation over; no
second job), and one inference replica killed mid-stream (its clients get a clean error event,
the next request is served, and the replica rejoins when restarted).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.loopback import STACK, LoopbackCluster, Pod, render
from sma.v1 import inference_pb2, inference_pb2_grpc, training_pb2, training_pb2_grpc
from tests.conftest import TINY_DRIFT, synthetic_documents, train_tiny_home, write_domain
from tests.e2e.conftest import sse_events, wait_for

pytestmark = pytest.mark.slow

# the Secret the manifests read the API keys from (`kubectl create secret generic sma-api-key`)
USER_KEY = "cluster-user-key-0123456789"
ADMIN_KEY = "cluster-admin-key-0123456789"
USER = {"Authorization": f"Bearer {USER_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
KEY = (("authorization", f"Bearer {USER_KEY}"),)  # gRPC metadata


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackCluster]:
    work = tmp_path_factory.mktemp("cluster")
    running = LoopbackCluster(
        render(STACK / "overlays" / "cpu"),
        work,
        # the one patch: a first training of the tiny profile, should there be one
        env={"SMA_PROFILE": "tiny", "SMA_MAX_DRIFT": str(TINY_DRIFT)},
        secrets={"sma-api-key": {"api-key": USER_KEY, "admin-key": ADMIN_KEY}},
    )
    # a model on the home claim, as `sma train` would leave it: the gateways adopt it
    train_tiny_home(running.volumes / "sma-home")
    with running:
        running.wait_ready(timeout=240)
        yield running


def info(cluster: LoopbackCluster, pod: Pod) -> inference_pb2.GetModelInfoResponse:
    """A replica's own account of itself, asked directly."""
    with grpc.insecure_channel(cluster.address(pod)) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        return stub.GetModelInfo(inference_pb2.GetModelInfoRequest(), timeout=10, metadata=KEY)


def request(body: dict) -> dict:
    """What a client of the API sends: its body, its user key, a patient timeout."""
    return {"json": body, "headers": USER, "timeout": 60}


def test_the_manifests_make_the_pods_the_issue_asks_for(cluster: LoopbackCluster) -> None:
    counts = {app: len(cluster.of(app)) for app in ("registry", "training", "inference")}
    assert counts | {"gateway": len(cluster.of("gateway"))} == {
        "registry": 1,
        "training": 1,
        "inference": 2,
        "gateway": 2,
    }
    assert len({p.ip for p in cluster.pods}) == len(cluster.pods)
    gateway = cluster.of("gateway")[0]
    replicas = ",".join(cluster.address(p) for p in cluster.of("inference"))
    assert gateway.env["SMA_INFERENCE_ADDR"] == f"ipv4:{replicas}"  # the headless Service
    assert gateway.env["SMA_REGISTRY_ADDR"] == cluster.address(cluster.of("registry")[0])


def test_the_original_rest_contract_through_one_gateway(cluster: LoopbackCluster) -> None:
    gateway = cluster.url(cluster.of("gateway")[0])
    with httpx.Client(base_url=gateway, headers=ADMIN, timeout=60) as http:
        assert "Shiftable" in http.get("/").text
        health = http.get("/health").json()
        assert health["status"] == "ok" and health["initialized"] and health["ready"]
        assert sorted(r["id"] for r in health["replicas"]) == ["inference-0", "inference-1"]
        assert sorted(http.get("/specialists").json()) == ["dl", "ds"]
        body = {"prompt": "the list", "max_new_tokens": 8, "temperature": 0.7, "top_k": 20}
        out = http.post("/generate", json=body).json()
        assert {"prompt", "completion", "full_text", "specialists"} <= set(out)
        assert out["full_text"] == "the list" + out["completion"]
        assert http.post("/specialists", json={"name": "Not A Name"}).status_code in (400, 422)
        assert http.delete("/specialists/nobody").status_code == 404


def scraped_requests(pod: Pod) -> float:
    """`sma_inference_requests_total` as Prometheus would scrape it from the pod's `metrics`
    port (the one its annotations name)."""
    reply = httpx.get(f"http://{pod.ip}:{pod.port('metrics')}/metrics", timeout=10)
    samples = {
        s.name: s.value
        for family in text_string_to_metric_families(reply.text)
        for s in family.samples
    }
    return samples["sma_inference_requests_total"]


def test_streams_spread_over_both_replicas(cluster: LoopbackCluster) -> None:
    replicas = cluster.of("inference")
    before = {p.name: info(cluster, p).requests_total for p in replicas}
    scraped = {p.name: scraped_requests(p) for p in replicas}
    body = {"prompt": "tensor gradient", "max_new_tokens": 8}
    url = cluster.url(cluster.of("gateway")[0])

    def stream() -> list[str]:
        with httpx.stream("POST", f"{url}/generate/stream", **request(body)) as response:
            return [name for name, _ in sse_events(response)]

    results: list[list[str]] = []
    threads = [threading.Thread(target=lambda: results.append(stream())) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 8 and all(events[-1] == "done" for events in results), results
    after = {p.name: info(cluster, p).requests_total for p in replicas}
    assert all(after[name] > before[name] for name in before), (before, after)
    # each replica's own /metrics counts its share, and the shares add up to the 8 streams
    shares = {p.name: scraped_requests(p) - scraped[p.name] for p in replicas}
    assert shares == {name: after[name] - before[name] for name in before}
    assert sum(shares.values()) == 8


def test_the_other_gateway_finishes_an_operation_whose_gateway_died(
    cluster: LoopbackCluster,
) -> None:
    this, other = cluster.of("gateway")
    write_domain(cluster.volumes / "sma-home" / "data", "web", synthetic_documents("dl", 60))
    with httpx.Client(base_url=cluster.url(this), headers=ADMIN, timeout=60) as http:
        started = httpx.post(
            f"{cluster.url(other)}/specialists?wait=false",
            json={"name": "web"},
            headers=ADMIN,
            timeout=60,
        )
        assert started.status_code == 202, started.text
        op_id = started.json()["id"]

        def running() -> dict | None:
            op = http.get(f"/operations/{op_id}").json()
            return op if op["job_id"] and op["state"] == "running" else None

        op = wait_for(running, timeout=60, every=0.05)
        assert op["driven_by"].startswith(f"{other.name}@"), op
        cluster.kill(other)  # SIGKILL, mid-operation: its lease is never released
        assert http.get(f"/operations/{op_id}").json()["state"] == "running"

        def finished() -> dict | None:
            op = http.get(f"/operations/{op_id}").json()
            return op if op["state"] not in ("pending", "running") else None

        op = wait_for(finished, timeout=240, every=0.1)
        assert op["state"] == "succeeded", op
        taken = f"driving operation {op_id} (its lease by {other.name}@"
        assert taken in this.log.read_text(), cluster.tails([this])
        version = http.get("/health").json()["serving_version"]
        assert op["version"] == version and "web" in http.get("/specialists").json()
    with grpc.insecure_channel(cluster.address(cluster.of("training")[0])) as channel:
        jobs = training_pb2_grpc.TrainingStub(channel).ListJobs(
            training_pb2.ListJobsRequest(), metadata=KEY
        )
    assert [j.request_id for j in jobs.jobs if j.specialist == "web"] == [op_id]  # one job
    assert {info(cluster, p).version_id for p in cluster.of("inference")} == {version}

    cluster.restart(other)  # the kubelet brings it back; it serves, and drives nothing twice
    cluster.wait_ready([other], timeout=60)


def test_a_gateway_told_to_stop_hands_its_operation_on_at_once(cluster: LoopbackCluster) -> None:
    """SIGTERM (a rolling update, a drain): the stopping gateway cuts its lease short, so the
    other drives the add at its next look rather than when the lease would have run out."""
    this, other = cluster.of("gateway")
    if not other.alive():
        cluster.restart(other)
        cluster.wait_ready([other], timeout=60)
    write_domain(cluster.volumes / "sma-home" / "data", "docs", synthetic_documents("ds", 60))
    started = httpx.post(
        f"{cluster.url(other)}/specialists?wait=false",
        json={"name": "docs"},
        headers=ADMIN,
        timeout=60,
    )
    op_id = started.json()["id"]
    with httpx.Client(base_url=cluster.url(this), headers=ADMIN, timeout=60) as http:
        wait_for(lambda: http.get(f"/operations/{op_id}").json()["job_id"], every=0.05)
        cluster.kill(other, signal.SIGTERM)
        # the lease is 10 s: a takeover within 5 s of the stop can only be the hand-over
        wait_for(lambda: f"driving operation {op_id}" in this.log.read_text(), timeout=5)
        final = wait_for(
            lambda: (op := http.get(f"/operations/{op_id}").json())["state"] != "running" and op,
            timeout=120,
        )
        assert final["state"] == "succeeded", final
    cluster.restart(other)
    cluster.wait_ready([other], timeout=60)


def test_an_add_is_cancelled_through_a_gateway_that_does_not_drive_it(
    cluster: LoopbackCluster,
) -> None:
    this, other = cluster.of("gateway")
    if not other.alive():  # the test before restarts it, unless it failed first
        cluster.restart(other)
        cluster.wait_ready([other], timeout=60)
    write_domain(cluster.volumes / "sma-home" / "data", "news", synthetic_documents("ds", 60))
    with httpx.Client(base_url=cluster.url(this), headers=ADMIN, timeout=60) as http:
        before = sorted(http.get("/specialists").json())
        op_id = http.post("/specialists?wait=false", json={"name": "news"}).json()["id"]
        wait_for(lambda: http.get(f"/operations/{op_id}").json()["job_id"], every=0.05)
        cancel = f"{cluster.url(other)}/operations/{op_id}/cancel"
        assert httpx.post(cancel, headers=USER, timeout=60).status_code == 403  # admin only
        reply = httpx.post(cancel, headers=ADMIN, timeout=60)
        assert reply.status_code == 200, reply.text
        op = reply.json()
        assert op["state"] == "cancelled" and op["cancel_requested"], op
        assert sorted(http.get("/specialists").json()) == before


def test_a_replica_killed_mid_stream_ends_its_streams_cleanly_and_rejoins(
    cluster: LoopbackCluster,
) -> None:
    gateway = cluster.of("gateway")[0]
    victim = cluster.of("inference")[1]
    url = cluster.url(gateway)
    for _attempt in range(5):
        outcomes, cut = _kill_mid_stream(url, victim, streams=16)
        if cut:
            break
        cluster.restart(victim)  # every stream finished before the freeze: again
        cluster.wait_ready([victim], timeout=120)
    assert cut, "no stream was caught mid-way in five attempts"
    for index, events in outcomes.items():
        assert events[0] == "token", events
        if index in cut:  # a clean error event, after the tokens it had
            assert events[-1] == "error" and events.count("error") == 1, events
        else:
            assert events[-1] == "done", events
    # the next requests are served (by the replica left)
    for _ in range(4):
        reply = httpx.post(
            f"{url}/generate", json={"prompt": "x", "max_new_tokens": 4}, headers=USER
        )
        assert reply.status_code == 200, reply.text

    cluster.restart(victim)
    cluster.wait_ready([victim], timeout=120)
    served = info(cluster, cluster.of("inference")[0]).version_id
    assert info(cluster, victim).version_id == served  # it follows the registry on its own
    wait_for(lambda: _serves(url) and info(cluster, victim).requests_total > 0, timeout=60)


def _kill_mid_stream(url: str, victim: Pod, streams: int) -> tuple[dict[int, list[str]], list[int]]:
    """Start `streams` SSE streams; once each has its first token, freeze the victim's whole
    process group (its "container") and kill it, so that the streams it carries are caught
    mid-way whatever the scheduling. Returns every stream's events and those cut."""
    body = {"prompt": "the list", "max_new_tokens": 60, "ignore_eos": True}
    outcomes: dict[int, list[str]] = {}
    first_tokens = threading.Barrier(streams + 1)

    def stream(index: int) -> None:
        events: list[str] = []
        outcomes[index] = events
        try:
            with httpx.stream("POST", f"{url}/generate/stream", **request(body)) as r:
                for name, _ in sse_events(r):
                    if not events:
                        first_tokens.wait(30)
                    events.append(name)
        except httpx.HTTPError as exc:
            events.append(f"http error {exc!r}")

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(streams)]
    for thread in threads:
        thread.start()
    first_tokens.wait(30)
    assert victim.process is not None
    os.killpg(victim.process.pid, signal.SIGSTOP)
    time.sleep(0.3)
    cut = [i for i, events in outcomes.items() if events[-1] != "done"]
    os.killpg(victim.process.pid, signal.SIGKILL)
    victim.process.wait(30)
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)  # nothing stuck
    return outcomes, cut


def _serves(url: str) -> bool:
    reply = httpx.post(f"{url}/generate", **request({"prompt": "x", "max_new_tokens": 2}))
    return reply.status_code == 200


def test_each_pod_keeps_its_state_where_the_manifests_put_it(cluster: LoopbackCluster) -> None:
    registry = cluster.of("registry")[0]
    assert (cluster.volumes / f"state-{registry.name}" / "registry.db").is_file()
    assert not (cluster.volumes / "sma-home" / "state").exists()  # not on the shared claim
    for pod in (*cluster.of("gateway"), *cluster.of("inference")):
        assert list(cluster.files(pod)) == [], pod.name  # nothing outside volumes and /tmp
