"""Sanity checks (Frankle et al. 2021, SPEC §3), applied to any ticket before retraining.

``reinit`` keeps the mask; the pipeline swaps the weights for a fresh draw from the initialiser.
"""
from __future__ import annotations

import torch

from .config import ConfigError
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
    if scores is None:
        raise ConfigError("search.sanity: 'invert' needs a method that scores weights; "
                          "choose one of: none, shuffle, reinit for this method")
    out, i = {}, 0
    for name, m in mask.layers.items():
        n = m.numel()
        s = scores[i:i + n].float()
        i += n
        order = torch.sort(s, descending=False, stable=True).indices
        flat = torch.zeros(n, dtype=torch.bool)
        flat[order[:int(m.sum())]] = True
        out[name] = flat.view(m.shape)
    return Mask(out)


def apply(kind: str, mask: Mask, scores, generator: torch.Generator) -> Mask:
    if kind in ("none", "reinit"):
        return mask
    return {"shuffle": shuffle, "invert": invert}[kind](mask, scores, generator)
