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
import warnings
from typing import Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..masking import Mask, kept_count, layer_shapes, top_k_flat
from ..models import prunable, prunable_modules
from ..objectives import NEEDS_FEATURES, OBJECTIVES, Outputs
from ..train import to_input
from .base import SearchContext, Ticket
from .search_loop import Clock, Searcher, search_loop


def float64_norm(x: Tensor) -> Tensor:
    """‖x‖₂ accumulated in float64: squares of any float32/bf16 value neither overflow nor underflow
    there, and it is one pass over x (the search is bound by passes over d elements)."""
    return torch.linalg.vector_norm(x, dtype=torch.float64)


def gradbalance(theta: Tensor, g_task: Tensor, lam, budget: float, mask_lr: float, sig=None, total=None):
    """λ* = ‖g_t‖/‖g_c‖ while over budget, else 0; λ ← 0.99 λ + 0.01 λ* (λ = λ* on step one).
    Returns (gradient, λ); pure, so it runs eagerly or inside the compiled update alike. ``sig``,
    ``total``: σ(θ) and its sum when the caller has them."""
    sig = torch.sigmoid(theta) if sig is None else sig
    over = (sig.sum() if total is None else total) > budget   # C(θ) > 0
    s1 = sig * (1 - sig)                                # g_c = σ(1 − σ) / budget
    nt, nc = float64_norm(g_task), float64_norm(s1) / budget
    lam_star = torch.where(over & (nc > 0), nt / nc.clamp_min(1e-300), torch.zeros_like(nt))
    lam = lam_star if lam is None else 0.99 * lam + 0.01 * lam_star
    return g_task + (lam / budget).to(g_task.dtype) * s1, lam


def lagrange(theta: Tensor, g_task: Tensor, lam, budget: float, mask_lr: float, sig=None, total=None):
    """Loss R + λC with λ ≥ 0 raised by gradient ascent at 0.01 × the mask learning rate."""
    sig = torch.sigmoid(theta) if sig is None else sig
    lam = lam if lam is not None else torch.zeros((), device=theta.device)
    g = g_task + lam * sig * (1 - sig) / budget
    return g, (lam + 0.01 * mask_lr * ((sig.sum() if total is None else total) / budget - 1)).clamp_min(0)


CONTROLLERS = {"gradbalance": gradbalance, "lagrange": lagrange}


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


def logistic_noise(u: Tensor) -> Tensor:
    """L = log u − log(1 − u) = logit(u): one vectorised pass instead of four. Always eager, so the
    compiled search sees exactly the eager search's noise. u < 1 always (torch.rand), and
    1 - 1e-10 rounds to 1 in fp32: clamp below only."""
    return torch.logit(u.clamp_(min=1e-10))


# lowbias32's multipliers (C. Wellons' hash-prospector), the second as the int32 it wraps to
_MIX = (0x7feb352d, 0x846ca68b - (1 << 32))


def _mix32(x: Tensor) -> Tensor:
    """A bijective 32-bit hash on int32 (multiplies wrap alike on every backend; ``>>`` is arithmetic on
    int32, so the sign bits it shifts in are masked off)."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _MIX[0]
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _MIX[1]
    return x ^ ((x >> 16) & 0xFFFF)


def counter_noise(key: Tensor, n: int) -> Tensor:
    """Logistic noise L_i = logit(u_i) with u_i from a keyed hash of the index i (``search.step: fused``):
    nothing serial and nothing stored, so it is computed inside the fused mask pass. ``key``: two int32
    words drawn per step from the search's noise generator. u takes 2^24 centred values in (0, 1), all
    distinct within a step (the hash of i is a bijection)."""
    x = _mix32(_mix32(torch.arange(n, dtype=torch.int32, device=key.device) ^ key[0]) ^ key[1])
    return torch.logit(((x >> 8) & 0xFFFFFF).float() * 2.0 ** -24 + 2.0 ** -25)


def draw_key(generator: torch.Generator) -> Tensor:
    return torch.randint(-2 ** 31, 2 ** 31 - 1, (2,), dtype=torch.int32, device=generator.device, generator=generator)


def masked_weights(theta: Tensor, noise: Tensor, weights: list, tau: float) -> tuple[list, Tensor]:
    """The relaxed mask m = σ(θ + L/τ) applied to each frozen weight (eager reference)."""
    m = torch.sigmoid(theta + noise / tau)
    return [w * mi.view_as(w) for w, mi in zip(weights, m.split([w.numel() for w in weights]))], m


class _RelaxedMask(torch.autograd.Function):
    """``masked_weights`` with its backward written out in autograd's own order of operations
    (∂θ = (cat(∂wm·w) · (1 − m)) · m, ATen's sigmoid_backward), so that compiled, one fused pass
    each way, it computes bit for bit what the eager search computes."""

    @staticmethod
    def forward(theta, noise, tau, *weights):
        m = torch.sigmoid(theta + noise / tau)
        parts = m.split([w.numel() for w in weights])
        # σ(θ) for the controller, in the same pass (θ does not change before the update)
        return (m, torch.sigmoid(theta), *[w * mi.view_as(w) for w, mi in zip(weights, parts)])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[0], *inputs[3:])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_m, grad_sig, *grads):
        m, *weights = ctx.saved_tensors
        g = torch.cat([(gw * w).reshape(-1) if gw is not None else torch.zeros_like(w).reshape(-1)
                       for gw, w in zip(grads, weights)])
        return (g * (1 - m) * m, None, None, *[None] * len(weights))


def _masked_fused(theta: Tensor, noise: Tensor, weights: list, tau: float) -> tuple[list, Tensor, Tensor]:
    m, sig, *masked = _RelaxedMask.apply(theta, noise, tau, *weights)
    return masked, m, sig


def _masked_counter(theta: Tensor, key: Tensor, weights: list, tau: float) -> tuple[list, Tensor, Tensor]:
    """``search.step: fused``: the noise, the mask and the masked weights in one pass."""
    return _masked_fused(theta, counter_noise(key, theta.numel()), weights, tau)


def rescaled(masked: list, m: Tensor, rescale: str) -> list:
    """Inverted-dropout scaling (a constant: not a gradient path). Always eager: its sums must be
    ATen's, summed in ATen's order, for the compiled search to find the eager search's masks."""
    if rescale == "global":
        c = m.numel() / m.sum().detach().clamp_min(1e-12)
        return [w * c for w in masked]
    if rescale == "layer":
        return [w * (mi.numel() / mi.sum().detach().clamp_min(1e-12))
                for w, mi in zip(masked, m.split([w.numel() for w in masked]))]
    return masked


def controlled(theta: Tensor, g_task: Tensor, lam: Tensor, sig: Tensor, total: Tensor, *, controller: str,
               budget: float, mask_lr: float, loss_scale: float):
    """The controller's gradient times the loss scale: eager, or one compiled graph (one pass for the
    norms, one for the gradient). σ(θ)'s sum comes in from ATen: summed in another order it would
    move λ, and through λ the masks."""
    g, lam = CONTROLLERS[controller](theta, g_task, lam, budget, mask_lr, sig, total)
    return (g * loss_scale if loss_scale != 1 else g), lam


class Step:
    """One search step's mask and update. ``exact`` (the reference): noise from the generator's stream,
    eager or through ``torch.compile`` (the same operations fused into a few passes over θ, bit for bit
    the eager result), then torch's Adam. ``fused`` (``search.step``): counter-based noise computed
    inside the compiled mask pass, the controller's sums in its graph, torch's fused Adam: fewer
    passes, another random stream. Weights, noise (or its key) and λ are inputs: no recompiles per
    step. Adam's state stays torch's (``opt``, checkpointable) either way."""

    def __init__(self, weights, tau, rescale, controller, budget, mask_lr, loss_scale, opt, compiled: bool,
                 fused: bool = False):
        self.weights, self.tau, self.rescale, self.opt, self.compiled = weights, tau, rescale, opt, compiled
        self.fused, self.lam, self._proven = fused, None, False
        self.options = dict(controller=controller, budget=budget, mask_lr=mask_lr, loss_scale=loss_scale)
        self._eager = _masked_counter if fused else masked_weights
        self._mask, self._update = self._eager, None
        if compiled:
            self._mask = torch.compile(_masked_counter if fused else _masked_fused, dynamic=False, fullgraph=True)
            self._update = torch.compile(controlled, dynamic=False, fullgraph=True)

    def masked(self, theta: Tensor, noise: Tensor) -> list:
        """``noise``: logistic noise (exact) or the step's two-word key (fused)."""
        try:
            out = self._mask(theta, noise, self.weights, self.tau)
        except Exception as e:   # the first compiled call compiles (no C++ compiler here?): go eager
            if not self.compiled or self._proven:
                raise
            warnings.warn(f"resources.compile_search: torch.compile failed ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); searching eagerly")
            self.compiled, self._mask = False, self._eager
            out = self._eager(theta, noise, self.weights, self.tau)
        self._proven = True
        self._sig = out[2] if self.compiled or self.fused else None
        return rescaled(out[0], out[1], self.rescale)

    def update(self, theta: Tensor, g_task: Tensor) -> None:
        # step one eagerly, where λ comes into being. Exact: σ(θ)'s sum is ATen's and so is Adam (its
        # fused-multiply-add lerp is not what a compiled graph computes); fused: both in the graph/kernel
        compiled = self.compiled and self.lam is not None
        sig = self._sig if compiled or self.fused else None
        total = None if sig is None or self.fused else sig.sum()
        theta.grad, self.lam = (self._update if compiled else controlled)(
            theta.detach(), g_task, self.lam, sig, total, **self.options)
        self.opt.step()


def batch_independent(model: nn.Module) -> bool:
    """Whether the network in train mode computes each example's output on its own (no batch
    statistics, no dropout): then the frozen teacher's outputs can be computed once per example."""
    from torchvision.ops import StochasticDepth
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            return False
        if isinstance(mod, (nn.modules.dropout._DropoutNd, StochasticDepth)) and mod.p > 0:
            return False
        if isinstance(mod, nn.MultiheadAttention) and mod.dropout > 0:
            return False
    return True


TEACHER_CACHE_BYTES = 1 << 29   # 512 MiB: logits always fit; conv feature maps of big sets may not


def teacher_outputs(model: nn.Module, data, batch_size: int, need_features: bool, amp: bool):
    """The frozen teacher's outputs for every training example, or None where they depend on the batch
    or would not fit. Computed in batches of the search's own size (per-example results of a batch
    of that size are what the search would compute itself; the tests check the masks are unchanged)."""
    if not batch_independent(model):
        return None
    feats: list = []
    hooks = capture_features(model, feats) if need_features else contextlib.nullcontext()
    logits, features = [], []
    with torch.no_grad(), hooks:
        for i, x in enumerate(data.in_order(batch_size)):
            feats.clear()
            logits.append(model(to_input(x, amp)))
            features.append(list(feats))
            if i == 0 and (logits[0].numel() + sum(f.numel() for f in feats)) * 4 * (data.n_train / len(
                    logits[0])) > TEACHER_CACHE_BYTES:
                return None
    return Outputs(torch.cat(logits), [torch.cat(f) for f in zip(*features)] if need_features else [])


def use_compile(setting: Optional[bool], device: torch.device, work: int, fused: bool = False) -> bool:
    """``resources.compile_search``; null compiles a fused step always (that is what it is for) and an
    exact one on CUDA where the search's passes over θ are many enough to repay a compile. Not an
    exact one on CPU: there the step is bound by memory traffic over θ-sized arrays, most of it in the
    parts that must stay ATen's (noise, Adam), and fusing the rest measured no faster (bench steps)."""
    if setting is not None:
        return setting
    return fused or (device.type == "cuda" and work >= COMPILE_WORTH)


COMPILE_WORTH = 10 ** 9   # θ entries x steps; MNIST LeNet-300-100 at search length 0.5: 266k x 1k steps x 5 epochs = 1.3e9


class ConcreteSearch(Searcher):
    """CTS's part of the search loop: θ, its optimiser and step, the noise, the frozen teacher."""

    resumable = True

    def __init__(self, ctx: SearchContext):
        cfg, s, self.ctx = ctx.cfg, ctx.cfg.search, ctx
        params = prunable(ctx.model)
        self.names = list(params)
        weights = [params[n].detach() for n in self.names]
        self.d = d = sum(w.numel() for w in weights)
        kappa = s.density
        self.k = kept_count(kappa, d)
        self.theta = torch.full((d,), math.log(kappa / (1 - kappa)) if kappa < 1 else 20.0,
                                device=ctx.device, requires_grad=True)
        self.fused = s.step == "fused"
        self.opt = torch.optim.Adam([self.theta], lr=cfg.mask_lr, fused=self.fused or None)
        self.objective = OBJECTIVES[s.objective]
        self.need_teacher, self.need_features = s.objective != "ce", s.objective in NEEDS_FEATURES
        self.noise = ctx.generator("noise", ctx.device)
        work = d * ctx.data.steps_per_epoch(cfg.training.batch_size) * cfg.search_epochs
        compiled = use_compile(cfg.resources.compile_search, ctx.device, work, self.fused)
        self.step_fn = Step(weights, s.temperature, s.rescale, s.controller, (1 + s.slack) * kappa * d,
                            cfg.mask_lr, s.loss_scale, self.opt, compiled, self.fused)
        self.prev_top, self.cached, self.feats = None, None, []

    def feature_hooks(self):
        """Hooks putting each prunable layer's output into ``feats`` (for objectives that need them)."""
        return capture_features(self.ctx.model, self.feats) if self.need_features else contextlib.nullcontext()

    def prepare(self) -> None:
        if self.need_teacher and self.cached is None:   # once, timed with the search
            ctx = self.ctx
            self.cached = teacher_outputs(ctx.model, ctx.data, ctx.cfg.training.batch_size, self.need_features,
                                          ctx.amp) or False

    def teacher(self, x: Tensor, idx: Tensor) -> Outputs:
        if self.cached:
            return Outputs(self.cached.logits[idx], [f[idx] for f in self.cached.features])
        if not self.need_teacher:
            return Outputs(None)
        self.feats.clear()
        with torch.no_grad():
            return Outputs(self.ctx.model(x), list(self.feats))

    def step(self, x: Tensor, y: Tensor, idx: Tensor) -> Tensor:
        x = to_input(x, self.ctx.amp)
        dense = self.teacher(x, idx)
        self.feats.clear()
        L = draw_key(self.noise) if self.fused else \
            logistic_noise(torch.rand(self.d, device=self.ctx.device, generator=self.noise))
        masked = dict(zip(self.names, self.step_fn.masked(self.theta, L)))
        sparse = Outputs(functional_call(self.ctx.model, masked, (x,)), list(self.feats))
        loss = self.scaled(self.objective(sparse, dense, y))
        (g_task,) = torch.autograd.grad(loss, self.theta)
        self.world.sum_(g_task)   # the whole batch's gradient before the controller reads it
        self.step_fn.update(self.theta, g_task)
        return loss

    def record(self) -> dict:
        theta, lam = self.theta.detach(), self.step_fn.lam
        top = top_k_flat(theta, self.k)
        changed = 1.0 if self.prev_top is None else ((top & ~self.prev_top).sum() / self.k).item()
        self.prev_top = top
        return {"expected_density": torch.sigmoid(theta).mean().item(),
                "hard_density": (theta > 0).float().mean().item(),
                "lambda": 0.0 if lam is None else float(lam), "topk_changed": changed}

    def state(self) -> dict:
        return {"theta": self.theta.detach(), "noise": self.noise.get_state(), "prev_top": self.prev_top,
                "lam": self.step_fn.lam}

    def load(self, state: dict) -> None:
        with torch.no_grad():
            self.theta.copy_(state["theta"])
        self.step_fn.lam = None if state["lam"] is None else state["lam"].to(self.ctx.device)
        self.noise.set_state(state["noise"])
        self.prev_top = state["prev_top"].to(self.ctx.device)


@contextlib.contextmanager
def frozen(model: nn.Module):
    """Every parameter without gradient inside, as it was after."""
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(requires[n])


def search(ctx: SearchContext) -> Ticket:
    clock = Clock()
    with frozen(ctx.model):
        cts = ConcreteSearch(ctx)
        with batch_statistics(ctx.model), cts.feature_hooks(), torch.autocast(ctx.device.type, enabled=False):
            done = search_loop(ctx, cts, clock, ctx.cfg.search.lr_drop_at)
    scores = cts.theta.detach().cpu()
    mask = Mask.top_k(scores, cts.k, layer_shapes(ctx.model))
    return Ticket(mask=mask, seconds=clock.seconds(), scores=scores, history=done.history,
                  extra={"search_epochs": ctx.cfg.search_epochs, "search_steps": done.steps,
                         "compiled": cts.step_fn.compiled, "teacher_cached": bool(cts.cached)})
