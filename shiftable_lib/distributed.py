"""Data-parallel training over the processes that torchrun (`torch.distributed.run`) starts.

`sma train --nproc-per-node N` re-runs itself under torchrun, which starts N copies of the same
command with RANK, WORLD_SIZE, LOCAL_RANK and a rendezvous address in their environment. Each
copy joins one process group (NCCL on CUDA, gloo on CPU). The copies then split the work:
- Every rank draws the same global batch from identically seeded samplers and trains on its
  own rows of it (rank, rank + world, ...).
- DDP averages the gradients, so one step is the step one process would take on the whole
  global batch: same schedule, same gate supervision, same result within float rounding.
- Rank 0 alone writes versions and reports progress; the others wait at a barrier and read
  what it wrote.

With one process (no torchrun) everything here is a no-op and the plain path runs unchanged.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel


class World:
    """This process's place among the ranks of a job (rank 0 of 1 when not distributed)."""

    def __init__(self, rank: int = 0, size: int = 1) -> None:
        self.rank, self.size = rank, size

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, batch: Tensor) -> Tensor:
        """This rank's rows of a global batch: rank, rank + size, ..."""
        if self.size == 1:
            return batch
        self.check_batches(batch.shape[0])
        return batch[self.rank :: self.size]

    def check_batches(self, *rows: int) -> None:
        """Refuse global batches of `rows` that do not split evenly over the ranks."""
        for n in rows:
            if n % self.size:
                raise ValueError(
                    f"a global batch of {n} rows does not split over {self.size} processes: "
                    "use a process count that divides the profile's batch sizes"
                )

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def mean(self, value: Tensor) -> Tensor:
        """The mean of `value` over the ranks (each rank's loss -> the global batch's loss)."""
        if self.size == 1:
            return value
        total = value.detach().clone()
        dist.all_reduce(total)
        return total / self.size

    def broadcast(self, value: object) -> object:
        """Rank 0's `value`, on every rank (pickled; for small things such as a version id)."""
        if self.size == 1:
            return value
        box = [value if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def step_fn(self, model: nn.Module, loss: Callable[[], tuple[Tensor, int]]):
        """`loss` as a callable whose backward averages the trainable parameters' gradients
        over the ranks (DDP), or `loss` itself in a single process.

        No `device_ids`, on a GPU too: the loss takes no inputs (it draws its own batch on the
        model's device), and DDP given device_ids moves the call's inputs and then indexes
        them, which fails when there are none (found on two GPUs; gloo on CPUs never takes
        that path)."""
        if self.size == 1:
            return loss
        return DistributedDataParallel(_Loss(model, loss))


class _Loss(nn.Module):
    """A phase's loss as a module, so that DDP can wrap it: its parameters are the model's
    (DDP takes those that require gradients when it is built: the phase's)."""

    def __init__(self, model: nn.Module, loss: Callable[[], tuple[Tensor, int]]) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self) -> tuple[Tensor, int]:
        return self.loss()


_world = World()


def world() -> World:
    return _world


def launched() -> bool:
    """Whether torchrun started this process as one rank of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> torch.device:
    """Join the job's process group if torchrun started us; the device this rank trains on."""
    global _world
    if not launched():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    _world = World(dist.get_rank(), dist.get_world_size())
    return device


def torchrun_command(nproc: int, module: str, args: list[str]) -> list[str]:
    """`python -m module args` as `nproc` processes on this host under PyTorch's launcher."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*launcher, f"--nproc-per-node={nproc}", "-m", module, *args]


def shutdown(completed: bool = False) -> None:
    """Leave the job's process group; after a job that every rank `completed`, all together.

    What still holds the group (the DDP wrappers of finished phases, kept in reference cycles)
    is freed first, while the interpreter is whole: left to its exit, gloo's threads outlive
    the group and abort the rank ("terminate called without an active exception"), which
    failed a job that had published its version."""
    global _world
    if dist.is_initialized():
        if completed:
            dist.barrier()
        gc.collect()
        dist.destroy_process_group()
    _world = World()
