"""The gateway's gRPC clients: one channel per service, its stub, and its health.

gRPC status codes become HTTP statuses in one place (`http_status`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shiftable_lib import logs
from shiftable_lib.auth import bearer
from shiftable_lib.config import GRPC_SERVICES, Settings
from shiftable_lib.errors import Busy, Conflict, NotFound, Overloaded, ShiftableError, Unavailable
from sma.v1 import inference_pb2_grpc, registry_pb2_grpc, training_pb2_grpc

RPC_TIMEOUT = 15.0  # seconds for a unary call to another service
INFERENCE_SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{"service": "sma.v1.Inference"}],
            # gRPC retries only until the first reply arrives: no token is ever sent twice
            "retryPolicy": {
                "maxAttempts": 3,
                "initialBackoff": "0.1s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.CANCELLED: 499,
    # a service refusing the gateway's own key is the gateway misconfigured, not the client
    grpc.StatusCode.UNAUTHENTICATED: 502,
    grpc.StatusCode.PERMISSION_DENIED: 502,
}


def http_status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS.get(code, 502)


# the gateway's own checks raise the library's typed errors; most specific first
_ERROR_STATUS: list[tuple[type[Exception], int]] = [
    (NotFound, 404),
    (Conflict, 409),  # AlreadyExists included
    (Busy, 409),
    (Overloaded, 429),
    (Unavailable, 503),
    (ShiftableError, 400),  # InvalidName, CorpusMissing, CorpusInvalid
]


def error_status(exc: Exception) -> int:
    return next((status for kind, status in _ERROR_STATUS if isinstance(exc, kind)), 500)


HEALTH_NAMES = {
    health_pb2.HealthCheckResponse.SERVING: "SERVING",
    health_pb2.HealthCheckResponse.NOT_SERVING: "NOT_SERVING",
    health_pb2.HealthCheckResponse.SERVICE_UNKNOWN: "SERVICE_UNKNOWN",
    health_pb2.HealthCheckResponse.UNKNOWN: "UNKNOWN",
}


class _KeyedCall:
    """Adds the request's id (`x-request-id`, for the services' log lines) and, with a key,
    `authorization: Bearer <key>` (the services check it) to a call's metadata."""

    def __init__(self, key: str) -> None:
        self.pairs = [("authorization", bearer(key))] if key else []

    def _with_key(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        pairs = [*self.pairs]
        request = logs.request_id.get()
        if request != "-":
            pairs.append((logs.METADATA_KEY, request))
        if not pairs:
            return details
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *pairs)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


# one class per kind of call: a channel files an interceptor under the first kind it is
class _KeyedUnary(_KeyedCall, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._with_key(details), request)


class _KeyedStream(_KeyedCall, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._with_key(details), request)


def present_key(key: str) -> list[grpc.aio.ClientInterceptor]:
    """Channel interceptors that present `key` (if any) and the request's id on every unary
    and server-streaming call."""
    return [_KeyedUnary(key), _KeyedStream(key)]


@dataclass
class Backends:
    """Channels and stubs to the registry, training and inference servers."""

    addresses: dict[str, str]
    channels: dict[str, grpc.aio.Channel]
    registry: registry_pb2_grpc.RegistryStub
    training: training_pb2_grpc.TrainingStub
    inference: inference_pb2_grpc.InferenceStub

    @classmethod
    def connect(cls, settings: Settings) -> Backends:
        addresses = {name: settings.grpc_target(name) for name in GRPC_SERVICES}
        options = [
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2_000),
        ]
        # inference may be several replicas behind one name (a headless Service): spread the
        # calls over every address the name resolves to, not just the first, and retry a call
        # that a replica going away refuses on another one
        spread = [("grpc.service_config", json.dumps(INFERENCE_SERVICE_CONFIG))]
        interceptors = present_key(settings.keys().internal)  # and the request's id
        tls = settings.tls()
        credentials = grpc.ssl_channel_credentials(**tls.client()) if tls else None

        def dial(name: str, address: str) -> grpc.aio.Channel:
            more = options + (spread if name == "inference" else [])
            if credentials is None:
                return grpc.aio.insecure_channel(address, more, interceptors=interceptors)
            return grpc.aio.secure_channel(address, credentials, more, interceptors=interceptors)

        channels = {n: dial(n, a) for n, a in addresses.items()}
        return cls(
            addresses=addresses,
            channels=channels,
            registry=registry_pb2_grpc.RegistryStub(channels["registry"]),
            training=training_pb2_grpc.TrainingStub(channels["training"]),
            inference=inference_pb2_grpc.InferenceStub(channels["inference"]),
        )

    async def health(self, timeout: float = 1.0) -> dict[str, dict[str, str]]:
        """Each service's address and health status (UNREACHABLE when it does not answer)."""

        async def check(name: str) -> tuple[str, str]:
            stub = health_pb2_grpc.HealthStub(self.channels[name])
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
                return name, HEALTH_NAMES.get(reply.status, "UNKNOWN")
            except grpc.aio.AioRpcError:
                return name, "UNREACHABLE"

        results = await asyncio.gather(*(check(n) for n in self.channels))
        return {n: {"address": self.addresses[n], "status": s} for n, s in results}

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.channels.values()))
