"""A small client for Shiftable's gRPC services, without torch: stream generations, inspect the
gate, list specialists and watch long-running operations.

    from shiftable_client import Client

    with Client("127.0.0.1:50053", registry="127.0.0.1:50051") as client:
        for delta in client.generate("The numpy array", max_new_tokens=32, temperature=0):
            print(delta.text, end="", flush=True)

`AsyncClient` is the same API for asyncio. The generated stubs are importable as `sma.v1`.
"""

from shiftable_client.client import (
    AsyncClient,
    Client,
    Delta,
    GateReport,
    OperationUpdate,
    Specialist,
    TokenLogprob,
)

__all__ = [
    "AsyncClient",
    "Client",
    "Delta",
    "GateReport",
    "OperationUpdate",
    "Specialist",
    "TokenLogprob",
]
