"""PyTorch distributed under torchrun: process-group setup, and gathering features with their gradients.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them everything here is a no-op for one process.
"""

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    enabled: bool = False  # a process group exists (also for a world of one under torchrun)

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> Dist:
    """Join the process group torchrun describes: NCCL for CUDA, gloo for the CPU (--device cpu)."""
    if "WORLD_SIZE" not in os.environ:
        return Dist()
    rank, world, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    use_cuda = torch.cuda.is_available() and not device_name.startswith("cpu")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return Dist(rank, world, local_rank, enabled=True)


# torch 2.14 renamed all_gather_into_tensor (a FutureWarning from every rank); older releases have only that name
_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the gradient of its own rows summed over ranks, since every rank's
    loss uses every rank's features (torch.distributed.nn's all_gather, which is deprecated)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
        out = x.new_empty((world * len(x), *x.shape[1:]))
        _gather_into(out, x.contiguous())
        ctx.rows = slice(rank * len(x), (rank + 1) * len(x))
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rows], None, None


def gather_with_grad(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """(n, D) on each rank, n equal on all -> (world * n, D), rank-major; gradients flow back to every rank's own
    rows."""
    if d.world == 1:
        return x
    return _GatherWithGrad.apply(x, d.rank, d.world)


def gather_objects(obj, d: Dist) -> list:
    """Every rank's `obj` (picklable, trusted: our own processes), on every rank."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def all_reduce_(x: torch.Tensor, d: Dist, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(x, op=op)
    return x


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def broadcast_object(obj, d: Dist):
    """Rank 0's `obj` on every rank."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup(d: Dist) -> None:
    if d.enabled:
        dist.destroy_process_group()
