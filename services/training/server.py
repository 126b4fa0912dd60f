"""`sma.v1.Training`: a thin gRPC servicer over `JobManager` (services/training/core.py) and
the home it trains in (corpora and versions on disk, services/training/home.py).

Everything here is translation between protobuf messages and the core's dataclasses; the core
decides what is valid and raises the library's typed errors, which `@rpc` maps to status codes.
Reading the disk runs in a worker thread, so that a slow volume never stalls the watch streams.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import asdict

import grpc
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from services.common import EnumMap, Server, Service, rpc, run, serve, timestamp
from services.metrics import ServerMetrics, expose
from services.training.core import JobManager
from services.training.home import VersionRecord, describe_version
from services.training.job import Job, JobKind, JobState
from shiftable_lib.config import Settings
from shiftable_lib.corpus import Corpus
from shiftable_lib.plan import describe_corpus
from sma.v1 import common_pb2, training_pb2, training_pb2_grpc

SERVICE_NAME = "sma.v1.Training"

KINDS = EnumMap(JobKind, training_pb2.JobKind)
STATES = EnumMap(JobState, training_pb2.JobState)


def job_to_proto(job: Job) -> training_pb2.Job:
    return training_pb2.Job(
        id=job.id,
        kind=KINDS.to_proto(job.kind),
        specialist=job.specialist,
        state=STATES.to_proto(job.state),
        progress=common_pb2.TrainingProgress(**asdict(job.progress)),
        error=job.error,
        version_id=job.version_id,
        message=job.message,
        created_at=timestamp(job.created_at),
        started_at=timestamp(job.started_at),
        finished_at=timestamp(job.finished_at),
        request_id=job.request_id,
    )


def corpus_to_proto(corpus: Corpus) -> training_pb2.Corpus:
    return training_pb2.Corpus(**{**asdict(corpus), "dir": str(corpus.dir)})


def version_to_proto(version: VersionRecord) -> training_pb2.GetVersionResponse:
    return training_pb2.GetVersionResponse(
        version=common_pb2.ModelVersion(
            id=version.id,
            specialists=version.specialists,
            artifact_dir=str(version.artifact_dir),
            metrics_json=version.metrics_json,
            profile=version.profile,
            created_at=timestamp(version.created_at),
        ),
        corpus_digests=version.corpus_digests,
        parent=version.parent,
    )


class TrainingServicer(training_pb2_grpc.TrainingServicer):
    def __init__(self, manager: JobManager) -> None:
        self.manager = manager

    @rpc
    async def StartJob(
        self, request: training_pb2.StartJobRequest, context: grpc.aio.ServicerContext
    ) -> training_pb2.StartJobResponse:
        job = self.manager.submit(
            KINDS.required(request.kind, "job kind"),
            specialist=request.specialist,
            profile=request.profile,
            recalibrate_steps=request.recalibrate_steps,
            request_id=request.request_id,
            base_version=request.base_version,
            max_drift=request.max_drift if request.HasField("max_drift") else None,
        )
        return training_pb2.StartJobResponse(job=job_to_proto(job))

    @rpc
    async def GetJob(
        self, request: training_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> training_pb2.GetJobResponse:
        return training_pb2.GetJobResponse(job=job_to_proto(self.manager.get(request.id)))

    @rpc
    async def ListJobs(
        self, request: training_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> training_pb2.ListJobsResponse:
        return training_pb2.ListJobsResponse(
            jobs=[job_to_proto(job) for job in self.manager.list_jobs()]
        )

    @rpc
    async def CancelJob(
        self, request: training_pb2.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> training_pb2.CancelJobResponse:
        job = await self.manager.cancel(request.id)
        return training_pb2.CancelJobResponse(job=job_to_proto(job))

    @rpc
    async def WatchJob(
        self, request: training_pb2.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[training_pb2.WatchJobResponse]:
        # a client that cancels cancels this task: the wait inside watch() raises and we stop
        async for job in self.manager.watch(request.id):
            yield training_pb2.WatchJobResponse(job=job_to_proto(job))

    @rpc
    async def DescribeCorpus(
        self, request: training_pb2.DescribeCorpusRequest, context: grpc.aio.ServicerContext
    ) -> training_pb2.DescribeCorpusResponse:
        corpus = await asyncio.to_thread(describe_corpus, self.manager.settings, request.name)
        return training_pb2.DescribeCorpusResponse(corpus=corpus_to_proto(corpus))

    @rpc
    async def GetVersion(
        self, request: training_pb2.GetVersionRequest, context: grpc.aio.ServicerContext
    ) -> training_pb2.GetVersionResponse:
        models_dir = self.manager.settings.models_dir
        return version_to_proto(await asyncio.to_thread(describe_version, models_dir, request.id))


def training_service(manager: JobManager) -> Service:
    return Service(
        SERVICE_NAME,
        training_pb2_grpc.add_TrainingServicer_to_server,
        TrainingServicer(manager),
        admin=frozenset({"StartJob", "CancelJob"}),  # the rest only reads
    )


class TrainingCollector:
    """Jobs finished since the start, the queue, and the running job's progress, read from
    the manager at scrape time (from the metrics thread: it only reads references the event
    loop replaces whole)."""

    def __init__(self, manager: JobManager) -> None:
        self.manager = manager

    def collect(self) -> list[Metric]:
        m = self.manager
        finished = CounterMetricFamily(
            "sma_training_jobs", "jobs finished, by kind and outcome", labels=["kind", "state"]
        )
        for (kind, state), count in m.finished.items():
            finished.add_metric([kind.name.lower(), state.name.lower()], count)
        labels = ["job", "kind", "specialist"]
        fraction = GaugeMetricFamily(
            "sma_training_progress", "fraction done of the running job", labels=labels
        )
        eta = GaugeMetricFamily(
            "sma_training_eta_seconds", "time left of the running job", labels=labels
        )
        speed = GaugeMetricFamily(
            "sma_training_tokens_per_second", "the running job's training speed", labels=labels
        )
        if (job := m.running()) is not None:
            values = [job.id, job.kind.name.lower(), job.specialist]
            fraction.add_metric(values, job.progress.fraction)
            eta.add_metric(values, job.progress.eta_s)
            speed.add_metric(values, job.progress.tokens_per_s)
        queued = GaugeMetricFamily("sma_training_queued_jobs", "jobs waiting to run", m.queued())
        return [finished, fraction, eta, speed, queued]


def main(settings: Settings) -> None:
    """`sma serve training`: serve until SIGTERM/SIGINT, then cancel the jobs."""
    manager = JobManager(settings)
    metrics = ServerMetrics()
    metrics.add(TrainingCollector(manager))
    expose(metrics, settings, "training")

    async def start(server: Server) -> None:
        manager.start()
        await server.ready()

    run(
        serve(
            settings.grpc_bind("training"),
            [training_service(manager)],
            start=start,
            stop=manager.close,
            keys=settings.keys(),
            tls=settings.tls(),
            metrics=metrics,
        )
    )
