"""What a method receives and returns: ``SearchContext`` in, ``Ticket`` out (both need torch, so
they live here and not in the torch-free registry, ``methods/__init__.py``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
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
    # per-epoch metrics (search or retraining); a method that can continue an interrupted search also
    # passes its state (plain tensors and numbers, on the CPU), which comes back as ``resume``
    on_epoch: Callable[..., None] = lambda record, state=None: None
    resume: Optional[dict] = None
    trained_state: Optional[dict] = None   # dense weights at the end of training (methods with needs_trained)
    dense_seconds: float = 0.0             # seconds the dense training took
    # pipeline.make_retrain: retrain (mask, search-point weights) to the end, exactly as the pipeline
    # does; returns {"final": last epoch record, "peak_test_accuracy", "seconds", "start", "state"}.
    retrain: Optional[Callable[..., dict]] = None
    cache: Optional[object] = None         # the sweep's DenseCache, for work shared across trials (LTR rounds)

    def generator(self, tag: str, device="cpu") -> torch.Generator:
        from ..runtime import generator
        return generator(self.cfg.seed, f"{self.cfg.search.method}:{tag}", device)


@dataclass
class Ticket:
    mask: Mask
    seconds: float                       # the method's own compute (wall seconds)
    scores: Optional[Tensor] = None      # flat, higher = more worth keeping (used by the invert check)
    history: list = field(default_factory=list)    # per-epoch search records
    weights: Optional[dict] = None       # state dict replacing the search-point weights (strong tickets)
    levels: list = field(default_factory=list)     # LTR: one dict per pruning level
    level_masks: list = field(default_factory=list)  # LTR: the Mask of each level
    retrained: Optional[dict] = None     # set when the method already retrained its final ticket
    extra: dict = field(default_factory=dict)
