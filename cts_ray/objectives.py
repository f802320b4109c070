"""The CTS objective family (SPEC §1): each is one function of the sparse and dense outputs.

Every objective takes ``Outputs`` of the masked network (with gradient) and of the unmasked
teacher on the same batch (without gradient) plus the labels, and returns a scalar.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Outputs:
    logits: Tensor
    features: list[Tensor] = field(default_factory=list)  # filled only for objectives that need them


def ce(s: Outputs, d: Outputs, y: Tensor) -> Tensor:
    return F.cross_entropy(s.logits.float(), y)


def kl_reverse(s: Outputs, d: Outputs, y: Tensor) -> Tensor:
    """KL(p_s || p_d), batch mean: CTS-KL, the default."""
    ls, ld = F.log_softmax(s.logits.float(), 1), F.log_softmax(d.logits.float(), 1)
    return F.kl_div(ld, ls, log_target=True, reduction="batchmean")


def kl_forward(s: Outputs, d: Outputs, y: Tensor) -> Tensor:
    """KL(p_d || p_s), batch mean."""
    ls, ld = F.log_softmax(s.logits.float(), 1), F.log_softmax(d.logits.float(), 1)
    return F.kl_div(ls, ld, log_target=True, reduction="batchmean")


def mse_logits(s: Outputs, d: Outputs, y: Tensor) -> Tensor:
    return F.mse_loss(s.logits.float(), d.logits.float())


def _standardise(a: Tensor) -> Tensor:
    a = a.float().flatten(1)
    return (a - a.mean(1, keepdim=True)) / (a.std(1, keepdim=True) + 1e-5)


def feature_mse(s: Outputs, d: Outputs, y: Tensor) -> Tensor:
    """Mean over layers of the MSE between per-sample standardised activations."""
    losses = [F.mse_loss(_standardise(a), _standardise(b)) for a, b in zip(s.features, d.features)]
    return torch.stack(losses).mean()


# keyed by names.OBJECTIVES (torch-free, for config validation; tests check the two agree)
OBJECTIVES = {"ce": ce, "kl_reverse": kl_reverse, "kl_forward": kl_forward,
              "mse_logits": mse_logits, "feature_mse": feature_mse}
NEEDS_FEATURES = {"feature_mse"}
