"""Sanity checks (Frankle et al. 2021, SPEC §3), applied to any ticket before retraining.

``reinit`` keeps the mask; the pipeline swaps the weights for a fresh draw from the initialiser.
"""
from __future__ import annotations

import torch

from .masking import Mask


def shuffle(mask: Mask, scores, generator: torch.Generator) -> Mask:
    """Permute each layer's mask: per-layer densities kept, positions forgotten."""
    out = {}
    for name, m in mask.layers.items():
        flat = m.reshape(-1)
        out[name] = flat[torch.randperm(flat.numel(), generator=generator)].view(m.shape)
    return Mask(out)


def invert(mask: Mask, scores, generator: torch.Generator) -> Mask:
    """Keep each layer's lowest-scoring weights, as many as the ticket kept there."""
    assert scores is not None, "config validation refuses invert for methods without scores"
    counts = {n: int(m.sum()) for n, m in mask.layers.items()}
    return Mask.top_k_per_layer(-scores.float(), counts, {n: m.shape for n, m in mask.layers.items()})


def apply(kind: str, mask: Mask, scores, generator: torch.Generator) -> Mask:
    if kind in ("none", "reinit"):
        return mask
    return {"shuffle": shuffle, "invert": invert}[kind](mask, scores, generator)
