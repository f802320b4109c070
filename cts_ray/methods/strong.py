"""Strong-ticket methods (SPEC §2): relaxed Bernoulli gates and edge-popup.

A strong ticket is a mask over weights that are never trained. Both methods work on a deep copy
of ``ctx.model`` (whose weights, buffers and ``requires_grad`` flags are left untouched), replace
its parameters by a fixed, seeded draw that does not depend on the search point, search a mask
with those weights frozen, and return them as ``Ticket.weights``: a full state dict holding the
*unmasked* frozen weights (so the pipeline's sanity variants can mask them differently) and
BatchNorm running statistics recomputed for the final mask (cumulative average over one pass of
the training set in train mode, no gradient), so that the ticket is evaluated in eval mode
exactly as searched.

Frozen parameters (both methods): biases of Conv/Linear layers and attention input projections 0,
BatchNorm and LayerNorm weight 1 and bias 0 (PyTorch's default initialisation; for edge-popup this
is its "non-affine BatchNorm"). Other parameters (a ViT's class token and position embedding,
Swin's relative position tables) stay as the search-point model holds them.

Frozen prunable weights: ``search.strong_init`` (``strong_init(cfg)`` resolves it), drawn on CPU
layer by layer in parameter order. Null = the method's paper default below, from the method's own
generator (``<method>:init``), exactly the draw these methods made before the knob existed. Set
to a value, both methods draw from one generator (``strong:init``), so gates and edge-popup at one
seed select from identical weights and a sweep compares selection alone:
- ``kaiming_uniform``: ``nn.init.kaiming_uniform_(w, a=0, nonlinearity="relu")``, U(±√(6/fan_in));
- ``signed_constant``: ±√(2/fan_in), each sign +1/−1 with probability ½;
- ``kaiming_normal``: N(0, 2/fan_in), the project's ordinary initialisation.

**gates** (Tsayag & Lindenbaum, arXiv 2603.08914)
- Weights (default): He-uniform, ``kaiming_uniform`` above (the variance of the project's
  Kaiming-normal init; the paper's "uniform initialisation").
- One gate parameter μ per prunable weight (one flat vector). Training gate
  z = clamp(μ + 0.5 + σε, 0, 1), ε ~ N(0, 1) per weight per step (``ctx.generator("noise")``);
  evaluation gate clamp(μ + 0.5, 0, 1). σ = ``search.gate_sigma``.
- μ is initialised to σ·Φ⁻¹(κ) − 0.5, so the expected open fraction mean Φ((μ + 0.5)/σ) starts at
  exactly κ and the controller only has to hold it there. After every step μ is projected onto
  a = (μ + 0.5)/σ ∈ [min(−3, Φ⁻¹(κ) − 1), max(3, Φ⁻¹(κ) + 1)]: outside ±3 a gate is shut/open with
  probability > 99.8 %, its gradients vanish and Adam (at the default mask LR 0.1, a full step of
  0.1 per coordinate) would otherwise park gates there for good, out of the controller's reach.
- Loss = CE + λ · mean Φ((μ + 0.5)/σ). λ is set by ``DensityController`` (below), a PI controller
  in GradBalance units on the equality constraint mean Φ = κ, not a hand-tuned constant. It is
  two-sided (λ may be < 0) because with random weights the task loss may pull the density either
  way (strong tickets often prefer ~50 % density).
- Limitation: at densities where a random κ-mask disconnects the network (κ ≲ 0.1 % for
  mlp_digits) no gate ever sees a task gradient and the search cannot start.
- Adam on μ at the mask LR (``search.lr``, null → ``training.lr``), ×0.1 at ``search.lr_drop``.
- Final mask: global top-κd of μ (exact density, ties to the lower index).

**edge_popup** (Ramanujan et al. 2020)
- Weights (default): ``signed_constant`` above, sign·√2/√fan_in per layer (the Kaiming-normal std).
- Scores: ``kaiming_uniform_(s, a=√5)`` (the authors' code; U(−1/√fan_in, 1/√fan_in)) from
  ``ctx.generator("scores")``. Forward: each layer keeps its top-k_l by |score|,
  k_l = kept_count(κ, numel_l). Straight-through estimator: the binary mask passes the gradient
  of the masked weight to |score| unchanged, so ∂L/∂s = ∂L/∂(w·m) · w · sign(s) (the chain rule
  through |·|, as in the authors' code; for s > 0 this is ∂L/∂(w·m)·w).
- SGD with momentum ``training.momentum`` and no weight decay on the scores at the mask LR,
  ×0.1 at ``search.lr_drop``.
- Final mask: per-layer top-k_l of |score|.

Both: BatchNorm on batch statistics during the search, ``cfg.search_epochs`` epochs over the
training set without augmentation in the order of ``ctx.generator("order")``; one record per epoch
through ``ctx.on_epoch``.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..masking import Mask, kept_count, layer_shapes
from .. import runtime
from ..models import prunable
from ..train import DivergedError, autocast, to_input
from . import DEFAULT_INIT  # the paper defaults: in the torch-free registry
from .base import SearchContext, Ticket
from .cts import _norm

_SQRT2 = math.sqrt(2.0)


def _phi_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1 + torch.erf(x / _SQRT2))


def _phi_pdf(x: Tensor) -> Tensor:
    return torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _bn_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _frozen_copy(ctx: SearchContext) -> nn.Module:
    """A deep copy of the search-point model with every parameter frozen, biases 0, BN γ=1, β=0."""
    net = copy.deepcopy(ctx.model)
    weights = {id(p) for p in prunable(net).values()}
    with torch.no_grad():
        for p in net.parameters():
            p.requires_grad_(False)
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None and id(m.bias) not in weights:
                m.bias.zero_()
            elif isinstance(m, nn.MultiheadAttention) and m.in_proj_bias is not None:
                m.in_proj_bias.zero_()
        for m in _bn_modules(net) + [m for m in net.modules() if isinstance(m, nn.LayerNorm)]:
            if m.weight is not None:
                m.weight.fill_(1.0)
            if m.bias is not None:
                m.bias.zero_()
    return net


def strong_init(cfg) -> str:
    """The frozen weights' initialisation: ``search.strong_init``, or the method's paper default."""
    return cfg.search.strong_init or DEFAULT_INIT[cfg.search.method]


@torch.no_grad()
def _draw_frozen(ctx: SearchContext, params: dict) -> None:
    """Replace the prunable weights in ``params`` by the strong ticket's frozen draw (module doc)."""
    kind = strong_init(ctx.cfg)
    # null: the method's own stream, as before the knob; set: one stream shared by both methods
    gen = ctx.generator("init") if ctx.cfg.search.strong_init is None else \
        runtime.generator(ctx.cfg.seed, "strong:init")
    for p in params.values():
        w = torch.empty(p.shape)
        if kind == "kaiming_uniform":
            nn.init.kaiming_uniform_(w, a=0, nonlinearity="relu", generator=gen)
        elif kind == "kaiming_normal":
            nn.init.kaiming_normal_(w, nonlinearity="relu", generator=gen)
        else:
            sign = torch.where(torch.rand(p.shape, generator=gen) < 0.5, -1.0, 1.0)
            w = sign * (_SQRT2 / math.sqrt(_fan_in(p.shape)))
        p.copy_(w)


def _fan_in(shape: torch.Size) -> int:
    return int(math.prod(shape[1:])) if len(shape) > 1 else int(shape[0])


@torch.no_grad()
def recompute_bn(net: nn.Module, ctx: SearchContext, generator: torch.Generator) -> None:
    """Reset BN running statistics and re-estimate them for ``net`` as it is (mask applied by the
    caller): one pass over the training set in train mode, cumulative average (momentum None)."""
    bns = _bn_modules(net)
    if not bns:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    was_training = net.training
    net.train()
    try:
        for x, _ in ctx.data.train_batches(ctx.cfg.training.batch_size, generator, augment=False):
            with autocast(ctx.amp, ctx.device):
                net(to_input(x, ctx.amp))
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        net.train(was_training)


def _search_loop(ctx: SearchContext, net: nn.Module, params: list[Tensor], opt: torch.optim.Optimizer,
                 masked_weights: Callable[[], dict], adjust_grads: Callable[[list[Tensor]], list[Tensor]],
                 epoch_record: Callable[[], dict],
                 project: Optional[Callable[[], None]] = None) -> tuple[list[dict], int]:
    """Shared loop: CE of the masked network (BN on batch statistics), gradient to ``params``
    (optionally adjusted, e.g. by a density controller), optimiser step; one record per epoch."""
    cfg, s = ctx.cfg, ctx.cfg.search
    mask_lr = opt.param_groups[0]["lr"]
    epochs = cfg.search_epochs
    steps_per_epoch = ctx.data.steps_per_epoch(cfg.training.batch_size)
    drop_step = int(s.lr_drop * epochs * steps_per_epoch)
    order = ctx.generator("order")
    history, step = [], 0
    net.train()
    for epoch in range(epochs):
        t0 = time.perf_counter()
        obj_sum = torch.zeros((), device=ctx.device)
        n_batches = 0
        for x, y in ctx.data.train_batches(cfg.training.batch_size, order, augment=False):
            if step == drop_step:
                for g in opt.param_groups:
                    g["lr"] = mask_lr * 0.1
            with autocast(ctx.amp, ctx.device):
                out = functional_call(net, masked_weights(), (to_input(x, ctx.amp),))
            loss = F.cross_entropy(out.float(), y)
            grads = torch.autograd.grad(loss, params)
            for p, g in zip(params, adjust_grads(list(grads))):
                p.grad = g
            opt.step()
            if project is not None:
                project()
            obj_sum += loss.detach()
            n_batches += 1
            step += 1
        with torch.no_grad():
            record = {"phase": "search", "epoch": epoch + 1, "lr": opt.param_groups[0]["lr"],
                      "objective": obj_sum.item() / max(n_batches, 1), **epoch_record()}
        record["seconds"] = time.perf_counter() - t0
        if not math.isfinite(record["objective"]):
            raise DivergedError(f"search: objective became {record['objective']} in epoch {epoch + 1}")
        history.append(record)
        ctx.on_epoch(record)
    return history, step


# ----------------------------------------------------------------------------------- gates

class DensityController:
    """λ for loss = CE + λ·mean Φ((μ + 0.5)/σ), driving mean Φ to κ (an equality constraint, so
    λ may be negative: with random weights the task may prefer fewer open gates than κ).

    A PI controller on the relative error e = mean Φ/κ − 1, in GradBalance units: with
    g_t = ∂CE/∂μ and g_c = ∂ mean Φ/∂μ, ν = EMA(0.99) of ‖g_t‖/‖g_c‖ (λ = ν is a density pull as
    strong as the task gradient) and λ = ν·(K_p·e + Σ_steps e), K_p = 50: a 2 % relative error
    pulls as hard as the task, the integral removes any steady-state offset. On digits the
    final density is within 1e-3 of κ for K_p anywhere in [10, 200]. ``lam`` is the last step's λ.
    """

    K_P = 50.0

    def __init__(self, kappa: float, d: int, sigma: float):
        self.kappa, self.d, self.sigma = kappa, d, sigma
        self.nu = None
        self.integral = 0.0
        self.lam = 0.0

    def grad(self, mu: Tensor, g_task: Tensor) -> Tensor:
        a = (mu + 0.5) / self.sigma
        g_c = _phi_pdf(a) / (self.sigma * self.d)
        err = _phi_cdf(a).mean() / self.kappa - 1
        nc = _norm(g_c)
        ratio = torch.where(nc > 0, _norm(g_task) / nc.clamp_min(1e-300), torch.zeros_like(nc))
        self.nu = ratio if self.nu is None else 0.99 * self.nu + 0.01 * ratio
        self.integral = self.integral + err
        self.lam = self.nu * (self.K_P * err + self.integral)
        return g_task + self.lam.to(g_task.dtype) * g_c


def gates(ctx: SearchContext) -> Ticket:
    cfg, s, device = ctx.cfg, ctx.cfg.search, ctx.device
    t_start = time.perf_counter()
    net = _frozen_copy(ctx)
    params = prunable(net)
    names, shapes = list(params), layer_shapes(net)
    _draw_frozen(ctx, params)
    weights = [params[n].detach() for n in names]
    sizes = [w.numel() for w in weights]
    d = sum(sizes)
    kappa, sigma = s.density, s.gate_sigma
    k = kept_count(kappa, d)

    # μ such that Φ((μ + 0.5)/σ) = κ; μ is kept in a box of a = (μ + 0.5)/σ ∈ [a_lo, a_hi]
    if kappa < 1:
        a0 = torch.special.ndtri(torch.tensor(kappa, dtype=torch.float64)).item()
        a_lo, a_hi = min(-3.0, a0 - 1), max(3.0, a0 + 1)
    else:  # everything kept: start (and stay) fully open
        a_lo, a_hi = -3.0, 3.0
        a0 = a_hi
    lo, hi = sigma * a_lo - 0.5, sigma * a_hi - 0.5
    mu0 = sigma * a0 - 0.5
    mu = torch.full((d,), mu0, device=device, requires_grad=True)
    opt = torch.optim.Adam([mu], lr=cfg.mask_lr)
    controller = DensityController(kappa, d, sigma)
    noise = ctx.generator("noise", device)

    def masked_weights() -> dict:
        eps = torch.randn(d, device=device, generator=noise)
        z = torch.clamp(mu + 0.5 + sigma * eps, 0.0, 1.0)
        return {n: w * zi.view_as(w) for n, w, zi in zip(names, weights, z.split(sizes))}

    def adjust(grads: list[Tensor]) -> list[Tensor]:
        return [controller.grad(mu.detach(), grads[0])]

    def epoch_record() -> dict:
        m = mu.detach()
        return {"expected_density": _phi_cdf((m + 0.5) / sigma).mean().item(),
                "hard_density": (m + 0.5 > 0).float().mean().item(),
                "lambda": float(controller.lam)}

    def project() -> None:
        with torch.no_grad():
            mu.clamp_(lo, hi)

    history, steps = _search_loop(ctx, net, [mu], opt, masked_weights, adjust, epoch_record, project)

    scores = mu.detach().cpu()
    mask = Mask.top_k(scores, k, shapes)
    state = _finish(ctx, net, mask)
    return Ticket(mask=mask, seconds=time.perf_counter() - t_start, scores=scores, history=history,
                  weights=state, extra={"search_epochs": cfg.search_epochs, "search_steps": steps,
                                        "gate_mu_init": mu0, "strong_init": strong_init(cfg)})


# ------------------------------------------------------------------------------ edge-popup

class _TopK(torch.autograd.Function):
    """Binary mask of the k largest entries; straight-through gradient."""

    @staticmethod
    def forward(ctx, a: Tensor, k: int) -> Tensor:
        flat = torch.zeros(a.numel(), dtype=a.dtype, device=a.device)
        flat[torch.topk(a.reshape(-1), k, sorted=False).indices] = 1
        return flat.view_as(a)

    @staticmethod
    def backward(ctx, g: Tensor):
        return g, None


def edge_popup(ctx: SearchContext) -> Ticket:
    cfg, s, device = ctx.cfg, ctx.cfg.search, ctx.device
    t_start = time.perf_counter()
    net = _frozen_copy(ctx)
    params = prunable(net)
    names, shapes = list(params), layer_shapes(net)
    _draw_frozen(ctx, params)
    score_gen = ctx.generator("scores")
    scores = []
    with torch.no_grad():
        for n in names:
            sc = torch.empty(params[n].shape)
            nn.init.kaiming_uniform_(sc, a=math.sqrt(5), generator=score_gen)
            scores.append(sc.to(device).requires_grad_(True))
    weights = [params[n].detach() for n in names]
    ks = [kept_count(s.density, w.numel()) for w in weights]
    opt = torch.optim.SGD(scores, lr=cfg.mask_lr, momentum=cfg.training.momentum)
    prev = [None]

    def masked_weights() -> dict:
        return {n: w * _TopK.apply(sc.abs(), k) for n, w, sc, k in zip(names, weights, scores, ks)}

    def current_mask() -> Mask:
        flat = torch.cat([sc.detach().abs().reshape(-1).cpu() for sc in scores])
        return Mask.top_k_per_layer(flat, dict(zip(names, ks)), shapes)

    def epoch_record() -> dict:
        flat = current_mask().flat()
        changed = 1.0 if prev[0] is None else float((flat & ~prev[0]).sum()) / max(int(flat.sum()), 1)
        prev[0] = flat
        return {"hard_density": float(flat.float().mean()), "topk_changed": changed}

    history, steps = _search_loop(ctx, net, scores, opt, masked_weights, lambda g: g, epoch_record)

    mask = current_mask()
    flat_scores = torch.cat([sc.detach().abs().reshape(-1).cpu() for sc in scores])
    state = _finish(ctx, net, mask)
    return Ticket(mask=mask, seconds=time.perf_counter() - t_start, scores=flat_scores, history=history,
                  weights=state, extra={"search_epochs": cfg.search_epochs, "search_steps": steps,
                                        "strong_init": strong_init(cfg)})


# ---------------------------------------------------------------------------------- common

def _finish(ctx: SearchContext, net: nn.Module, mask: Mask) -> dict:
    """State dict of ``net`` with its unmasked frozen weights and BN statistics of the masked net."""
    params = prunable(net)
    unmasked = {n: params[n].detach().clone() for n in mask.layers}
    with torch.no_grad():
        mask.apply_(net)
        recompute_bn(net, ctx, ctx.generator("bn"))
        for n, w in unmasked.items():
            params[n].copy_(w)
    net.eval()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}
