"""What every gRPC server of the stack shares: error mapping, health, reflection, shutdown.

Servicers stay thin over a core object. Their methods are wrapped with `@rpc`, which turns the
library's typed errors into gRPC status codes with the error's message, in one place:

    class RegistryServicer(registry_pb2_grpc.RegistryServicer):
        @rpc
        async def GetSpecialist(self, request, context): ...

`serve()` runs a `grpc.aio` server with `grpc.health.v1` (NOT_SERVING until the service says it
is ready), server reflection, and a graceful stop on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from services.metrics import Continuation, ServerMetrics, with_behaviour
from shiftable_lib import logs
from shiftable_lib.auth import NO_KEYS, Keys, Scope, bearer
from shiftable_lib.config import TLS
from shiftable_lib.errors import (
    AlreadyExists,
    Busy,
    Conflict,
    CorpusInvalid,
    CorpusMissing,
    InvalidName,
    NotFound,
    Overloaded,
    Unavailable,
    VersionInvalid,
)
from shiftable_lib.sampling import MAX_PROMPT_CHARS

if TYPE_CHECKING:
    from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

log = logging.getLogger("sma.grpc")
E = TypeVar("E", bound=Enum)
Metadata = tuple[tuple[str, str], ...]

# most specific first: AlreadyExists is a Conflict, the corpus errors are ValueError/OSError
_CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (InvalidName, grpc.StatusCode.INVALID_ARGUMENT),
    (CorpusMissing, grpc.StatusCode.INVALID_ARGUMENT),
    (CorpusInvalid, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (Conflict, grpc.StatusCode.FAILED_PRECONDITION),
    (Busy, grpc.StatusCode.FAILED_PRECONDITION),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (VersionInvalid, grpc.StatusCode.DATA_LOSS),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
]


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC code for an exception the library or a core raised on purpose."""
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


def _message(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, KeyError | LookupError) and text.startswith("'") and text.endswith("'"):
        text = text[1:-1]  # KeyError quotes its message
    return text or type(exc).__name__


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    code = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("unexpected error in an RPC")
    await context.abort(code, _message(exc))


def _take_request_id(context: grpc.aio.ServicerContext) -> None:
    """The caller's request id (metadata `x-request-id`) for this call's log lines; each call
    runs in a task of its own, so it ends with the call."""
    for key, value in context.invocation_metadata() or ():
        if key == logs.METADATA_KEY:
            logs.request_id.set(logs.accept_request_id(str(value)))
            return
    logs.request_id.set("-")


def rpc(method: Callable) -> Callable:
    """Map typed errors to gRPC codes for a unary (`async def`) or streaming (`async def` with
    `yield`) servicer method. `context.abort` inside the method passes through untouched."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self, request, context):
            _take_request_id(context)
            try:
                async for item in method(self, request, context):
                    yield item
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:
                await _abort(context, exc)

        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        _take_request_id(context)
        try:
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await _abort(context, exc)

    return unary


@dataclass
class Service:
    """One gRPC service a server hosts: its full name, the generated `add_*_to_server` and the
    servicer instance."""

    name: str  # e.g. "sma.v1.Registry"
    add_to_server: Callable[[object, grpc.aio.Server], None]
    servicer: object
    admin: frozenset[str] = frozenset()  # methods that change state: an admin key's only


@dataclass
class Server:
    """A running server: flip health to SERVING with `ready()`; `stopping` is set on shutdown."""

    grpc_server: grpc.aio.Server
    health: HealthServicer
    names: list[str]
    port: int
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def ready(self, serving: bool = True) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.names):
            await self.health.set(name, status)


# The largest request any service takes is a Generate of MAX_PROMPT_CHARS characters (at most 4
# bytes each in UTF-8) with its parameters: anything larger is refused before it is read whole.
MAX_REQUEST_BYTES = 4 * MAX_PROMPT_CHARS + 64 * 1024


class RequireKey(grpc.aio.ServerInterceptor):
    """Every call but health and reflection must present an API key (`authorization: Bearer
    <key>` metadata) of the method's scope: UNAUTHENTICATED without a valid key,
    PERMISSION_DENIED for a user key on an admin method."""

    OPEN = ("/grpc.health.v1.Health/", "/grpc.reflection.")

    def __init__(self, keys: Keys, services: list[Service]) -> None:
        self.keys = keys
        self.admin = {f"/{s.name}/{m}" for s in services for m in s.admin}

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(self.OPEN):
            return handler
        metadata = dict(details.invocation_metadata or ())
        needed = Scope.ADMIN if details.method in self.admin else Scope.USER
        refusal = self.keys.check(metadata.get("authorization"), needed)
        if refusal is None:
            return handler
        code = (
            grpc.StatusCode.PERMISSION_DENIED
            if refusal.forbidden
            else grpc.StatusCode.UNAUTHENTICATED
        )
        return _refusing(handler, code, refusal.message)


def _refusing(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that aborts every call with `code`."""

    async def unary(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    async def streaming(request: object, context: grpc.aio.ServicerContext) -> AsyncIterator:
        await context.abort(code, message)
        yield  # a generator, as a streaming handler must be

    return with_behaviour(handler, unary, streaming)


def key_metadata(keys: Keys) -> Metadata:
    """What a service presents when it calls another: the first admin key, if any."""
    return (("authorization", bearer(keys.internal)),) if keys.internal else ()


def dial(
    target: str,
    tls: TLS | None = None,
    options: Sequence[tuple[str, Any]] = (),
    interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
) -> grpc.aio.Channel:
    """A channel to another service of the stack: TLS when the stack runs with TLS (trusting
    `tls.ca`, else the system's roots), presenting this process's certificate for mutual TLS."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    credentials = grpc.ssl_channel_credentials(**tls.client())
    return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)


async def start_server(
    address: str,
    services: list[Service],
    options: Sequence[tuple[str, Any]] = (),
    keys: Keys = NO_KEYS,
    tls: TLS | None = None,
    metrics: ServerMetrics | None = None,
) -> Server:
    """Bind and start a server with health (NOT_SERVING) and reflection for `services`;
    `options` adds to or overrides the gRPC server's channel arguments. With `keys`, every
    call but health and reflection needs an API key (RequireKey). With `tls`, it takes only
    TLS connections, and with `tls.client_auth` only from clients whose certificate `tls.ca`
    signed. With `metrics`, every call is counted and timed there (refused ones too)."""
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if metrics is not None:  # first: it sees what the others make of a call
        interceptors.append(metrics.interceptor())
    if keys.enabled:
        interceptors.append(RequireKey(keys, services))
    server = grpc.aio.server(
        interceptors=interceptors or None,
        options=[
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
            ("grpc.so_reuseport", 0),  # a second server on a taken port must fail, not share it
            *options,
        ],
    )
    for service in services:
        service.add_to_server(service.servicer, server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = [s.name for s in services]
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection([*names, health_name, reflection.SERVICE_NAME], server)
    if tls is None:
        port = server.add_insecure_port(address)
    else:
        credentials = grpc.ssl_server_credentials(
            [(tls.key, tls.cert)],
            root_certificates=tls.ca if tls.client_auth else None,
            require_client_auth=tls.client_auth,
        )
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    await server.start()
    running = Server(server, health, names, port)
    await running.ready(False)
    return running


async def serve(
    address: str,
    services: list[Service],
    start: Callable[[Server], Awaitable[None]] | None = None,
    stop: Callable[[], Awaitable[None]] | None = None,
    grace_s: float = 5.0,
    options: Sequence[tuple[str, Any]] = (),
    keys: Keys = NO_KEYS,
    tls: TLS | None = None,
    metrics: ServerMetrics | None = None,
) -> None:
    """Run until SIGTERM/SIGINT: start the server, await `start(server)` (which calls
    `server.ready()` when the service can answer), then on a signal report NOT_SERVING, stop
    taking RPCs, give in-flight ones `grace_s` seconds and await `stop()`. A `start` that
    raises stops the server the same way and exits non-zero, so a supervisor restarts it."""
    server = await start_server(address, services, options, keys, tls, metrics)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stopping.set)
    log.info("%s listening on %s", ", ".join(server.names), address)
    starter = asyncio.create_task(start(server)) if start else None
    failed: list[BaseException] = []
    if starter is not None:

        def check(task: asyncio.Task) -> None:  # a start-up that fails ends the process
            if not task.cancelled() and task.exception() is not None:
                log.error("service start-up failed", exc_info=task.exception())
                failed.append(task.exception())
                server.stopping.set()

        starter.add_done_callback(check)
    if start is None:
        await server.ready()
    await server.stopping.wait()
    log.info("shutting down %s", ", ".join(server.names))
    await server.health.enter_graceful_shutdown()
    if starter is not None and not starter.done():
        starter.cancel()
    await server.grpc_server.stop(grace_s)
    if stop is not None:
        await stop()
    if failed:  # non-zero, so that a supervisor restarts it
        raise SystemExit(f"start-up failed: {failed[0]}")


class EnumMap(Generic[E]):
    """A core's Python enum and its proto twin, matched by member name
    (`READY` <-> `SPECIALIST_STATE_READY`, `TRAIN_ALL` <-> `JOB_KIND_TRAIN_ALL`)."""

    def __init__(self, ours: type[E], proto: EnumTypeWrapper) -> None:
        self.ours, self.proto = ours, proto
        self.prefix = proto.Name(0).removesuffix("UNSPECIFIED")

    def to_proto(self, value: E) -> int:
        return self.proto.Value(self.prefix + value.name)

    def from_proto(self, value: int) -> E | None:
        """None for UNSPECIFIED; ValueError (INVALID_ARGUMENT) for a number the proto lacks."""
        return None if value == 0 else self.ours[self.proto.Name(value).removeprefix(self.prefix)]

    def required(self, value: int, what: str) -> E:
        """The member for `value`; ValueError naming the choices when it is UNSPECIFIED or
        unknown."""
        member = self.from_proto(value) if value in self.proto.values() else None
        if member is None:
            choices = ", ".join(name.removeprefix(self.prefix) for name in self.proto.keys()[1:])
            raise ValueError(f"{what} is required: one of {choices} (got {value})")
        return member


def timestamp(moment: datetime | None) -> Timestamp | None:
    """A datetime as a protobuf Timestamp (None stays unset)."""
    if moment is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def run(main: Awaitable[None]) -> None:
    """Entry point of a `sma serve` process (`sma serve` has configured its logging)."""
    asyncio.run(main)
