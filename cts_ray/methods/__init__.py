"""Ticket methods, one registry keyed by ``search.method``.

A method takes the model at the search point plus data (a ``SearchContext``) and returns a
``Ticket``. Adding a method is one module and one line in ``METHODS``; retraining, evaluation
and logging do not change.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..config import Config
from ..data import DeviceData
from ..masking import Mask


@dataclass
class SearchContext:
    cfg: Config
    model: nn.Module            # at the search point, on `device`; methods must leave its weights as they found them
    data: DeviceData
    device: torch.device
    amp: bool = False
    on_epoch: Callable[[dict], None] = lambda record: None   # per-epoch search metrics

    def generator(self, tag: str, device="cpu") -> torch.Generator:
        from ..runtime import generator
        return generator(self.cfg.seed, f"{self.cfg.search.method}:{tag}", device)


@dataclass
class Ticket:
    mask: Mask
    seconds: float
    scores: Optional[Tensor] = None     # flat, higher = more worth keeping (used by the invert check)
    history: list = field(default_factory=list)
    strong: bool = False                # weights never trained: evaluated as is, no retraining
    extra: dict = field(default_factory=dict)


from . import cts, simple  # noqa: E402  (the registry below refers to them)

METHODS: dict[str, Callable[[SearchContext], Ticket]] = {
    "cts": cts.search,
    "magnitude": simple.magnitude,
    "random": simple.random,
}
