"""Concrete Ticket Search (SPEC §1, Arora & Teuscher, arXiv 2512.07142).

Parameterisation: we optimise θ directly, mask m = σ(θ + L/τ) with L = log u − log(1 − u),
θ initialised to logit(κ). (The authors' code optimises α = τθ; the two differ only in the size
of an Adam step.) Weights are frozen, BatchNorm uses batch statistics and its running buffers
are restored afterwards, so the dense teacher is exactly the search-point network. The search runs
in fp32 even where training uses autocast, as the authors' code does (SPEC §1).
"""
from __future__ import annotations

import contextlib
import math
import time

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..masking import Mask, kept_count, layer_shapes
from ..models import prunable, prunable_modules
from ..objectives import NEEDS_FEATURES, OBJECTIVES, Outputs
from ..runtime import cpu_copy
from ..train import to_input
from . import SearchContext, Ticket


def _norm(x: Tensor) -> Tensor:
    """‖x‖₂ accumulated in float64: squares of any float32/bf16 value neither overflow nor underflow
    there, and it is one pass over x (the search is bound by passes over d elements)."""
    return torch.linalg.vector_norm(x, dtype=torch.float64)


class GradBalance:
    """λ* = ‖g_t‖/‖g_c‖ while over budget, else 0; λ ← 0.99 λ + 0.01 λ* (λ = λ* on step one)."""

    def __init__(self, budget: float, mask_lr: float):
        self.budget = budget
        self.lam = None

    def grad(self, theta: Tensor, g_task: Tensor) -> Tensor:
        sig = torch.sigmoid(theta)
        over = sig.sum() > self.budget                      # C(θ) > 0
        s1 = sig.mul_(1 - sig)                              # g_c = σ(1 − σ) / budget
        nt, nc = _norm(g_task), _norm(s1) / self.budget
        lam_star = torch.where(over & (nc > 0), nt / nc.clamp_min(1e-300), torch.zeros_like(nt))
        self.lam = lam_star if self.lam is None else 0.99 * self.lam + 0.01 * lam_star
        return g_task + (self.lam / self.budget).to(g_task.dtype) * s1


class Lagrange:
    """Loss R + λC with λ ≥ 0 raised by gradient ascent at 0.01 × the mask learning rate."""

    def __init__(self, budget: float, mask_lr: float):
        self.budget = budget
        self.lr = 0.01 * mask_lr
        self.lam = None

    def grad(self, theta: Tensor, g_task: Tensor) -> Tensor:
        sig = torch.sigmoid(theta)
        lam = self.lam if self.lam is not None else torch.zeros((), device=theta.device)
        g = g_task + lam * sig * (1 - sig) / self.budget
        self.lam = (lam + self.lr * (sig.sum() / self.budget - 1)).clamp_min(0)
        return g


CONTROLLERS = {"gradbalance": GradBalance, "lagrange": Lagrange}


@contextlib.contextmanager
def batch_statistics(model: nn.Module):
    """Train mode (BatchNorm on batch statistics) with every buffer restored on exit."""
    saved = {n: b.clone() for n, b in model.named_buffers()}
    was_training = model.training
    model.train()
    try:
        yield
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(saved[n])
        model.train(was_training)


@contextlib.contextmanager
def capture_features(model: nn.Module, store: list):
    """Append each prunable layer's output to ``store`` during forward passes."""
    hooks = [m.register_forward_hook(lambda mod, inp, out: store.append(out))
             for m in prunable_modules(model).values()]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def search(ctx: SearchContext) -> Ticket:
    cfg, s, model, device = ctx.cfg, ctx.cfg.search, ctx.model, ctx.device
    t_start = time.perf_counter()
    params = prunable(model)
    names, shapes = list(params), layer_shapes(model)
    weights = [params[n].detach() for n in names]
    sizes = [w.numel() for w in weights]
    d = sum(sizes)
    kappa = s.density
    k = kept_count(kappa, d)

    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    theta = torch.full((d,), math.log(kappa / (1 - kappa)) if kappa < 1 else 20.0,
                       device=device, requires_grad=True)
    mask_lr = cfg.mask_lr
    opt = torch.optim.Adam([theta], lr=mask_lr)
    controller = CONTROLLERS[s.controller]((1 + s.slack) * kappa * d, mask_lr)
    objective = OBJECTIVES[s.objective]
    need_teacher = s.objective != "ce"
    need_features = s.objective in NEEDS_FEATURES
    noise = ctx.generator("noise", device)
    order = ctx.generator("order")
    steps_per_epoch = ctx.data.steps_per_epoch(cfg.training.batch_size)
    epochs = cfg.search_epochs
    # The authors drop the mask LR after epoch int(0.88 * epochs); ours (the default) after that step.
    drop_step = (int(s.lr_drop * epochs) * steps_per_epoch if s.lr_drop_at == "epoch"
                 else int(s.lr_drop * epochs * steps_per_epoch))
    tau = s.temperature

    history, step, prev_top, first_epoch, seconds_before = [], 0, None, 0, 0.0
    if ctx.resume is not None:   # continue an interrupted search after its last finished epoch
        r = ctx.resume
        with torch.no_grad():
            theta.copy_(r["theta"])
        opt.load_state_dict(r["optimizer"])
        controller.lam = None if r["lam"] is None else r["lam"].to(device)
        noise.set_state(r["noise"])
        order.set_state(r["order"])
        prev_top = r["prev_top"].to(device)
        history, step, first_epoch, seconds_before = list(r["history"]), r["step"], r["epoch"], r["seconds"]
    feats: list = []
    hooks = capture_features(model, feats) if need_features else contextlib.nullcontext()
    try:
        with batch_statistics(model), hooks, torch.autocast(device.type, enabled=False):
            for epoch in range(first_epoch, epochs):
                t0 = time.perf_counter()
                obj_sum = torch.zeros((), device=device)
                n_batches = 0
                for x, y in ctx.data.train_batches(cfg.training.batch_size, order, augment=False):
                    if step == drop_step:
                        for g in opt.param_groups:
                            g["lr"] = mask_lr * 0.1
                    x = to_input(x, ctx.amp)
                    feats.clear()
                    if need_teacher:
                        with torch.no_grad():
                            dense = Outputs(model(x), list(feats))
                    else:
                        dense = Outputs(None)
                    feats.clear()
                    # L = log u − log(1 − u) = logit(u): one vectorised pass instead of four.
                    # u < 1 always (torch.rand), and 1 - 1e-10 rounds to 1 in fp32: clamp below only.
                    u = torch.rand(d, device=device, generator=noise).clamp_(min=1e-10)
                    m = torch.sigmoid(theta + torch.logit(u).div_(tau))
                    masked = {n: w * mi.view_as(w) for n, w, mi in zip(names, weights, m.split(sizes))}
                    if s.rescale != "none":   # inverted-dropout scaling (a constant: not a gradient path)
                        scale = [d / m.sum().detach().clamp_min(1e-12)] * len(sizes) if s.rescale == "global" else \
                            [mi.numel() / mi.sum().detach().clamp_min(1e-12) for mi in m.split(sizes)]
                        masked = {n: w * c for (n, w), c in zip(masked.items(), scale)}
                    sparse = Outputs(functional_call(model, masked, (x,)), list(feats))
                    loss = objective(sparse, dense, y)
                    (g_task,) = torch.autograd.grad(loss, theta)
                    theta.grad = controller.grad(theta.detach(), g_task)
                    if s.loss_scale != 1:   # the authors' x100 on the objective and the controller's pull
                        theta.grad.mul_(s.loss_scale)
                    opt.step()
                    obj_sum += loss.detach()
                    n_batches += 1
                    step += 1
                with torch.no_grad():
                    top = torch.zeros(d, dtype=torch.bool, device=device)
                    top[torch.topk(theta, k).indices] = True
                    changed = 1.0 if prev_top is None else ((top & ~prev_top).sum() / k).item()
                    prev_top = top
                    lam = controller.lam
                    record = {"phase": "search", "epoch": epoch + 1, "lr": opt.param_groups[0]["lr"],
                              "objective": obj_sum.item() / max(n_batches, 1),
                              "expected_density": torch.sigmoid(theta).mean().item(),
                              "hard_density": (theta > 0).float().mean().item(),
                              "lambda": 0.0 if lam is None else float(lam),
                              "topk_changed": changed,
                              "seconds": time.perf_counter() - t0}
                if not math.isfinite(record["objective"]):
                    from ..train import DivergedError
                    raise DivergedError(f"search: objective became {record['objective']} in epoch {epoch + 1}")
                history.append(record)
                ctx.on_epoch(record, cpu_copy({
                    "epoch": epoch + 1, "step": step, "theta": theta.detach(), "optimizer": opt.state_dict(),
                    "noise": noise.get_state(), "order": order.get_state(), "prev_top": prev_top, "lam": lam,
                    "history": list(history), "seconds": seconds_before + time.perf_counter() - t_start}))
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(requires[n])

    scores = theta.detach().cpu()
    mask = Mask.top_k(scores, k, shapes)
    return Ticket(mask=mask, seconds=seconds_before + time.perf_counter() - t_start, scores=scores, history=history,
                  extra={"search_epochs": epochs, "search_steps": step})
