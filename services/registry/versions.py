"""Whether a model version exists, complete, before the registry serves it.

The registry keeps the records; the artifacts live on the training service's volume. So a
version the registry has not seen is published only once the training service says it holds
that version, complete (its files of the sizes recorded when it was written), with the same
content: no caller can point inference at a phantom.
"""

from __future__ import annotations

import grpc

from services.common import Metadata
from services.registry.schema import ModelVersion
from shiftable_lib.errors import Conflict, NotFound, Unavailable
from sma.v1 import training_pb2, training_pb2_grpc

ASK_TIMEOUT_S = 10.0


class TrainingVersions:
    """Asks the training service at `channel` about versions."""

    def __init__(self, channel: grpc.aio.Channel, metadata: Metadata = ()) -> None:
        self.stub = training_pb2_grpc.TrainingStub(channel)
        self.metadata = metadata

    async def check(self, version: ModelVersion) -> None:
        """NotFound, Conflict (incomplete), ValueError (other content) or Unavailable."""
        try:
            reply = await self.stub.GetVersion(
                training_pb2.GetVersionRequest(id=version.id),
                timeout=ASK_TIMEOUT_S,
                metadata=self.metadata,
            )
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details()
            if code is grpc.StatusCode.NOT_FOUND:
                raise NotFound(
                    f"the training service holds no model version {version.id!r}"
                ) from None
            if code is grpc.StatusCode.DATA_LOSS:
                raise Conflict(f"model version {version.id} is not complete: {details}") from None
            raise Unavailable(
                f"cannot ask the training service about {version.id}: {code.name} {details}"
            ) from None
        held = reply.version
        differs = [
            name
            for name, ours, theirs in (
                ("specialists", list(version.specialists), list(held.specialists)),
                ("artifact_dir", version.artifact_dir, held.artifact_dir),
                ("metrics_json", version.metrics_json, held.metrics_json),
                ("profile", version.profile, held.profile),
            )
            if ours != theirs
        ]
        if differs:
            raise ValueError(
                f"model version {version.id} differs from what the training service holds "
                f"in {', '.join(differs)}"
            )
