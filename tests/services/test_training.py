"""The training service in-process over loopback gRPC: real jobs in real child processes on
tiny synthetic corpora (profile "tiny"), as the gateway drives them."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import Server, start_server
from services.training import child
from services.training.child import Reporter
from services.training.core import JobManager
from services.training.job import Job
from services.training.progress import FractionEstimate
from services.training.server import SERVICE_NAME, training_service
from shiftable_lib import plan, versions
from shiftable_lib.config import Settings, get_profile
from shiftable_lib.corpus import corpus_digest
from shiftable_lib.plan import PlannedPhase
from shiftable_lib.train import Progress
from sma.v1 import training_pb2 as T
from sma.v1 import training_pb2_grpc
from tests.conftest import synthetic_documents, torchrun_ranks, write_domain
from tests.lib.test_plan import base_first_start

FINISHED = (T.JOB_STATE_SUCCEEDED, T.JOB_STATE_FAILED, T.JOB_STATE_CANCELLED)
LONG_RECALIBRATION = 1_000_000  # gate steps: a REMOVE job that runs until it is stopped


class Harness:
    """A training server on its own event-loop thread, and a blocking client for it."""

    def __init__(self, home: Path, **overrides) -> None:
        settings = Settings(home=home, profile="tiny", device="cpu", train_threads=1, **overrides)
        self.home = home
        self.models = settings.models_dir
        self.manager = JobManager(settings)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: Server = self._call(self._start())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.server.port}")
        self.stub = training_pb2_grpc.TrainingStub(self.channel)

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=60)

    async def _start(self) -> Server:
        server = await start_server("127.0.0.1:0", [training_service(self.manager)])
        self.manager.start()
        await server.ready()
        return server

    async def _job(self, job_id: str) -> Job:
        return self.manager.get(job_id)

    async def _stop(self) -> None:
        await self.server.grpc_server.stop(0)
        await self.manager.close()

    def pid(self, job_id: str) -> int:
        pid = self._call(self._job(job_id)).pid
        assert pid is not None
        return pid

    def start(self, kind: int, **fields) -> T.Job:
        return self.stub.StartJob(T.StartJobRequest(kind=kind, **fields), timeout=10).job

    def get(self, job_id: str) -> T.Job:
        return self.stub.GetJob(T.GetJobRequest(id=job_id), timeout=10).job

    def version(self, version_id: str = "") -> T.GetVersionResponse:
        return self.stub.GetVersion(T.GetVersionRequest(id=version_id), timeout=10)

    def wait(self, job_id: str, until: Callable[[T.Job], bool], timeout: float = 60) -> T.Job:
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if until(job):
                return job
            assert job.state not in FINISHED, f"{job_id} ended early: {job}"
            assert time.monotonic() < deadline, f"timed out waiting on {job}"
            time.sleep(0.05)

    def wait_finished(self, job_id: str) -> T.Job:
        deadline = time.monotonic() + 90
        while (job := self.get(job_id)).state not in FINISHED:
            assert time.monotonic() < deadline, f"timed out waiting on {job}"
            time.sleep(0.05)
        return job

    def close(self) -> None:
        self.channel.close()
        self._call(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@contextlib.contextmanager
def serving(home: Path, **overrides) -> Iterator[Harness]:
    harness = Harness(home, **overrides)
    try:
        yield harness
    finally:
        harness.close()


def copy_home(source: Path, target: Path) -> Path:
    """A private copy of a trained home, for a test that changes it."""
    return Path(shutil.copytree(source, target / "home"))


def store(models: Path) -> tuple[list[str], str | None, list[str]]:
    """Versions, the CURRENT pointer and leftovers: what a job that did not succeed must keep."""
    pointer = (models / versions.CURRENT).read_text().strip()
    leftovers = sorted(p.name for p in models.iterdir() if ".tmp-" in p.name)
    return versions.version_ids(models), pointer, leftovers


@dataclass
class Trained:
    home: Path
    harness: Harness
    job: T.Job
    events: list[T.Job]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Iterator[Trained]:
    """A home trained by one TRAIN_ALL job (generalist + ds + dl), watched from its start; the
    server stays up for the tests that only read."""
    home = tmp_path_factory.mktemp("trained")
    for name in ("general", "ds", "dl"):
        write_domain(home / "data", name, synthetic_documents(name, 40))
    with serving(home) as harness:
        job = harness.start(T.JOB_KIND_TRAIN_ALL)
        events = [r.job for r in harness.stub.WatchJob(T.WatchJobRequest(id=job.id), timeout=120)]
        yield Trained(home, harness, harness.get(job.id), events)


def test_train_all_publishes_a_version_and_streams_rising_progress(trained: Trained):
    job, events = trained.job, trained.events
    assert job.state == T.JOB_STATE_SUCCEEDED, job.error
    assert job.version_id == "v0002"  # the generalist, then the specialists on it
    models = trained.home / "artifacts" / "models"
    assert store(models) == (["v0001", "v0002"], "v0002", [])
    config = versions.version_config(models, "v0002")
    assert config["model"]["specialists"] == ["dl", "ds"]
    version = trained.harness.version(job.version_id).version
    assert version.metrics_json == (models / "v0002" / "metrics.json").read_text()
    assert set(json.loads(version.metrics_json)["domains"]) == {"general", "ds", "dl"}
    assert job.created_at.ToDatetime() <= job.started_at.ToDatetime()
    assert job.started_at.ToDatetime() <= job.finished_at.ToDatetime()

    assert events[-1].state == T.JOB_STATE_SUCCEEDED
    fractions = [e.progress.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    running = [e for e in events if e.state == T.JOB_STATE_RUNNING]
    assert len({e.progress.fraction for e in running}) >= 5
    assert all(0 <= e.progress.fraction < 1 for e in running)
    phases = {e.progress.phase for e in running}
    assert {"tokenizer", "generalist", "specialist:ds", "specialist:dl", "gate"} <= phases
    assert "evaluate" in phases
    assert_generalist_reported_while_running(running)


def assert_generalist_reported_while_running(running: list[T.Job]) -> None:
    """The generalist, written and current, is named while the specialists train (it can
    serve meanwhile), and not before it exists."""
    named = [e for e in running if e.version_id]
    assert named and {e.version_id for e in named} == {"v0001"}
    assert not {"tokenizer", "generalist"} & {e.progress.phase for e in named}
    first = running.index(named[0])
    assert all(e.version_id == "v0001" for e in running[first:])


def test_health_is_serving(trained: Trained):
    health = health_pb2_grpc.HealthStub(trained.harness.channel)
    for service in ("", SERVICE_NAME):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    ("request_fields", "says"),
    [
        ({"kind": T.JOB_KIND_UNSPECIFIED}, "kind"),
        ({"kind": 99}, "kind"),
        ({"kind": T.JOB_KIND_ADD_SPECIALIST, "specialist": "../etc"}, "invalid specialist"),
        ({"kind": T.JOB_KIND_REMOVE_SPECIALIST, "specialist": ""}, "invalid specialist"),
        ({"kind": T.JOB_KIND_ADD_SPECIALIST, "specialist": "nothere"}, "no corpus folder"),
        ({"kind": T.JOB_KIND_TRAIN_ALL, "profile": "huge"}, "unknown profile"),
        ({"kind": T.JOB_KIND_REMOVE_SPECIALIST, "specialist": "ds", "recalibrate_steps": -1}, ">="),
    ],
)
def test_bad_requests_are_invalid_and_create_no_job(trained: Trained, request_fields, says):
    stub = trained.harness.stub
    before = stub.ListJobs(T.ListJobsRequest(), timeout=5).jobs
    with pytest.raises(grpc.RpcError) as caught:
        stub.StartJob(T.StartJobRequest(**request_fields), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert says in caught.value.details()
    assert stub.ListJobs(T.ListJobsRequest(), timeout=5).jobs == before


def test_unknown_and_finished_jobs(trained: Trained):
    stub = trained.harness.stub
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetJob(T.GetJobRequest(id="job-000000000000"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as caught:
        stub.CancelJob(T.CancelJobRequest(id="job-000000000000"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    cancelled = stub.CancelJob(T.CancelJobRequest(id=trained.job.id), timeout=5).job
    assert cancelled == trained.job  # a finished job is left as it is


def test_get_version_reads_the_current_or_a_named_version_from_disk(trained: Trained):
    harness, models = trained.harness, trained.home / "artifacts" / "models"
    current = harness.version()
    assert current == harness.version("v0002")
    version = current.version
    assert (version.id, version.profile) == ("v0002", "tiny")
    assert list(version.specialists) == ["dl", "ds"]
    assert Path(version.artifact_dir) == models / "v0002"
    assert version.metrics_json == (models / "v0002" / "metrics.json").read_text()
    assert version.created_at.ToDatetime() <= trained.job.finished_at.ToDatetime()
    data = trained.home / "data"
    assert current.corpus_digests == {n: corpus_digest(data / n) for n in ("general", "dl", "ds")}
    generalist = harness.version("v0001")
    assert list(generalist.version.specialists) == []
    assert generalist.corpus_digests == {"general": corpus_digest(data / "general")}
    for unknown in ("v0099", "../v0001", "latest"):
        with pytest.raises(grpc.RpcError) as caught:
            harness.version(unknown)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_describe_corpus_and_get_version_on_a_home_with_no_model(tmp_path: Path):
    """DescribeCorpus reads every file before an add records anything: untrusted corpora (a
    link out of data/, for a folder or a file; bytes that are not UTF-8; blank text) are
    refused naming what is wrong."""
    data = tmp_path / "data"
    folder = write_domain(data, "ds", synthetic_documents("ds", 5))
    (folder / "notes.md").write_text("not a corpus file")
    (folder / "empty.txt").write_text("")
    (data / "emptyone").mkdir()
    outside = write_domain(tmp_path / "elsewhere", "secret", ["private text, not a corpus"])
    (data / "linked").symlink_to(outside, target_is_directory=True)
    (data / "leaky").mkdir()
    (data / "leaky" / "ok.txt").write_text("fine text")
    (data / "leaky" / "passwd.txt").symlink_to(outside / "corpus.txt")
    (data / "inside").mkdir()
    (data / "inside" / "same.txt").symlink_to(folder / "corpus.txt")  # a link within data/
    (data / "latin").mkdir()
    (data / "latin" / "a.txt").write_bytes(b"caf\xe9 au lait")
    (data / "blank").mkdir()
    (data / "blank" / "a.txt").write_text("  \n\n \t\n")
    with serving(tmp_path) as harness:
        corpus = harness.stub.DescribeCorpus(T.DescribeCorpusRequest(name="ds"), timeout=5).corpus
        assert (corpus.name, Path(corpus.dir), corpus.files) == ("ds", folder, 1)
        assert corpus.bytes == (folder / "corpus.txt").stat().st_size
        inside = harness.stub.DescribeCorpus(T.DescribeCorpusRequest(name="inside"), timeout=5)
        assert inside.corpus.files == 1
        for name, says in [
            ("../etc", "invalid specialist name"),
            ("nothere", "no corpus folder for 'nothere': create"),
            ("emptyone", "holds no text"),
            ("linked", "linked links outside"),
            ("leaky", "passwd.txt links outside"),
            ("latin", "a.txt is not valid UTF-8 text (byte 3)"),
            ("blank", "holds no text"),
        ]:
            with pytest.raises(grpc.RpcError) as caught:
                harness.stub.DescribeCorpus(T.DescribeCorpusRequest(name=name), timeout=5)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert says in caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:
            harness.version()
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no model version yet" in caught.value.details()


def test_add_specialist_publishes_a_version_with_it(trained: Trained, tmp_path: Path):
    home = copy_home(trained.home, tmp_path)
    write_domain(home / "data", "extra", synthetic_documents("dl", 40, seed=1))
    # the kept branches were trained on their corpora as they were: the add hashes only its own
    (home / "data" / "ds" / "later.txt").write_text("written after ds was trained\n")
    with serving(home) as harness:
        parent = harness.version()
        job = harness.start(T.JOB_KIND_ADD_SPECIALIST, specialist="extra")
        assert job.specialist == "extra"
        job = harness.wait_finished(job.id)
        added = harness.version()
    assert job.state == T.JOB_STATE_SUCCEEDED, job.error
    assert job.version_id == "v0003" and job.progress.fraction == 1.0
    assert "'extra' added" in job.message
    assert added.version.id == "v0003" and added.version.specialists == ["dl", "ds", "extra"]
    assert store(harness.models) == (["v0001", "v0002", "v0003"], "v0003", [])
    assert added.corpus_digests == {
        **parent.corpus_digests,
        "extra": corpus_digest(home / "data" / "extra"),
    }
    assert set(parent.corpus_digests) == {"general", "dl", "ds"}


def test_jobs_queue_in_order_and_cancel_changes_nothing(trained: Trained, tmp_path: Path):
    home = copy_home(trained.home, tmp_path)
    with serving(home) as harness:
        before = store(harness.models)
        first = harness.start(
            T.JOB_KIND_REMOVE_SPECIALIST, specialist="ds", recalibrate_steps=LONG_RECALIBRATION
        )
        second = harness.start(T.JOB_KIND_ADD_SPECIALIST, specialist="dl", request_id="op-2")
        third = harness.start(T.JOB_KIND_TRAIN_SPECIALISTS)
        assert first.state == T.JOB_STATE_RUNNING
        assert second.state == third.state == T.JOB_STATE_QUEUED
        # a repeated start with the same request id (a gateway taking over) starts nothing
        again = harness.start(T.JOB_KIND_ADD_SPECIALIST, specialist="dl", request_id="op-2")
        assert (again.id, again.request_id) == (second.id, "op-2")
        with pytest.raises(grpc.RpcError) as other:
            harness.start(T.JOB_KIND_REMOVE_SPECIALIST, specialist="dl", request_id="op-2")
        assert other.value.code() == grpc.StatusCode.ALREADY_EXISTS
        listed = harness.stub.ListJobs(T.ListJobsRequest(), timeout=5).jobs
        assert [j.id for j in listed] == [first.id, second.id, third.id]

        dropped = harness.stub.CancelJob(T.CancelJobRequest(id=second.id), timeout=5).job
        assert dropped.state == T.JOB_STATE_CANCELLED and not dropped.HasField("started_at")
        again = harness.start(T.JOB_KIND_ADD_SPECIALIST, specialist="dl", request_id="op-2")
        assert (again.id, again.state) == (second.id, T.JOB_STATE_CANCELLED)

        harness.wait(first.id, lambda j: j.progress.phase == "gate")
        stopped = harness.stub.CancelJob(T.CancelJobRequest(id=first.id), timeout=15).job
        assert stopped.state == T.JOB_STATE_CANCELLED and stopped.version_id == ""
        assert store(harness.models) == before
        assert (home / "data" / "ds").is_dir()  # REMOVE moves the corpus only once published

        # the queue goes on: nothing changed since the last training, so nothing is published
        last = harness.wait_finished(third.id)
        assert last.state == T.JOB_STATE_SUCCEEDED, last.error
        assert last.version_id == "" and "up to date" in last.message
        assert store(harness.models) == before


def test_a_killed_child_fails_the_job_and_leaves_the_store_as_it_was(
    trained: Trained, tmp_path: Path
):
    home = copy_home(trained.home, tmp_path)
    with serving(home) as harness:
        before = store(harness.models)
        job = harness.start(
            T.JOB_KIND_REMOVE_SPECIALIST, specialist="ds", recalibrate_steps=LONG_RECALIBRATION
        )
        harness.wait(job.id, lambda j: j.progress.phase == "gate")
        # what a writer killed mid-publish leaves: a temporary folder, or a complete version
        # that CURRENT never pointed at
        (harness.models / ".tmp-v0003-12345").mkdir()
        (harness.models / ".tmp-v0003-12345" / "model.safetensors").write_bytes(b"partial")
        shutil.copytree(harness.models / "v0002", harness.models / "v0003")
        os.kill(harness.pid(job.id), signal.SIGKILL)
        job = harness.wait_finished(job.id)
        assert job.state == T.JOB_STATE_FAILED
        assert "killed by signal 9" in job.error and "SIGKILL" in job.error
        assert job.version_id == ""
        assert store(harness.models) == before
        assert (home / "data" / "ds").is_dir()
        # the server is fine: the next job runs, and a job the library refuses fails with its
        # reason
        refused = harness.start(T.JOB_KIND_REMOVE_SPECIALIST, specialist="nosuch")
        refused = harness.wait_finished(refused.id)
        assert refused.state == T.JOB_STATE_FAILED
        assert refused.error == "no specialist named 'nosuch'"
        assert store(harness.models) == before


def test_a_first_start_killed_after_naming_its_generalist_keeps_it(tmp_path: Path):
    """The generalist a TRAIN_ALL job named while it ran may serve already: a job killed later,
    even once CURRENT points past it (killed between its last version's publish and its
    report), keeps it, and names the version CURRENT points at."""
    home = tmp_path / "home"
    for name in ("general", "ds"):
        write_domain(home / "data", name, synthetic_documents(name, 40))
    with serving(home) as harness:
        job = harness.start(T.JOB_KIND_TRAIN_ALL)
        watch = harness.stub.WatchJob(T.WatchJobRequest(id=job.id), timeout=120)
        named = next(r.job for r in watch if r.job.version_id)
        pid = harness.pid(job.id)
        os.kill(pid, signal.SIGSTOP)  # in its specialists' training, the generalist written
        assert named.state == T.JOB_STATE_RUNNING and named.version_id == "v0001"
        # what the child leaves between writing its last version and reporting it
        shutil.copytree(harness.models / "v0001", harness.models / "v0002")
        versions.set_current(harness.models, "v0002")
        os.kill(pid, signal.SIGKILL)
        job = harness.wait_finished(job.id)
        assert job.state == T.JOB_STATE_FAILED and "SIGKILL" in job.error
        assert job.version_id == "v0002" and "before it stopped" in job.message
        assert store(harness.models) == (["v0001", "v0002"], "v0002", [])


def test_train_specialists_needs_a_generalist(tmp_path: Path):
    write_domain(tmp_path / "data", "general", synthetic_documents("general", 5))
    with serving(tmp_path) as harness:
        with pytest.raises(grpc.RpcError) as caught:
            harness.start(T.JOB_KIND_TRAIN_SPECIALISTS)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "TRAIN_ALL" in caught.value.details()
        assert not harness.stub.ListJobs(T.ListJobsRequest(), timeout=5).jobs


def test_fraction_is_monotonic_when_an_estimate_is_corrected():
    estimate = FractionEstimate(
        [
            PlannedPhase("specialist:a", 10),
            PlannedPhase("gate", 10),
            PlannedPhase("evaluate", reported=False),
        ]
    )
    seen = [estimate.update("specialist:a", 5, 10, 1.0)]  # a second of it: not timed yet
    seen.append(estimate.update("specialist:a", 10, 10, 10.0))
    assert estimate.enter_unreported(10.0) is None  # the gate is reported by the library
    seen.append(estimate.update("gate", 1, 100, 11.0))  # the gate runs far longer than planned
    seen.append(estimate.update("gate", 100, 100, 60.0))
    assert estimate.enter_unreported(60.0) == "evaluate"
    seen.append(estimate.fraction)
    assert seen == sorted(seen) and 0.3 < seen[0] < 0.5  # half the steps of a cheaper phase
    assert seen[-1] > 0.9 and estimate.eta_s < 10
    assert estimate.update("unplanned", 1, 1, 61.0) == seen[-1]


def test_one_eta_for_the_whole_job_agrees_with_its_fraction():
    """The ETA is the whole job's, from each kind of step's own time: after a branch whose
    steps take a second, it foresees a gate whose steps take 0.4 s, within a fifth."""
    estimate = FractionEstimate(
        [PlannedPhase("specialist:a", 10), PlannedPhase("gate", 100), PlannedPhase("evaluate")],
        now=0.0,
    )
    seen, now = [], 0.0
    for phase, steps, seconds in (("specialist:a", 10, 1.0), ("gate", 100, 0.4)):
        for step in range(1, steps + 1):
            now += seconds
            estimate.update(phase, step, steps, now)
            seen.append((now, estimate.fraction, estimate.eta_s))
    fractions = [f for _, f, _ in seen]
    assert fractions == sorted(fractions)
    for elapsed, fraction, eta in seen:
        assert eta == pytest.approx(elapsed * (1 - fraction) / fraction)
    after_branch = seen[9][2]
    assert after_branch == pytest.approx(40, rel=0.2)  # the gate's 40 s, and evaluation
    etas = [eta for _, _, eta in seen[10:]]
    assert all(b <= a + 1.0 for a, b in itertools.pairwise(etas))  # only ever down
    assert etas[-1] < 0.15 * now


def test_a_first_start_on_a_base_does_not_show_its_demo_corpus_as_half_the_job(tmp_path: Path):
    """Its first plan once held only the demo corpus and the import, so the demo corpus built
    was 50% and the percentage stayed there until the specialists' real estimate passed it
    (for hours on a CPU). Replayed with the phases' times of a start on one H200."""
    estimate = FractionEstimate(base_first_start(tmp_path), now=0.0)
    seen = [estimate.update(plan.DEMO_CORPUS, 1, 1, 4.4)]
    seen.append(estimate.update(plan.IMPORT, 1, 1, 15.2))
    assert seen[0] < 0.15 and seen[1] < 0.3


def test_a_large_bases_first_start_on_a_cpu_foresees_its_hours(tmp_path: Path):
    """On a CPU a base's steps take far longer than the profile's own model's: with its steps
    priced by its size, the demo corpus and the import are a small part of the plan, so the
    percentage does not run ahead of the hours its specialists take and hold there. Replayed:
    a base of 20 times the profile's weights, the demo corpus 4 s, the import 8 s, then each
    branch step 40 s."""
    phases = base_first_start(tmp_path, base_bytes=20 * plan.profile_bytes(get_profile("tiny")))
    estimate = FractionEstimate(phases, now=0.0)
    estimate.update(plan.DEMO_CORPUS, 1, 1, 4.0)
    after_import = estimate.update(plan.IMPORT, 1, 1, 12.0)
    branch = next(p for p in phases if p.name.startswith(plan.SPECIALIST_PREFIX))
    now = 12.0
    for step in range(1, 11):
        now += 40.0
        estimate.update(branch.name, step, branch.steps, now)
    work = sum(p.steps for p in phases) * 40.0  # every step at a branch step's cost, at least
    assert after_import < 0.05
    assert estimate.fraction < 2 * now / (now + work)


class Pipe(list):
    def send(self, message: object) -> None:
        self.append(message)


def test_the_reporter_follows_the_plans_the_job_makes_between_phases(
    monkeypatch: pytest.MonkeyPatch,
):
    sent = Pipe()
    Reporter(sent).plan(plan.plan_remove_specialist(recalibrate_steps=0))
    assert [(p.phase, p.fraction) for p in sent] == [("evaluate", 0.0)]  # nothing reports first

    clock = itertools.count()  # a second between reports: the rates are the phases' own
    monkeypatch.setattr(child, "time", SimpleNamespace(monotonic=lambda: float(next(clock))))
    sent = Pipe()
    reporter = Reporter(sent)
    generalist = [PlannedPhase(plan.TOKENIZER), PlannedPhase(plan.GENERALIST, 40)]
    reporter.plan([PlannedPhase(plan.DEMO_CORPUS), *generalist])
    for step in (0, 1):
        reporter(Progress(plan.DEMO_CORPUS, step, 1, math.nan, 0.0, 0.0))
    branch, gate = PlannedPhase("specialist:ds", 10), PlannedPhase(plan.GATE, 10)
    evaluate = PlannedPhase(plan.EVALUATE, reported=False)
    reporter.plan([*generalist, evaluate, branch, gate, evaluate])  # the demo brought "ds"
    for step in (10, 20, 30, 40):
        reporter(Progress(plan.GENERALIST, step, 40, 2.0, 1.0, 0.0))
    assert [p.phase for p in sent] == [plan.DEMO_CORPUS] * 2 + [plan.GENERALIST] * 4 + [
        plan.EVALUATE
    ]
    assert [p.name for p in reporter.estimate.phases][-3:] == ["specialist:ds", "gate", "evaluate"]
    fractions = [p.fraction for p in sent]
    assert fractions == sorted(fractions) and fractions[-1] < 0.9  # a stage still to come


def test_a_job_over_two_processes_publishes_and_streams_progress(tmp_path: Path):
    home = tmp_path / "home"
    for name in ("general", "ds", "dl"):
        write_domain(home / "data", name, synthetic_documents(name, 40))
    with serving(home, nproc_per_node=2) as harness:
        job = harness.start(T.JOB_KIND_TRAIN_ALL)
        events = [r.job for r in harness.stub.WatchJob(T.WatchJobRequest(id=job.id), timeout=180)]
        job = harness.get(job.id)
        assert job.state == T.JOB_STATE_SUCCEEDED, job.error
        assert store(harness.models) == (["v0001", "v0002"], "v0002", [])
        fractions = [e.progress.fraction for e in events]
        assert fractions == sorted(fractions) and fractions[-1] == 1.0
        running = [e for e in events if e.state == T.JOB_STATE_RUNNING]
        phases = {e.progress.phase for e in running}
        assert {"tokenizer", "generalist", "specialist:ds", "specialist:dl", "gate"} <= phases
        assert_generalist_reported_while_running(running)  # rank 0's report, relayed
        metrics = json.loads(harness.version(job.version_id).version.metrics_json)
        assert metrics["domains"].keys() == {"general", "ds", "dl"}


def test_a_rank_that_dies_fails_the_job_with_the_reason(trained: Trained, tmp_path: Path):
    home = copy_home(trained.home, tmp_path)
    with serving(home, nproc_per_node=2) as harness:
        before = store(harness.models)
        job = harness.start(
            T.JOB_KIND_REMOVE_SPECIALIST, specialist="ds", recalibrate_steps=LONG_RECALIBRATION
        )
        harness.wait(job.id, lambda j: j.progress.phase == "gate", timeout=120)
        os.kill(torchrun_ranks(harness.pid(job.id))[1], signal.SIGKILL)
        job = harness.wait_finished(job.id)
        assert job.state == T.JOB_STATE_FAILED
        assert "torchrun exit" in job.error and "rank 1" in job.error, job.error
        assert "SIGKILL" in job.error or "-9" in job.error, job.error
        assert store(harness.models) == before
