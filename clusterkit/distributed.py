"""torch.distributed for clusterkit: set-up from torchrun's environment, rank helpers and the
collectives that make losses and the E-step see the global batch / the whole dataset.

Everything here is the identity (or a no-op) in a single process, so plugins call these
helpers unconditionally.

The rule every batch-contrastive loss follows under DDP (``docs/writing-a-plugin.md``):
each process gathers the tensors it contrasts with :func:`gather_with_grad` and computes
the loss of the *global* batch, the same value on every rank.  The gather's backward sums
the gradients that all ranks send to this rank's rows (so each rank holds world_size times
its share), and DDP's gradient *mean* then gives exactly the gradient of one process on the
concatenated batch.  Per-sample losses (a mean over the local batch) need nothing: DDP's
mean of local means is the global mean when every rank holds the same number of samples,
which clusterkit's DistributedSampler and per-rank batch guarantee.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = [
    "env_world_size", "init_from_env", "is_distributed", "rank", "world_size", "is_main",
    "gather_with_grad", "gather", "gather_rows", "all_reduce", "broadcast_object", "barrier",
    "shard_range", "local_rows",
]


def env_world_size() -> int:
    """WORLD_SIZE set by torchrun (1 when not launched by it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_from_env(device: str = "auto", timeout_s: float = 1800.0) -> bool:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT).

    NCCL when this process trains on CUDA, gloo otherwise.  On CUDA each process uses
    ``cuda:LOCAL_RANK``.  Returns True when a group of more than one process is up (also
    when it was already initialised by the caller, e.g. a test).
    """
    if is_distributed():
        return True
    if env_world_size() <= 1 or not dist.is_available():
        return False
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return is_distributed()


def is_distributed() -> bool:
    """A process group of more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 (or a single process): the one that logs, checkpoints and writes summaries."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward returns the SUM over ranks of the gradient
    of this rank's rows (an all_reduce, then this rank's slice)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rows = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each rank -> (world_size * B, ...) in rank order, differentiable.

    Every rank must pass the same B (clusterkit's loader guarantees it) and must use the
    result in a loss computed identically on all ranks (see the module docstring).
    """
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (world_size * B, ...) in rank order, without gradient."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def shard_range(n: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """The contiguous rows [start, stop) of n rows that ``rank_`` owns: chunks of ceil(n / world),
    the last ones shorter (possibly empty)."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    chunk = -(-n // world)
    start = min(rank_ * chunk, n)
    return start, min(start + chunk, n)


@torch.no_grad()
def gather_rows(x: torch.Tensor, n: int, dim: int = 0) -> torch.Tensor:
    """Reassemble n rows sharded by :func:`shard_range` (this rank holds its shard ``x``
    along ``dim``): the full tensor, identical on every rank."""
    if not is_distributed():
        return x
    world = world_size()
    chunk = -(-n // world)
    pad = chunk - x.shape[dim]
    if pad:
        shape = list(x.shape)
        shape[dim] = pad
        x = torch.cat([x, x.new_zeros(shape)], dim=dim)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    sizes = [shard_range(n, r, world) for r in range(world)]
    return torch.cat([p.narrow(dim, 0, stop - start) for p, (start, stop) in zip(parts, sizes, strict=True)], dim=dim)


def local_rows(x: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a tensor gathered by :func:`gather_with_grad` / :func:`gather`."""
    if not is_distributed():
        return x
    rows = x.shape[0] // world_size()
    return x[rank() * rows:(rank() + 1) * rows]


def all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all_reduce of ``x`` ("sum", "mean", "max" or "min"); returns ``x``."""
    if not is_distributed():
        return x
    if op == "mean":
        dist.all_reduce(x)
        x.div_(world_size())
    else:
        dist.all_reduce(x, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                               "min": dist.ReduceOp.MIN}[op])
    return x


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (any picklable object)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
