"""Data parallelism: the process's place in a ``torch.distributed`` group and the few collectives
the training loop, the searches and evaluation need (gloo on CPU, nccl on GPU).

Every rank holds the same model and mask parameters and reads its own contiguous shard of each
global batch (``Batches.shard_of``); each scales its shard's loss so that the SUM of the ranks'
gradients (``grads_``) is the one-process gradient of the whole batch. Random draws that are not
per example (CTS noise, gate noise, data order) come from generators seeded alike on every rank,
so they are shared without communication. At size 1 every collective is a no-op.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @staticmethod
    def current() -> "World":
        """This process's world: the default ``torch.distributed`` group when initialised, else 1."""
        if dist.is_available() and dist.is_initialized():
            return World(dist.get_rank(), dist.get_world_size())
        return World()

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> Optional[tuple[int, int]]:
        """``(rank, size)`` for ``Batches.train_batches(shard=)``; None in a world of one."""
        return None if self.size == 1 else (self.rank, self.size)

    def sum_(self, *tensors: Tensor) -> None:
        """All-reduce SUM in place: one call per dtype, however many tensors."""
        if self.size > 1:
            _reduce_flat(list(tensors), dist.all_reduce)

    def grads_(self, params: Iterable[Tensor]) -> None:
        """Sum every parameter's ``.grad`` over the ranks (one flat all-reduce)."""
        if self.size > 1:
            self.sum_(*[p.grad for p in params if p.grad is not None])

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank (a decision that others must follow, e.g. a cache hit)."""
        if self.size == 1:
            return flag
        t = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.broadcast(t, 0)
        return bool(t.item())

    def gather(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order."""
        if self.size == 1:
            return [obj]
        out: list = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_(self, *tensors: Tensor, src: int = 0) -> None:
        """Every rank's ``tensors`` become rank ``src``'s."""
        if self.size > 1:
            _reduce_flat(list(tensors), lambda t: dist.broadcast(t, src))


def _reduce_flat(tensors: list[Tensor], collective) -> None:
    """``collective`` applied in place to ``tensors``, concatenated per dtype (one call each)."""
    by_dtype: dict = {}
    for t in tensors:
        by_dtype.setdefault((t.dtype, t.device), []).append(t)
    for group in by_dtype.values():
        if len(group) == 1 and group[0].is_contiguous():
            collective(group[0])
            continue
        flat = torch.cat([t.reshape(-1) for t in group])
        collective(flat)
        for t, part in zip(group, flat.split([t.numel() for t in group])):
            t.copy_(part.view_as(t))


def sync_buffers_(model: nn.Module, world: World) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank, as DDP's broadcast_buffers:
    with per-worker statistics they drift apart, and evaluation reads them."""
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    if world.size > 1 and buffers:
        world.broadcast_(*buffers)


# ------------------------------------------------------------------------ synchronised BatchNorm

class _SumOverRanks(torch.autograd.Function):
    """All-reduce SUM with its gradient: each rank's output is every rank's input summed, so the
    gradient of an input is every rank's output gradient summed."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm(nn.SyncBatchNorm):
    """torch's SyncBatchNorm, which refuses CPU tensors, with a CPU path (gloo): the global batch's
    mean, then its variance about that mean (two all-reduces with their gradients), so statistics
    and gradients are those of the global batch."""

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or not self.training or World.current().size == 1:
            return super().forward(x)
        all_reduce = _SumOverRanks.apply
        c, dims, shape = x.size(1), [0, *range(2, x.dim())], [1, x.size(1), *[1] * (x.dim() - 2)]
        count = torch.full((1,), x.numel() / c, dtype=x.dtype)
        sums = all_reduce(torch.cat([x.sum(dims), count]))
        n = sums[c]
        centred = x - (sums[:c] / n).view(shape)   # two passes: E[x²] − mean² cancels in float32
        var = all_reduce((centred * centred).sum(dims)) / n
        if self.track_running_stats:
            self._update_running(sums[:c].detach() / n, var.detach() * n / (n - 1))
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y

    @torch.no_grad()
    def _update_running(self, mean: Tensor, unbiased_var: Tensor) -> None:
        self.num_batches_tracked.add_(1)
        f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - f).add_(mean, alpha=f)
        self.running_var.mul_(1 - f).add_(unbiased_var, alpha=f)


def sync_batchnorm(model: nn.Module, world: World) -> nn.Module:
    """``model`` with its BatchNorm layers synchronised over ``world`` (``model.batchnorm_sync``);
    unchanged in a world of one."""
    if world.size == 1:
        return model
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for m in model.modules():
        if type(m) is nn.SyncBatchNorm:
            m.__class__ = SyncBatchNorm
    return model
