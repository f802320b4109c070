"""The search loop that CTS and the strong-ticket methods share (SPEC §1, §2).

``cfg.search_epochs`` epochs over the training set without augmentation, in the order of
``ctx.generator("order")``; the mask LR ×0.1 from the drop step on; one record per epoch (phase,
epoch, lr, mean objective, the method's own fields, seconds) through ``ctx.on_epoch`` once its
objective is known to be finite. A method that can continue an interrupted search hands its state
with each record and gets it back as ``ctx.resume``. A method supplies a ``Searcher``: its
optimiser, its step, its records' own fields and, if resumable, its part of the state.

Data-parallel (``distributed.World``): each rank steps on its shard of every batch; the searcher
scales its shard's objective to its part of the batch (``Searcher.scaled``) and sums its mask gradients over the ranks before its
controller reads them, so its replicated mask parameters move alike everywhere; the epoch's
objective is all-reduced before it is read.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..distributed import World
from ..errors import DivergedError
from ..runtime import cpu_copy

if TYPE_CHECKING:
    from .base import SearchContext


class Searcher:
    """A method's part of the loop. ``opt`` optimises the mask parameters at ``cfg.mask_lr``."""

    opt: torch.optim.Optimizer
    resumable = False   # whether ``state``/``load`` continue an interrupted search
    world = World()     # set by search_loop

    def scaled(self, objective: Tensor) -> Tensor:
        """A shard's batch-mean ``objective`` as its part of the global batch's (equal shards:
        ``Batches.shard_of``); as is in a world of one."""
        return objective if self.world.size == 1 else objective / self.world.size

    def prepare(self) -> None:
        """Work done once before this attempt's first step, timed with its first epoch."""

    def step(self, x: Tensor, y: Tensor, idx: Tensor) -> Tensor:
        """One optimiser step on a batch (``idx``: its example indices); returns its objective."""
        raise NotImplementedError

    def record(self) -> dict:
        """The epoch record's own fields (computed under no_grad), after phase, epoch, lr, objective."""
        return {}

    def state(self) -> dict:
        """What continues the search besides the loop's own (epoch, step, optimizer, order, history,
        seconds)."""
        return {}

    def load(self, state: dict) -> None:
        """Take back what ``state`` saved."""


class Clock:
    """A search's wall seconds, those of the interrupted attempts it continues included."""

    def __init__(self) -> None:
        self.start, self.before = time.perf_counter(), 0.0

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.start


@dataclass
class Searched:
    history: list   # one record per search epoch, those of the attempts continued included
    steps: int


def drop_step(cfg, steps_per_epoch: int, at: str = "step") -> int:
    """The step from which the mask LR is ×0.1: int(lr_drop × search steps), or (``at="epoch"``, the
    authors' code) the first step after epoch int(lr_drop × search epochs)."""
    s, epochs = cfg.search, cfg.search_epochs
    return (int(s.lr_drop * epochs) * steps_per_epoch if at == "epoch"
            else int(s.lr_drop * epochs * steps_per_epoch))


def search_loop(ctx: SearchContext, searcher: Searcher, clock: Clock, lr_drop_at: str = "step") -> Searched:
    """The loop (module doc), from the start or from ``ctx.resume`` where ``searcher`` is resumable."""
    cfg, opt = ctx.cfg, searcher.opt
    batch_size = cfg.training.batch_size
    world = searcher.world = World.current()
    drop = drop_step(cfg, ctx.data.steps_per_epoch(batch_size), lr_drop_at)
    order = ctx.generator("order")
    history, step, first_epoch = [], 0, 0
    if ctx.resume is not None and searcher.resumable:   # continue after the last finished epoch
        r = ctx.resume
        searcher.load(r)
        opt.load_state_dict(r["optimizer"])
        order.set_state(r["order"])
        history, step, first_epoch, clock.before = list(r["history"]), r["step"], r["epoch"], r["seconds"]
    for epoch in range(first_epoch, cfg.search_epochs):
        t0 = time.perf_counter()
        if epoch == first_epoch:
            searcher.prepare()
        obj_sum, n_batches = torch.zeros((), device=ctx.device), 0
        for x, y, idx in ctx.data.train_batches(batch_size, order, augment=False, indices=True, shard=world.shard):
            if step == drop:
                for g in opt.param_groups:
                    g["lr"] = cfg.mask_lr * 0.1
            obj_sum += searcher.step(x, y, idx).detach()
            n_batches += 1
            step += 1
        world.sum_(obj_sum)
        with torch.no_grad():
            record = {"phase": "search", "epoch": epoch + 1, "lr": opt.param_groups[0]["lr"],
                      "objective": obj_sum.item() / max(n_batches, 1), **searcher.record()}
        record["seconds"] = time.perf_counter() - t0
        if not math.isfinite(record["objective"]):
            raise DivergedError(f"search: objective became {record['objective']} in epoch {epoch + 1}")
        history.append(record)
        if not searcher.resumable:
            ctx.on_epoch(record)
            continue
        ctx.on_epoch(record, cpu_copy({
            "epoch": epoch + 1, "step": step, **searcher.state(), "optimizer": opt.state_dict(),
            "order": order.get_state(), "history": list(history), "seconds": clock.seconds()}))
    return Searched(history, step)
