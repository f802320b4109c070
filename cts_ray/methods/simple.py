"""Data-free one-shot baselines (SPEC §2): magnitude and random."""
from __future__ import annotations

import time

import torch

from ..masking import Mask, kept_count, layer_shapes
from ..models import prunable
from .base import SearchContext, Ticket


def magnitude(ctx: SearchContext) -> Ticket:
    """Global top-κd of |w| at the search point."""
    t0 = time.perf_counter()
    scores = torch.cat([p.detach().abs().flatten().float() for p in prunable(ctx.model).values()])
    shapes = layer_shapes(ctx.model)
    mask = Mask.top_k(scores, kept_count(ctx.cfg.search.density, scores.numel()), shapes)
    return Ticket(mask=mask, seconds=time.perf_counter() - t0, scores=scores.cpu())


def random(ctx: SearchContext) -> Ticket:
    """Uniformly random, κ of each layer (so per-layer densities equal the target)."""
    t0 = time.perf_counter()
    g = ctx.generator("mask")
    layers = {}
    for name, p in prunable(ctx.model).items():
        k = kept_count(ctx.cfg.search.density, p.numel())
        flat = torch.zeros(p.numel(), dtype=torch.bool)
        flat[torch.randperm(p.numel(), generator=g)[:k]] = True
        layers[name] = flat.view(p.shape)
    return Ticket(mask=Mask(layers), seconds=time.perf_counter() - t0)
