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


@dataclass(frozen=True)
class Method:
    search: Callable[[SearchContext], Ticket]
    strong: bool = False          # weights never trained: evaluated as is, no retraining
    scores: bool = True           # produces per-weight scores (the invert sanity check needs them)
    needs_trained: bool = False   # needs the dense network trained to the end (ctx.trained_state)
    # epochs the method itself trains or searches for (progress bar, epochs-equivalent accounting)
    epochs: Callable[[Config], int] = lambda cfg: 0
    # the method-specific config keys it reads; every other method's knobs do not apply to it
    # (tables, summaries and MLflow show them as null for it)
    knobs: tuple = ()


from . import cts, ltr, saliency, simple, strong  # noqa: E402  (the registry below refers to them)

def _search_epochs(cfg: Config) -> int:
    return cfg.search_epochs


_SEARCHED = ("search.length", "search.lr", "search.lr_drop")   # methods that train scores or logits

METHODS: dict[str, Method] = {
    "cts": Method(cts.search, epochs=_search_epochs,
                  knobs=("search.objective", "search.controller", "search.temperature", "search.slack",
                         "search.lr_drop_at", "search.loss_scale", "search.rescale", *_SEARCHED)),
    "ltr": Method(ltr.search, needs_trained=True, epochs=ltr.epochs,
                  knobs=("search.ltr_fraction", "search.ltr_output_fraction")),
    "snip": Method(saliency.snip, knobs=("search.examples_per_class",)),
    "grasp": Method(saliency.grasp, knobs=("search.examples_per_class", "search.grasp_temperature")),
    "synflow": Method(saliency.synflow, knobs=("search.synflow_rounds",)),
    "magnitude": Method(simple.magnitude),
    "random": Method(simple.random, scores=False),
    "gates": Method(strong.gates, strong=True, epochs=_search_epochs,
                    knobs=("search.gate_sigma", "search.strong_init", *_SEARCHED)),
    "edge_popup": Method(strong.edge_popup, strong=True, epochs=_search_epochs,
                         knobs=("search.strong_init", *_SEARCHED)),
}
KNOBS = frozenset(k for m in METHODS.values() for k in m.knobs)   # keys only some methods read


def applies(method: str, key: str) -> bool:
    """Whether config key ``key`` (dotted) can change what ``method`` does."""
    return key not in KNOBS or key in METHODS[method].knobs


def effective(flat: dict) -> dict:
    """A flattened config less the knobs its method does not read: two trials with equal
    ``effective`` configs are the same experiment (SNIP at two CTS temperatures)."""
    return {k: v for k, v in flat.items() if applies(flat["search.method"], k)}
