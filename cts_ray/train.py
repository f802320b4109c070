"""The one training loop: dense training and ticket retraining (SPEC §4 recipes).

Metrics are accumulated on the device and read once per epoch, so the hot loop has no
host-device synchronisation. A mask, when given, is kept exact in place (see masking.py).
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import World, sync_buffers_
from .errors import DivergedError
from .masking import Mask, MaskedParams
from .runtime import derive_seed

if TYPE_CHECKING:
    from .config import TrainingConfig
    from .data import Batches


def lr_at(t: TrainingConfig, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
    """The LR of step ``step`` (0-based) of epoch ``epoch``: ×gamma at each milestone passed and,
    within the first ``warmup_epochs``, ×i/total for the i-th step (1-based) of the warm-up's total
    steps, as the authors' ``apply_warmup`` (step 1 at lr/total, the last warm-up step at lr). A
    function of (epoch, step) alone, so a resumed run continues the schedule exactly."""
    lr = t.lr * t.gamma ** sum(1 for m in t.milestones if epoch >= m)
    if epoch < t.warmup_epochs:
        lr *= (epoch * steps_per_epoch + step + 1) / (t.warmup_epochs * steps_per_epoch)
    return lr


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> float:
    for g in opt.param_groups:
        g["lr"] = lr
    return lr


def make_optimizer(model: nn.Module, t: TrainingConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)


def autocast(amp: bool, device: torch.device):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare(model: nn.Module, device: torch.device, amp: bool) -> nn.Module:
    model = model.to(device)
    if amp and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def to_input(x: torch.Tensor, amp: bool) -> torch.Tensor:
    if amp and x.is_cuda and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


@torch.no_grad()
def evaluate(model: nn.Module, data: Batches, amp: bool = False, mode: str = "eval") -> dict:
    """Test loss and accuracy. ``mode='train'`` evaluates with batch statistics (strong tickets).
    Data-parallel: each rank evaluates its shard of every test batch; the sums are all-reduced, so
    every rank returns the same numbers."""
    was_training = model.training
    model.train(mode == "train")
    device, world = data.device, World.current()
    loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for x, y in data.test_batches(shard=world.shard):
        with autocast(amp, device):
            out = model(to_input(x, amp))
        loss += F.cross_entropy(out.float(), y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
    world.sum_(loss, correct)
    model.train(was_training)
    n = data.n_test
    return {"test_loss": loss.item() / n, "test_accuracy": correct.item() / n}


def _backward(loss: torch.Tensor, world: World, reduction: str, params: list) -> None:
    """``loss.backward()``; data-parallel, a batch-mean loss counts as its shard's part of the global
    batch's and the ranks' gradients are summed: the whole batch's gradient on every rank."""
    if world.size == 1:
        return loss.backward()
    (loss / world.size if reduction == "mean" else loss).backward()   # equal shards (Batches.shard_of)
    world.grads_(params)


def _epoch_metrics(model: nn.Module, world: World, loss_sum: torch.Tensor, correct: torch.Tensor,
                   seen: int) -> tuple[float, float]:
    """(train loss, train accuracy) of an epoch over all ranks; BatchNorm buffers made rank 0's."""
    if world.size > 1:
        seen_t = torch.tensor(seen, device=loss_sum.device)
        world.sum_(loss_sum, correct, seen_t)
        seen = int(seen_t)
        sync_buffers_(model, world)
    return loss_sum.item() / max(seen, 1), correct.item() / max(seen, 1)


def train_epochs(model: nn.Module, data: Batches, t: TrainingConfig, *, start: int, end: int,
                 order_seed: int, mask: Optional[Mask] = None, amp: bool = False, phase: str = "train",
                 optimizer_state: Optional[dict] = None, compile: bool = False,
                 on_epoch_end: Optional[Callable[[dict, torch.optim.Optimizer], None]] = None) -> Iterator[dict]:
    """Train from epoch ``start`` to ``end`` (absolute epochs, so milestones and a warm-up continue
    after a rewind); yield one metrics record per epoch (``lr``: its last step's), after evaluating
    on the test set.

    Each epoch's data order comes from (order_seed, epoch) alone, so a run resumed at epoch e
    with the saved model and ``optimizer_state`` continues exactly as an uninterrupted one.
    ``compile``: run the training forward/backward through ``torch.compile`` (same parameters, so
    masks, snapshots and state dicts are untouched; results equal up to float rounding).
    Data-parallel (``World.current()``): each rank its shard of every batch (``_backward``, ``_epoch_metrics``).
    """
    device, world = data.device, World.current()
    masked = MaskedParams(mask, model) if mask is not None else None
    if masked is not None:
        masked.weights_()
    opt = make_optimizer(model, t)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
    params = [p for g in opt.param_groups for p in g["params"]]
    forward = torch.compile(model, dynamic=False) if compile else model
    for epoch in range(start, end):
        t0 = time.perf_counter()
        generator = torch.Generator().manual_seed(derive_seed(order_seed, f"epoch:{epoch}"))
        steps = data.steps_per_epoch(t.batch_size) if epoch < t.warmup_epochs else 0   # >0: a per-step LR
        lr = _set_lr(opt, lr_at(t, epoch, 0, max(steps, 1)))
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        for step, (x, y) in enumerate(data.train_batches(t.batch_size, generator, shard=world.shard)):
            if steps and step:
                lr = _set_lr(opt, lr_at(t, epoch, step, steps))
            with autocast(amp, device):
                out = forward(to_input(x, amp))
                loss = F.cross_entropy(out.float(), y, reduction=t.loss_reduction)
            opt.zero_grad(set_to_none=True)
            _backward(loss, world, t.loss_reduction, params)
            if masked is not None:
                masked.grads_()
            if t.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            opt.step()
            if masked is not None:
                masked.weights_()
            loss_sum += loss.detach() if t.loss_reduction == "sum" else loss.detach() * y.numel()
            correct += (out.argmax(1) == y).sum()
            seen += y.numel()
        train_loss, train_accuracy = _epoch_metrics(model, world, loss_sum, correct, seen)
        if not math.isfinite(train_loss):
            raise DivergedError(f"{phase}: training loss became {train_loss} in epoch {epoch + 1} (lr {lr:g})")
        record = {"phase": phase, "epoch": epoch + 1, "lr": lr, "train_loss": train_loss,
                  "train_accuracy": train_accuracy}
        record["seconds"] = time.perf_counter() - t0  # training time only; evaluation excluded
        record.update(evaluate(model, data, amp))
        if on_epoch_end is not None:
            on_epoch_end(record, opt)
        yield record
