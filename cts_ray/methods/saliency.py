"""Pruning-at-initialisation saliency baselines (SPEC §2): SNIP, GraSP, SynFlow.

Every method scores a deep copy of ``ctx.model``, so the model's weights, buffers (BatchNorm
running statistics), requires_grad flags and train/eval mode are left exactly as they were.
Scores are returned flat over all prunable weights in ``prunable()`` order, higher = keep, and
the mask is always ``Mask.top_k(scores, kept_count(κ, d))`` of the returned scores.

SNIP and GraSP score on one class-balanced batch (``scoring_batch``): ``examples_per_class``
training examples of each class, drawn with ``ctx.generator("batch")``, no augmentation, with
the copy in train mode (BatchNorm on batch statistics), in float32 (autocast is not used).
SynFlow never reads data; it takes only ``ctx.data.input_shape``.

Data-parallel: every rank scores the whole scoring batch (one batch: nothing worth splitting, and
sharding it would change BatchNorm's batch statistics) and takes rank 0's scores, so every rank
holds one worker's mask even where its kernels are not deterministic.
"""
from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..data import Batches
from ..distributed import World
from ..masking import Mask, kept_count, layer_shapes
from ..models import prunable
from .base import SearchContext, Ticket


# ---------------------------------------------------------------- shared helpers

def class_balanced_batch(data: Batches, per_class: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``per_class`` training examples of each class (all of a class if it has fewer), chosen
    by a random permutation from the CPU ``generator``; grouped by class, no augmentation."""
    y_cpu = data.train_y.cpu()
    perm = torch.randperm(len(y_cpu), generator=generator)
    grouped = perm[torch.sort(y_cpu[perm], stable=True).indices]   # by class, permutation order within
    counts = torch.bincount(y_cpu, minlength=data.num_classes)
    starts = torch.cumsum(counts, 0) - counts
    take = [grouped[int(s):int(s) + min(per_class, int(c))] for s, c in zip(starts, counts)]
    return data.examples(torch.cat(take))


def scoring_batch(ctx: SearchContext) -> tuple[Tensor, Tensor]:
    """The SNIP/GraSP scoring batch of ``ctx`` (the same batch on every call)."""
    x, y = class_balanced_batch(ctx.data, ctx.cfg.search.examples_per_class, ctx.generator("batch"))
    return x.to(ctx.device), y.to(ctx.device)


def _scoring_copy(model: nn.Module, train: bool, dtype=None) -> tuple[nn.Module, list[Tensor]]:
    """A deep copy whose prunable weights (returned, in prunable() order) alone require grad."""
    clone = copy.deepcopy(model)
    if dtype is not None:
        clone = clone.to(dtype)
    clone.train(train)
    for p in clone.parameters():
        p.requires_grad_(False)
        p.grad = None
    weights = list(prunable(clone).values())
    for w in weights:
        w.requires_grad_(True)
    return clone, weights


def _flat(tensors) -> Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _ticket(model: nn.Module, scores: Tensor, density: float, t0: float) -> Ticket:
    scores = scores.detach().float()
    World.current().broadcast_(scores)   # rank 0's scores: one mask on every rank
    scores = scores.cpu()
    mask = Mask.top_k(scores, kept_count(density, scores.numel()), layer_shapes(model))
    return Ticket(mask=mask, seconds=time.perf_counter() - t0, scores=scores, history=[])


# ---------------------------------------------------------------- SNIP

def snip(ctx: SearchContext) -> Ticket:
    """Lee et al. 2019: score |w ⊙ ∂L/∂w| (cross-entropy on the scoring batch); keep the top κd."""
    t0 = time.perf_counter()
    x, y = scoring_batch(ctx)
    clone, weights = _scoring_copy(ctx.model, train=True)
    loss = F.cross_entropy(clone(x), y)
    grads = torch.autograd.grad(loss, weights)
    scores = _flat(w * g for w, g in zip(weights, grads)).abs()
    return _ticket(ctx.model, scores, ctx.cfg.search.density, t0)


# ---------------------------------------------------------------- GraSP

def grasp_hg(model: nn.Module, weights: list[Tensor], x: Tensor, y: Tensor, temperature: float) -> list[Tensor]:
    """H g for L = CE(f(x)/T, y): g = ∂L/∂w (detached), then Hg = ∂(g · ∂L/∂w)/∂w.
    The Hessian is taken with respect to ``weights`` only (the other parameters held fixed)."""
    # Hg differentiates twice; the fused attention kernels cannot be, PyTorch's math attention can
    with sdpa_kernel(SDPBackend.MATH):
        loss = F.cross_entropy(model(x) / temperature, y)
    grads = torch.autograd.grad(loss, weights, create_graph=True)
    z = sum((g.detach() * g_live).sum() for g, g_live in zip(grads, grads))
    return list(torch.autograd.grad(z, weights))


def grasp(ctx: SearchContext) -> Ticket:
    """Wang et al. 2020: S = −w ⊙ (H g) with logits divided by ``grasp_temperature``.

    GraSP removes the weights with the HIGHEST S (removing them reduces gradient flow the
    least), i.e. it keeps the lowest S. Our convention is higher = keep, so the returned
    scores are −S = w ⊙ (H g) and the mask is their top κd.
    """
    t0 = time.perf_counter()
    x, y = scoring_batch(ctx)
    clone, weights = _scoring_copy(ctx.model, train=True)
    hg = grasp_hg(clone, weights, x, y, ctx.cfg.search.grasp_temperature)
    s = -_flat(w * h for w, h in zip(weights, hg))      # GraSP's S
    return _ticket(ctx.model, -s, ctx.cfg.search.density, t0)


# ---------------------------------------------------------------- SynFlow

def _top_k_among(scores: Tensor, idx: Tensor, k: int) -> Tensor:
    """The k of the (ascending) flat indices ``idx`` with the highest ``scores``, ascending again.
    Ties go to the lower index (stable sort over ascending indices)."""
    order = torch.sort(scores[idx], descending=True, stable=True).indices
    return torch.sort(idx[order[:k]]).values


def synflow(ctx: SearchContext) -> Ticket:
    """Tanaka et al. 2020, data-free iterative synaptic flow.

    On a float64 copy in eval mode (BatchNorm on its running statistics) every parameter is
    replaced by its absolute value (weights, biases, BN affine parameters; buffers are left as
    they are, as in the authors' code which linearises parameters). Input: one all-ones sample of
    ``ctx.data.input_shape``; R = sum of the outputs; score = |w| ⊙ ∂R/∂w with the current mask
    applied to the copy's weights. Round t = 1..T keeps the global top
    kept_count(κ^(t/T), d) among the weights still kept, so the last round keeps exactly ⌊κd⌉.
    Signs need no restoring: only the mask leaves this function.

    Returned scores (flat float32, higher = keep) are the last round's scores in log space —
    SynFlow scores span far more than float32's range — ordered so that their top-κd is the
    mask: kept weights get log s; pruned weights get log s (their score of being re-added:
    |w| ⊙ ∂R/∂w at the masked network) shifted below every kept weight, so the invert sanity
    check still orders pruned weights meaningfully.
    """
    t0 = time.perf_counter()
    s_cfg = ctx.cfg.search
    clone, weights = _scoring_copy(ctx.model, train=False, dtype=torch.float64)
    with torch.no_grad():
        for p in clone.parameters():
            p.abs_()
    abs_w = [w.detach().clone() for w in weights]
    sizes = [w.numel() for w in weights]
    d = sum(sizes)
    ones = torch.ones((1, *ctx.data.input_shape), dtype=torch.float64, device=ctx.device)
    idx = torch.arange(d, device=ctx.device)        # weights still kept, ascending
    keep = torch.ones(d, dtype=torch.float64, device=ctx.device)
    rounds = s_cfg.synflow_rounds
    for t in range(1, rounds + 1):
        with torch.no_grad():
            for w, a, m in zip(weights, abs_w, keep.split(sizes)):
                torch.mul(a, m.view_as(a), out=w)
        grads = torch.autograd.grad(clone(ones).sum(), weights)
        scores = _flat(a * g for a, g in zip(abs_w, grads))   # ≥ 0; pruned: |w_orig| ⊙ ∂R/∂w
        World.current().broadcast_(scores)   # each round's kept set is rank 0's
        k = kept_count(s_cfg.density, d) if t == rounds else kept_count(s_cfg.density ** (t / rounds), d)
        idx = _top_k_among(scores, idx, k)
        keep.zero_()[idx] = 1.0
    keep = keep.bool()

    log_s = scores.clamp_min(1e-300).log()          # ≥ −690.8, finite
    if (~keep).any():
        shift = log_s[~keep].max() - log_s[keep].min() + 1.0
        log_s = torch.where(keep, log_s, log_s - shift.clamp_min(0.0))
    out = _ticket(ctx.model, log_s, s_cfg.density, t0)
    assert torch.equal(out.mask.flat(), keep.cpu()), "synflow: returned scores do not reproduce the mask"
    return out
