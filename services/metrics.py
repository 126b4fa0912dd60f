"""Prometheus metrics of a gRPC server: every call it serves, by method and status code, and
what its service adds (`ServerMetrics.add`), on an HTTP `/metrics` endpoint of its own.

The gRPC series have the names and labels of go-grpc-prometheus (`grpc_server_started_total`,
`grpc_server_handled_total`, `grpc_server_handling_seconds`, `grpc_server_msg_sent_total`), so
dashboards made for any gRPC server read them unchanged. A service's own figures are collected
at scrape time from its core (a `Collector`), so a counter is the core's running total and
nothing has to be kept in step.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.registry import Collector

from shiftable_lib.config import Settings

log = logging.getLogger("sma.metrics")
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]]

# a call's time in its server, from a health check (~0.1 ms) to a long training watch
HANDLING_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300,
)  # fmt: skip


def _kind(handler: grpc.RpcMethodHandler) -> str:
    if handler.unary_unary:
        return "unary"
    if handler.unary_stream:
        return "server_stream"
    if handler.stream_unary:
        return "client_stream"
    return "bidi_stream"


def with_behaviour(
    handler: grpc.RpcMethodHandler,
    unary: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]],
    streaming: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]],
) -> grpc.RpcMethodHandler:
    """A handler of the same kind and (de)serialisers as `handler` that runs `unary` (for a
    unary response) or `streaming` (for a streamed one) instead."""
    shape = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, **shape)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, **shape)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, **shape)
    return grpc.stream_stream_rpc_method_handler(streaming, **shape)


def _behaviour(handler: grpc.RpcMethodHandler) -> Callable:
    return (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )


def _code(context: grpc.aio.ServicerContext, default: grpc.StatusCode) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    return default.name


class ServerMetrics:
    """One server's registry: the process's own series, the gRPC series (fed by
    `interceptor()`), and the service's collectors."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        names = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter(
            "grpc_server_started", "RPCs started on the server", names, registry=r
        )
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, whatever their status",
            [*names, "grpc_code"],
            registry=r,
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "time from an RPC's start to its end on the server (a stream: its whole life)",
            names,
            buckets=HANDLING_BUCKETS,
            registry=r,
        )
        self.sent = Counter(
            "grpc_server_msg_sent", "stream messages sent by the server", names, registry=r
        )

    def add(self, collector: Collector) -> None:
        self.registry.register(collector)

    def interceptor(self) -> grpc.aio.ServerInterceptor:
        return _CountCalls(self)

    def serve(
        self, host: str, port: int, cert: Path | None = None, key: Path | None = None
    ) -> Endpoint:
        """Answer `GET /metrics` on `host:port` (0: any free port; HTTPS with `cert` and `key`)
        from a thread of its own, so that a scrape never waits for the event loop."""
        server, thread = start_http_server(
            port,
            host,
            self.registry,
            certfile=str(cert) if cert else None,
            keyfile=str(key) if key else None,
        )
        log.info("metrics on %s port %d", host, server.server_port)
        return Endpoint(server.server_port, server, thread)


@dataclass
class Endpoint:
    port: int
    server: WSGIServer
    thread: threading.Thread

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@contextlib.contextmanager
def _counted(
    m: ServerMetrics, labels: tuple[str, str, str], context: grpc.aio.ServicerContext
) -> Iterator[None]:
    """Count one call as started, then as handled under the code it ends with, and time it."""
    m.started.labels(*labels).inc()
    started, code = time.perf_counter(), grpc.StatusCode.UNKNOWN.name  # UNKNOWN: a bug
    try:
        yield
        code = _code(context, grpc.StatusCode.OK)
    except (asyncio.CancelledError, GeneratorExit):  # the client left, or the deadline passed
        code = grpc.StatusCode.CANCELLED.name
        raise
    except grpc.aio.AbortError:  # the method (or an interceptor) set the code
        code = _code(context, grpc.StatusCode.UNKNOWN)
        raise
    finally:
        m.handled.labels(*labels, code).inc()
        m.handling.labels(*labels).observe(time.perf_counter() - started)


class _CountCalls(grpc.aio.ServerInterceptor):
    """Counts every call (the ones other interceptors refuse included) and times it."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED itself
            return handler
        behaviour = _behaviour(handler)
        streamed = bool(handler.unary_stream or handler.stream_stream)
        if streamed and not inspect.isasyncgenfunction(behaviour):
            return handler  # a stream written with context.write: not one of ours
        if not streamed and not inspect.iscoroutinefunction(behaviour):
            return handler
        service, _, method = details.method.lstrip("/").rpartition("/")
        labels = (_kind(handler), service, method)
        m = self.metrics

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with _counted(m, labels, context):
                return await behaviour(request, context)

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator:
            sent = m.sent.labels(*labels)
            with _counted(m, labels, context):
                async for item in behaviour(request, context):
                    yield item
                    sent.inc()

        return with_behaviour(handler, unary, streaming)


def expose(metrics: ServerMetrics, settings: Settings, service: str) -> None:
    """Serve `metrics` on `service`'s metrics port (`Settings.metrics_port_of`) for the life of
    the process. A port the user set must be free; a derived one that is taken costs only the
    endpoint, with a warning, never the service."""
    port = settings.metrics_port_of(service)
    if port is None:
        return
    try:
        metrics.serve(settings.host, port, settings.tls_cert, settings.tls_key)
    except OSError as exc:
        if settings.metrics_port:
            raise OSError(f"cannot serve /metrics on {settings.host}:{port}: {exc}") from exc
        log.warning(
            "no /metrics for %s: port %d on %s is taken (%s); set SMA_METRICS_PORT",
            service,
            port,
            settings.host,
            exc,
        )
