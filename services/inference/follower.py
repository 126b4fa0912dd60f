"""The version follower: keeps the served version equal to the registry's serving pointer.

The stack starts its servers together, so the registry is often not listening yet when the
inference server starts following it. Until the registry has answered once, failing to reach
it is expected and retried quietly (debug level) for up to `STARTUP_GRACE_S`; a registry that
stays unreachable longer than that, or that was reachable and goes away, is a warning on every
retry.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from services.common import Server, dial, key_metadata
from services.inference.core import InferenceCore
from shiftable_lib.auth import NO_KEYS, Keys
from shiftable_lib.config import TLS
from shiftable_lib.errors import ShiftableError, VersionInvalid
from sma.v1 import registry_pb2, registry_pb2_grpc

log = logging.getLogger("sma.inference")

RETRY_FIRST_S = 0.2  # registry reconnect backoff: doubles up to RETRY_MAX_S
RETRY_MAX_S = 5.0
STARTUP_GRACE_S = 30.0  # a registry not up by then is worth telling someone about
HEARTBEAT_S = 5.0  # well inside the registry's replica lease


async def follow_registry(
    core: InferenceCore,
    address: str,
    server: Server,
    replica_id: str,
    keys: Keys = NO_KEYS,
    tls: TLS | None = None,
) -> None:
    """Serve whatever version the registry says, forever.

    Follows `WatchServing`; whenever the serving version differs from the loaded one, loads it
    (the old one keeps serving meanwhile), marks the server SERVING and reports it loaded. A
    registry that is down, or a watch that ends, is retried with exponential backoff. A version
    that fails to load is not retried until the watch reconnects, so a broken artifact does not
    make every registry update reload it. As replica `replica_id` it reports what it serves
    (or why it cannot load the serving version) on every change and every `HEARTBEAT_S`, which
    keeps it in the registry's list of live replicas.
    """
    follower = _Follower(core, server, address, replica_id)
    follower.metadata = key_metadata(keys)
    async with dial(address, tls) as channel:
        await follower.run(registry_pb2_grpc.RegistryStub(channel))


class _Follower:
    def __init__(self, core: InferenceCore, server: Server, address: str, replica: str) -> None:
        self.core = core
        self.server = server
        self.address = address
        self.replica = replica
        self.load_error = ""  # why the serving version could not be loaded, naming it
        self.invalid = ""  # a version that failed its check, until the registry has heard so
        self.started = time.monotonic()
        self.reached = False  # whether the registry has answered since the server started
        self.delay = RETRY_FIRST_S
        self.metadata: tuple[tuple[str, str], ...] = ()  # its API key, for the registry

    async def run(self, stub: registry_pb2_grpc.RegistryStub) -> None:
        while True:
            try:
                await self.watch(stub)
                log.warning("the registry ended the serving watch; reconnecting")
            except grpc.aio.AioRpcError as exc:
                self.log_retry(exc)
            await asyncio.sleep(self.delay)
            self.delay = min(2 * self.delay, RETRY_MAX_S)

    async def watch(self, stub: registry_pb2_grpc.RegistryStub) -> None:
        """One `WatchServing` call, until the registry ends it or it fails."""
        failed = ""
        heartbeat = asyncio.create_task(self.heartbeat(stub))
        try:
            watch = stub.WatchServing(registry_pb2.WatchServingRequest(), metadata=self.metadata)
            async for update in watch:
                self.reached = True
                self.delay = RETRY_FIRST_S
                wanted = update.serving.version.id
                if not wanted:
                    continue
                if wanted not in (failed, self.core.version_id) and not await self.load(wanted):
                    failed = wanted
                    if not self.core.version_id:  # serving nothing: the newest that loads
                        await self.fall_back(stub, wanted)
                if self.invalid or self.reported(update.serving) != self.state():
                    await self.report(stub)
        finally:
            heartbeat.cancel()

    def state(self) -> tuple[str, str]:
        return self.core.version_id or "", self.load_error

    def reported(self, serving: registry_pb2.ServingState) -> tuple[str, str] | None:
        """What the registry holds for this replica (its last report), if anything."""
        mine = next((r for r in serving.replicas if r.id == self.replica), None)
        return None if mine is None else (mine.version_id, mine.load_error)

    async def report(self, stub: registry_pb2_grpc.RegistryStub) -> None:
        version_id, load_error = self.state()
        if version_id or load_error:
            invalid = self.invalid
            request = registry_pb2.ReportLoadedRequest(
                version_id=version_id,
                replica_id=self.replica,
                load_error=load_error,
                invalid_version_id=invalid,
            )
            await stub.ReportLoaded(request, timeout=HEARTBEAT_S, metadata=self.metadata)
            if self.invalid == invalid:
                self.invalid = ""

    async def fall_back(self, stub: registry_pb2_grpc.RegistryStub, broken: str) -> None:
        """Serve the newest other version that loads, rather than nothing, while the serving
        one cannot be loaded; the report still names the one that failed, and why."""
        reply = await stub.ListVersions(
            registry_pb2.ListVersionsRequest(), timeout=HEARTBEAT_S, metadata=self.metadata
        )
        reason = self.load_error
        for version in reply.versions:  # newest first
            if version.id == broken or version.invalid_reason:
                continue
            if await self.load(version.id):
                self.load_error = f"{reason}; serving {version.id} instead"
                log.warning("serving %s while %s cannot be loaded", version.id, broken)
                return
        self.load_error = reason

    async def heartbeat(self, stub: registry_pb2_grpc.RegistryStub) -> None:
        """Renew this replica's lease in the registry; a missed beat is the next one's job."""
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await self.report(stub)
            except grpc.aio.AioRpcError as exc:
                log.debug("heartbeat to the registry failed: %s", exc.details())

    async def load(self, version_id: str) -> bool:
        """Serve `version_id`; False (logged, and kept for the next report) when it cannot be
        loaded."""
        try:
            await self.core.load(version_id)
        except Exception as exc:
            if isinstance(exc, VersionInvalid):  # its files, not this replica: tell the registry
                self.invalid = version_id
            reason = str(exc).removeprefix(f"{version_id}: ")  # VersionInvalid names it too
            self.load_error = f"cannot load {version_id}: {reason}"
            log.error(
                "cannot load version %s (%s); still serving %s",
                version_id,
                exc,
                self.core.version_id or "nothing",
                exc_info=not isinstance(exc, ShiftableError),
            )
            return False
        self.load_error = ""
        info = self.core.info()
        plural = "s" if info.threads > 1 else ""
        where = f"{info.threads} CPU thread{plural}" if info.threads else info.device
        log.info("now serving %s (%s on %s)", version_id, info.dtype, where)
        await self.server.ready()
        return True

    def log_retry(self, exc: grpc.aio.AioRpcError) -> None:
        if self.reached:
            log.warning(
                "registry at %s: %s (%s); retrying in %.1fs",
                self.address,
                exc.code().name,
                exc.details(),
                self.delay,
            )
            return
        waited = time.monotonic() - self.started
        starting = exc.code() == grpc.StatusCode.UNAVAILABLE and waited < STARTUP_GRACE_S
        log.log(
            logging.DEBUG if starting else logging.WARNING,
            "registry at %s not reached yet, %.1f s after start: %s (%s); retrying in %.1fs",
            self.address,
            waited,
            exc.code().name,
            exc.details(),
            self.delay,
        )
