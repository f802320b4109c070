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
through ``ctx.on_epoch`` (``search_loop``, the loop CTS runs too; unlike CTS's, these searches do
not continue once interrupted: they start again).
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..masking import Mask, kept_count, layer_shapes
from .. import runtime
from ..models import prunable
from ..train import autocast, to_input
from . import DEFAULT_INIT  # the paper defaults: in the torch-free registry
from .base import SearchContext, Ticket
from .cts import float64_norm
from .search_loop import Clock, Searcher, search_loop

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


class FrozenWeightSearch(Searcher):
    """A strong ticket's part of the search loop: CE of ``net`` with ``masked_weights`` (BatchNorm on
    batch statistics), its gradient to ``params`` (``adjust``ed, e.g. by a density controller), the
    optimiser's step, then ``project``; ``final`` mask and scores, ``extra`` facts for the ticket."""

    def __init__(self, ctx: SearchContext, net: nn.Module, params: list[Tensor], opt: torch.optim.Optimizer):
        self.ctx, self.net, self.params, self.opt = ctx, net, params, opt
        net.train()

    def step(self, x: Tensor, y: Tensor, idx: Tensor) -> Tensor:
        ctx = self.ctx
        with autocast(ctx.amp, ctx.device):
            out = functional_call(self.net, self.masked_weights(), (to_input(x, ctx.amp),))
        loss = self.scaled(F.cross_entropy(out.float(), y))
        grads = torch.autograd.grad(loss, self.params)
        self.world.sum_(*grads)   # the whole batch's gradient before the controller reads it
        for p, g in zip(self.params, self.adjust(list(grads))):
            p.grad = g
        self.opt.step()
        self.project()
        return loss

    def masked_weights(self) -> dict:
        raise NotImplementedError

    def adjust(self, grads: list[Tensor]) -> list[Tensor]:
        return grads

    def project(self) -> None:
        pass

    def final(self) -> tuple[Mask, Tensor]:
        """The ticket's mask and its flat scores (higher = more worth keeping)."""
        raise NotImplementedError

    def extra(self) -> dict:
        return {}


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
        nc = float64_norm(g_c)
        ratio = torch.where(nc > 0, float64_norm(g_task) / nc.clamp_min(1e-300), torch.zeros_like(nc))
        self.nu = ratio if self.nu is None else 0.99 * self.nu + 0.01 * ratio
        self.integral = self.integral + err
        self.lam = self.nu * (self.K_P * err + self.integral)
        return g_task + self.lam.to(g_task.dtype) * g_c


def gate_box(kappa: float, sigma: float) -> tuple[float, float, float]:
    """(μ₀, lo, hi): Φ((μ₀ + 0.5)/σ) = κ, and μ ∈ [lo, hi] keeps a = (μ + 0.5)/σ in [a_lo, a_hi]."""
    if kappa < 1:
        a0 = torch.special.ndtri(torch.tensor(kappa, dtype=torch.float64)).item()
        a_lo, a_hi = min(-3.0, a0 - 1), max(3.0, a0 + 1)
    else:  # everything kept: start (and stay) fully open
        a_lo, a_hi = -3.0, 3.0
        a0 = a_hi
    return sigma * a0 - 0.5, sigma * a_lo - 0.5, sigma * a_hi - 0.5


class GateSearch(FrozenWeightSearch):
    """gates' part of the search loop: the gate parameters μ, their noise, controller and box."""

    def __init__(self, ctx: SearchContext, net: nn.Module, params: dict):
        s = ctx.cfg.search
        self.names = list(params)
        self.weights = [params[n].detach() for n in self.names]
        self.sizes = [w.numel() for w in self.weights]
        self.d = sum(self.sizes)
        self.sigma, self.k = s.gate_sigma, kept_count(s.density, self.d)
        self.mu0, self.lo, self.hi = gate_box(s.density, self.sigma)
        self.mu = torch.full((self.d,), self.mu0, device=ctx.device, requires_grad=True)
        super().__init__(ctx, net, [self.mu], torch.optim.Adam([self.mu], lr=ctx.cfg.mask_lr))
        self.controller = DensityController(s.density, self.d, self.sigma)
        self.noise = ctx.generator("noise", ctx.device)

    def masked_weights(self) -> dict:
        eps = torch.randn(self.d, device=self.ctx.device, generator=self.noise)
        z = torch.clamp(self.mu + 0.5 + self.sigma * eps, 0.0, 1.0)
        return {n: w * zi.view_as(w) for n, w, zi in zip(self.names, self.weights, z.split(self.sizes))}

    def adjust(self, grads: list[Tensor]) -> list[Tensor]:
        return [self.controller.grad(self.mu.detach(), grads[0])]

    def project(self) -> None:
        with torch.no_grad():
            self.mu.clamp_(self.lo, self.hi)

    def record(self) -> dict:
        m = self.mu.detach()
        return {"expected_density": _phi_cdf((m + 0.5) / self.sigma).mean().item(),
                "hard_density": (m + 0.5 > 0).float().mean().item(),
                "lambda": float(self.controller.lam)}

    def final(self) -> tuple[Mask, Tensor]:
        scores = self.mu.detach().cpu()   # global top-κd of μ
        return Mask.top_k(scores, self.k, layer_shapes(self.net)), scores

    def extra(self) -> dict:
        return {"gate_mu_init": self.mu0}


def gates(ctx: SearchContext) -> Ticket:
    return _strong_ticket(ctx, GateSearch)


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


class PopupSearch(FrozenWeightSearch):
    """edge-popup's part of the search loop: the scores, each layer's top-k_l of |score|."""

    def __init__(self, ctx: SearchContext, net: nn.Module, params: dict):
        self.names, self.shapes = list(params), layer_shapes(net)
        score_gen = ctx.generator("scores")
        self.scores = []
        with torch.no_grad():
            for n in self.names:
                sc = torch.empty(params[n].shape)
                nn.init.kaiming_uniform_(sc, a=math.sqrt(5), generator=score_gen)
                self.scores.append(sc.to(ctx.device).requires_grad_(True))
        self.weights = [params[n].detach() for n in self.names]
        self.ks = [kept_count(ctx.cfg.search.density, w.numel()) for w in self.weights]
        super().__init__(ctx, net, self.scores,
                         torch.optim.SGD(self.scores, lr=ctx.cfg.mask_lr, momentum=ctx.cfg.training.momentum))
        self.prev: Optional[Tensor] = None   # the last epoch's mask, flat

    def masked_weights(self) -> dict:
        return {n: w * _TopK.apply(sc.abs(), k) for n, w, sc, k in zip(self.names, self.weights, self.scores, self.ks)}

    def magnitudes(self) -> Tensor:
        """|score| of every weight, flat, on the CPU."""
        return torch.cat([sc.detach().abs().reshape(-1).cpu() for sc in self.scores])

    def mask(self) -> Mask:
        return Mask.top_k_per_layer(self.magnitudes(), dict(zip(self.names, self.ks)), self.shapes)

    def record(self) -> dict:
        flat = self.mask().flat()
        changed = 1.0 if self.prev is None else float((flat & ~self.prev).sum()) / max(int(flat.sum()), 1)
        self.prev = flat
        return {"hard_density": float(flat.float().mean()), "topk_changed": changed}

    def final(self) -> tuple[Mask, Tensor]:
        return self.mask(), self.magnitudes()


def edge_popup(ctx: SearchContext) -> Ticket:
    return _strong_ticket(ctx, PopupSearch)


# ---------------------------------------------------------------------------------- common

def _strong_ticket(ctx: SearchContext, method: type[FrozenWeightSearch]) -> Ticket:
    """``method``'s search over a frozen draw of the network; the ticket holds those weights."""
    clock = Clock()
    net = _frozen_copy(ctx)
    params = prunable(net)
    _draw_frozen(ctx, params)
    searcher = method(ctx, net, params)
    done = search_loop(ctx, searcher, clock)
    mask, scores = searcher.final()
    state = _finish(ctx, net, mask)
    return Ticket(mask=mask, seconds=clock.seconds(), scores=scores, history=done.history, weights=state,
                  extra={"search_epochs": ctx.cfg.search_epochs, "search_steps": done.steps, **searcher.extra(),
                         "strong_init": strong_init(ctx.cfg)})


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
