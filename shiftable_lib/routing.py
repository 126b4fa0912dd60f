"""A batch's routing as the decode loop reads it: one row of tensors per sequence.

`Routing` (in `sampling.py`, torch-free) is what a request asks for; a `RouteTable` is the
batch's requests resolved against the model's experts and put on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from shiftable_lib.sampling import Routing


@dataclass(frozen=True)
class RouteTable:
    """Per-row routing of a batch: allowed experts (B, E) and top-k (B,), 0 = soft.

    What the hot loop branches on (one expert for every row? any top-k row? any expert
    excluded?) is worked out from the host-side rows before they go to the device, so no step
    waits on the device to decide.
    """

    allowed: Tensor
    top_k: Tensor
    single: int | None  # the one expert every row is restricted to
    any_topk: bool
    block: Tensor | None  # (B, 1, E): -inf where not allowed; None when every expert is

    @classmethod
    def from_rows(cls, allowed: list[list[bool]], top_k: list[int], device) -> RouteTable:
        first = allowed[0] if allowed else []
        one = sum(first) == 1 and all(row == first for row in allowed)
        allowed_t = torch.tensor(allowed, device=device)
        block = None
        if not all(all(row) for row in allowed):
            block = torch.zeros(allowed_t.shape, device=device)
            block = block.masked_fill(~allowed_t, float("-inf")).unsqueeze(1)
        return cls(
            allowed=allowed_t,
            top_k=torch.tensor(top_k, device=device),
            single=first.index(True) if one else None,
            any_topk=any(k > 0 for k in top_k),
            block=block,
        )

    @classmethod
    def build(cls, experts: tuple[str, ...], routes: list[Routing], device) -> RouteTable:
        return cls.from_rows(
            [r.allowed(experts) for r in routes], [r.top_k() for r in routes], device
        )

    @classmethod
    def for_batch(
        cls, experts: tuple[str, ...], routing: Routing | list[Routing], batch: int, device
    ) -> RouteTable:
        """One routing for every row of a batch, or one per row."""
        routes = [routing] * batch if isinstance(routing, Routing) else routing
        if len(routes) != batch:
            raise ValueError(f"got {len(routes)} routings for a batch of {batch}")
        return cls.build(experts, routes, device)
