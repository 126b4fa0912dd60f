"""Reliability end to end: killed servers come back, unfinished operations resume, a failed
job leaves the old model serving, a second start serves at once, two stacks coexist."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import grpc
import pytest

from sma.v1 import training_pb2 as T
from sma.v1 import training_pb2_grpc
from tests.conftest import synthetic_documents, write_domain
from tests.e2e.conftest import Stack, job_processes, tiny_home, wait_for

pytestmark = pytest.mark.slow


def operation_done(stack: Stack, op_id: str) -> dict | None:
    try:
        op = stack.http.get(f"/operations/{op_id}", timeout=5).json()
    except Exception:  # the gateway is restarting
        return None
    return op if op.get("state") in ("succeeded", "failed", "cancelled") else None


def generates(stack: Stack) -> bool:
    try:
        reply = stack.http.post("/generate", json={"prompt": "the", "max_new_tokens": 3})
    except Exception:
        return False
    return reply.status_code == 200


def first_start_answers(stack: Stack) -> tuple[list[str], list[float]]:
    """Until the first model serves: /generate's 503 messages and /health's first-start %."""
    refusals, progress = [], []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            health = stack.http.get("/health", timeout=5).json()
            reply = stack.http.post("/generate", json={"prompt": "the", "max_new_tokens": 2})
        except Exception:  # the gateway is not listening yet
            time.sleep(0.1)
            continue
        if health["first_start"]:
            progress.append(health["first_start"]["progress"]["percent"])
        if reply.status_code == 200:
            break
        assert reply.status_code == 503, reply.text
        refusals.append(reply.json()["detail"])
        time.sleep(0.1)
    return refusals, progress


def test_a_killed_server_is_restarted_and_the_stack_recovers(stack: Stack) -> None:
    for name in ("inference", "registry"):
        pid = stack.pids()[name]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda name=name, pid=pid: stack.pids()[name] != pid, timeout=30)
        health = stack.wait_ready(60)
        assert health["services"][name]["status"] == "SERVING"
        assert wait_for(lambda: generates(stack), timeout=30)
    assert sorted(stack.http.get("/specialists").json()) == ["dl", "ds"]  # state survived


def test_metrics_answer_while_the_registry_does_not(stack: Stack) -> None:
    """A registry that does not answer (stopped, not dead: nothing restarts it) costs the
    scrape its operations series, not the scrape."""
    stack.wait_ready(60)
    pid = stack.pids()["registry"]
    os.kill(pid, signal.SIGSTOP)
    try:
        reply = stack.http.get("/metrics", timeout=30)
        assert reply.status_code == 200, reply.text
        assert "sma_http_requests_total" in reply.text and "sma_model_loaded 1.0" in reply.text
    finally:
        os.kill(pid, signal.SIGCONT)
    stack.wait_ready(60)


def test_health_says_initialized_only_when_generate_answers(stack: Stack) -> None:
    """A restarted inference server takes a moment to load its model: until it has, /health is
    not initialized and /readyz answers 503, while /livez answers all along."""
    os.kill(stack.pids()["inference"], signal.SIGKILL)
    seen: list[tuple[bool, int, int]] = []  # (initialized, /readyz, /generate), in order
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (seen and seen[-1][0]):
        health = stack.http.get("/health", timeout=5).json()
        ready = stack.http.get("/readyz", timeout=5).status_code
        reply = stack.http.post("/generate", json={"prompt": "the", "max_new_tokens": 2})
        assert stack.http.get("/livez", timeout=5).status_code == 200
        seen.append((health["initialized"], ready, reply.status_code))
        time.sleep(0.05)
    assert seen[-1] == (True, 200, 200), seen[-3:]
    assert (False, 503, 503) in seen, seen[:3]  # the model went with the process
    # the state only moves forward here, so an answer after /health's can only be readier
    assert all((ready, code) == (200, 200) for initialized, ready, code in seen if initialized)


def test_a_gateway_killed_mid_operation_resumes_it(stack: Stack) -> None:
    write_domain(stack.home / "data", "resumed", synthetic_documents("dl", 30, seed=11))
    op = stack.http.post("/specialists?wait=false", json={"name": "resumed"}).json()
    os.kill(stack.pids()["gateway"], signal.SIGKILL)
    final = wait_for(lambda: operation_done(stack, op["id"]), timeout=180)
    assert final["state"] == "succeeded", final
    assert "resumed" in stack.http.get("/specialists").json()
    assert stack.wait_ready(60)["loaded_version"] == final["version"]


def test_a_training_server_killed_mid_job_restarts_the_job(stack: Stack) -> None:
    write_domain(stack.home / "data", "again", synthetic_documents("ds", 30, seed=12))
    op = stack.http.post("/specialists?wait=false", json={"name": "again"}).json()
    wait_for(lambda: stack.http.get(f"/operations/{op['id']}").json()["job_id"], timeout=30)
    os.kill(stack.pids()["training"], signal.SIGKILL)
    final = wait_for(lambda: operation_done(stack, op["id"]), timeout=180)
    assert final["state"] == "succeeded", final
    assert "again" in stack.http.get("/specialists").json()


def test_an_undecodable_corpus_is_refused_before_anything_is_recorded(stack: Stack) -> None:
    folder = stack.home / "data" / "broken"
    folder.mkdir()
    (folder / "bad.txt").write_bytes(b"fine text, then \xff\xfe not utf-8 \xc3\x28" * 50)
    operations = stack.http.get("/operations").json()
    reply = stack.http.post("/specialists", json={"name": "broken"})
    assert reply.status_code == 400
    assert "bad.txt is not valid UTF-8 text (byte 16)" in reply.json()["detail"]
    assert "broken" not in {s["name"] for s in stack.http.get("/v1/specialists").json()}
    assert stack.http.get("/operations").json() == operations  # no operation either


def test_a_failed_job_leaves_the_old_model_serving(stack: Stack) -> None:
    """The training child dies mid-job (SIGKILL): the add fails with the reason, and the model
    that served before serves on."""
    write_domain(stack.home / "data", "doomed", synthetic_documents("dl", 200, seed=9))
    serving = stack.health()["serving_version"]
    op = stack.http.post("/specialists?wait=false", json={"name": "doomed"}).json()
    training = stack.pids()["training"]

    def job_child() -> int | None:
        running = stack.http.get(f"/operations/{op['id']}").json()
        return running["job_id"] and next(iter(job_processes(training)), None)

    os.kill(wait_for(job_child, timeout=60, every=0.05), signal.SIGKILL)
    final = wait_for(lambda: operation_done(stack, op["id"]), timeout=120)
    assert final["state"] == "failed" and "killed by signal 9" in final["error"], final
    detail = {s["name"]: s for s in stack.http.get("/v1/specialists").json()}
    assert detail["doomed"]["state"] == "failed" and "signal 9" in detail["doomed"]["error"]
    assert stack.health()["serving_version"] == serving
    assert "doomed" not in stack.http.get("/specialists").json()
    assert generates(stack)


def test_a_first_start_whose_specialists_fail_serves_its_generalist(tmp_path: Path) -> None:
    """A corpus spoiled while the first start trains its generalist: the specialists fail,
    the operation fails saying why, and the generalist it wrote serves (published as soon as
    it was named, or, had the job ended before the gateway saw it named, after the failure)."""
    home = tiny_home(tmp_path / "home")
    stack = Stack(home).start()
    try:
        listed = home / "state" / "stack.json"  # the children's pids, once they are started
        training = wait_for(lambda: listed.is_file() and stack.pids().get("training"), every=0.02)
        job = wait_for(lambda: next(iter(job_processes(training)), None), timeout=120, every=0.02)
        with grpc.insecure_channel(stack.grpc_address("training")) as channel:
            stub = training_pb2_grpc.TrainingStub(channel)
            (first,) = stub.ListJobs(T.ListJobsRequest(), timeout=10).jobs
            watch = stub.WatchJob(T.WatchJobRequest(id=first.id), timeout=120)
            # a reader may miss a state, not a phase of several reports
            next(r for r in watch if r.job.progress.phase in ("tokenizer", "generalist"))
            os.kill(job, signal.SIGSTOP)  # its corpora read and hashed; not yet the specialists'
        try:
            spoiled = sorted((home / "data" / "ds").glob("*.txt"))[0]
            spoiled.write_bytes(b"caf\xe9 " * 100)  # not UTF-8
        finally:
            os.kill(job, signal.SIGCONT)
        health = stack.wait_ready()
        assert health["serving_version"] == "v0001" and health["specialists"] == []
        (op,) = stack.http.get("/operations").json()
        assert op["kind"] == "initialize" and op["state"] == "failed", op
        assert spoiled.name in op["error"] and "UTF-8" in op["error"], op
        assert generates(stack)
    finally:
        stack.stop()


def test_a_second_start_serves_within_seconds(stack: Stack) -> None:
    serving = stack.health()["serving_version"]
    assert stack.stop() == 0
    again = Stack(stack.home, stack.port).start()
    try:
        started = time.monotonic()
        health = again.wait_ready(60)
        elapsed = time.monotonic() - started
        assert health["serving_version"] == serving
        assert elapsed < 30, f"second start took {elapsed:.1f} s"
        assert generates(again)
    finally:
        again.stop()


def test_a_damaged_serving_version_falls_back_to_the_last_good_one(stack: Stack) -> None:
    """The newest version's weights are truncated while the stack is down: on restart the
    inference server refuses it, marks it invalid in the registry, serves the version before
    it, which serves from then on, and /health and the specialists' records say why. The
    specialist that only the damaged version held is failed with the reason, and adding it
    again builds on what serves."""
    stack.stop()  # after the second-start test: a stack of its own on the same home
    before = Stack(stack.home, stack.port).start()
    damaged = before.wait_ready(90)["serving_version"]
    assert "again" in before.http.get("/specialists").json()  # the add that made `damaged`
    assert before.stop() == 0
    weights = stack.home / "artifacts" / "models" / damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    again = Stack(stack.home, stack.port).start()
    try:
        health = again.wait_ready(90)
        assert health["initialized"] and generates(again)
        good = health["loaded_version"]
        assert good not in (damaged, None) and health["serving_version"] == good
        (replica,) = health["replicas"]
        assert f"cannot load {damaged}" in replica["load_error"]
        assert "bytes, not the" in replica["load_error"]
        assert f"serving {good} instead" in replica["load_error"]
        versions = {v["id"]: v for v in again.http.get("/versions").json()}
        assert "model.safetensors" in versions[damaged]["invalid_reason"]
        assert "again" not in again.http.get("/specialists").json()
        detail = {s["name"]: s for s in again.http.get("/v1/specialists").json()}
        assert detail["again"]["state"] == "failed", detail["again"]
        assert f"model version {damaged} cannot be loaded" in detail["again"]["error"]
        assert "bytes, not the" in detail["again"]["error"]
        assert detail["resumed"]["state"] == "ready"  # the good version holds it

        reply = again.http.post("/specialists", json={"name": "again"}, timeout=180)
        assert reply.status_code == 200, reply.text
        assert "again" in reply.json()["specialists"]
        health = again.wait_ready(60)
        assert health["serving_version"] not in (good, damaged)
        assert health["loaded_version"] == health["serving_version"]
        assert generates(again)
    finally:
        again.stop()


def test_two_stacks_with_different_homes_and_ports_run_side_by_side(tmp_path: Path) -> None:
    first = Stack(tiny_home(tmp_path / "a")).start()
    second = Stack(tiny_home(tmp_path / "b")).start()
    try:
        refusals, progress = first_start_answers(first)
        training = [r for r in refusals if r.startswith("model is training (")]
        assert training, refusals  # before the first-start operation exists: "no model ... yet"
        assert all(r in training or r == "no model is serving yet" for r in refusals), refusals
        assert progress and progress == sorted(progress), progress  # monotonic percentages
        for stack in (first, second):
            stack.wait_ready()
            assert generates(stack)
        assert (
            first.health()["services"]["registry"]["address"]
            != (second.health()["services"]["registry"]["address"])
        )
        taken = Stack(tmp_path / "c", port=first.port)
        (tmp_path / "c").mkdir()
        taken.start()
        assert taken.process is not None and taken.process.wait(30) == 2
        assert "is taken" in taken.log.read_text()
    finally:
        first.stop()
        second.stop()
