"""Data-parallel training with torch's own engine (`torchrun` + DistributedDataParallel).

    torchrun --standalone --nproc_per_node=2 -m sparse_lens train --preset small --out runs/ddp

`init_from_env()` reads what torchrun sets (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
`MASTER_PORT`) and starts the process group: gloo on CPU, NCCL on CUDA. `train()` then asks
`current()` for a `RankContext` and, with more than one rank:
- wraps the model in `DistributedDataParallel`, so gradients are all-reduced (averaged) inside
  `backward()`, before the gradient RMS rescale and the projection, which then run identically
  on every rank;
- gives each rank its share of a global batch: the global batch is the one a single process
  draws with `batch_size x world_size` rows for (seed, step), and rank r takes rows
  `[r*b, (r+1)*b)` (`rank_batch`, a pure function of (seed, step, rank, world size)). A
  1-process run with `batch_size x world_size` therefore sees the same tokens, and its loss
  curve equals the distributed one up to float reduction order;
- averages the loss over ranks for the log and history, and ORs the Ctrl-C flags, in one small
  all-reduce per step, so every rank stops at the same step;
- compares a bit-exact checksum of the weights across ranks every `checksum_every` steps and at
  the end, raising `RankDivergenceError` on a mismatch instead of training on silently;
- leaves checkpoints, snapshots, logs and the progress bar to rank 0.
With one rank (no torchrun, or `WORLD_SIZE=1`) none of this runs and training is the plain
single-process loop, bitwise.

Resuming needs the same world size (the global batch, and so the run, depends on it): another
one is a clear error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from jaxtyping import Int

#: compare the ranks' weight checksums every this many steps (and at the last step)
CHECKSUM_EVERY = 200


class RankDivergenceError(RuntimeError):
    """The ranks of a data-parallel run hold different weights (they must be bitwise equal)."""


@dataclass(frozen=True)
class RankContext:
    """Where this process stands in a data-parallel run; `RankContext()` is a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes checkpoints, logs and progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def device_for(self, device: str) -> str:
        """`cuda` becomes this rank's GPU (`cuda:LOCAL_RANK`) in a distributed run."""
        if self.distributed and device == "cuda":
            return f"cuda:{self.local_rank}"
        return device

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model to train: a DistributedDataParallel wrapper when distributed, else itself."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def reduce_step(self, loss: float, interrupted: bool, device: str) -> tuple[float, bool]:
        """The loss averaged over ranks and whether any rank was interrupted (one all-reduce)."""
        if not self.distributed:
            return loss, interrupted
        both = torch.tensor([loss, float(interrupted)], dtype=torch.float64, device=device)
        dist.all_reduce(both)
        return float(both[0]) / self.world_size, bool(both[1] > 0)

    def check_weights(self, model: torch.nn.Module, step: int) -> None:
        """Raise `RankDivergenceError` unless every rank's weights have the same checksum."""
        if not self.distributed:
            return
        device = next(model.parameters()).device
        mine = weights_checksum(model).to(device)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine)
        sums = [int(t) for t in gathered]
        if len(set(sums)) != 1:
            raise RankDivergenceError(
                f"ranks hold different weights at step {step} (checksums by rank: "
                f"{', '.join(f'{s:#x}' for s in sums)}); the run is no longer data-parallel "
                "training of one model. Check that every rank runs the same code, torch build "
                "and thread count")

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def current() -> RankContext:
    """The running process group's ranks (`init_from_env` started it), or a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return RankContext()
    return RankContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another launcher setting WORLD_SIZE > 1) started this process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str = "cpu") -> RankContext:
    """Start the process group torchrun describes in the environment (gloo for CPU, NCCL for
    CUDA) and return this process's `RankContext`; a single process without torchrun."""
    if not launched_by_torchrun():
        return RankContext()
    if dist.is_initialized():
        return current()
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE > 1 but {', '.join(missing)} not set: launch with torchrun")
    cuda = device.startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for but torch.cuda.is_available() is False")
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return current()


def shutdown() -> None:
    """End the process group if one is running (idempotent)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_batch(
    tokens: Int[torch.Tensor, " n"], batch_size: int, seq_len: int, step: int, seed: int,
    rank: int = 0, world_size: int = 1,
) -> Int[torch.Tensor, "batch_size seq_len"]:
    """Rank `rank`'s `batch_size` windows at `step`: rows `[rank*batch_size, (rank+1)*batch_size)`
    of the global batch `data.sample_batch(tokens, batch_size * world_size, seq_len, step, seed)`.
    With one rank this is that batch itself."""
    from sparse_lens.data import sample_batch

    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}); got {rank}")
    if world_size == 1:
        return sample_batch(tokens, batch_size, seq_len, step, seed)
    # every rank draws the global batch (a few thousand token ids) and keeps its rows
    everything = sample_batch(tokens, batch_size * world_size, seq_len, step, seed)
    return everything[rank * batch_size:(rank + 1) * batch_size]


@torch.no_grad()
def weights_checksum(model: torch.nn.Module) -> Int[torch.Tensor, ""]:
    """A bit-exact checksum of every parameter and buffer: the raw bits as integers, weighted by
    position (so swapped entries count) and summed in int64 (wrapping). One pass over the
    weights, cheap next to a training step. Any changed bit of a float32 value changes it."""
    total = torch.zeros((), dtype=torch.int64)
    for i, tensor in enumerate([*model.parameters(), *model.buffers()]):
        flat = tensor.detach().reshape(-1)
        if flat.dtype.is_floating_point:
            flat = flat.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()])
        flat = flat.to(torch.int64)
        weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.int64) % 65_521 + i + 1
        total += (flat * weights).sum().cpu()
    return total
