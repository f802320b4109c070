"""Ticket methods, one registry keyed by ``search.method``.

A method takes the model at the search point plus data (a ``SearchContext``) and returns a
``Ticket`` (both in ``base.py``). Adding a method is one module and one line in ``METHODS``;
retraining, evaluation and logging do not change.

This module imports no torch: config validation, ``--dry-run`` and ``cts-ray report`` read the
registry's metadata, and a method's search function (named "module:function") is imported on
first use.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    from ..config import Config
    from .base import SearchContext, Ticket


@dataclass(frozen=True)
class Method:
    function: str                 # "module:function" in this package: the search, SearchContext -> Ticket
    strong: bool = False          # weights never trained: evaluated as is, no retraining
    scores: bool = True           # produces per-weight scores (the invert sanity check needs them)
    needs_trained: bool = False   # needs the dense network trained to the end (ctx.trained_state)
    # epochs the method itself trains or searches for (progress bar, epochs-equivalent accounting)
    epochs: Callable[[Config], int] = lambda cfg: 0
    # the method-specific config keys it reads; every other method's knobs do not apply to it
    # (tables, summaries and MLflow show them as null for it)
    knobs: tuple = ()
    default_init: Optional[str] = None   # strong tickets: the frozen weights of the method's paper

    @property
    def search(self) -> Callable[[SearchContext], Ticket]:
        module, _, name = self.function.partition(":")
        return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def _search_epochs(cfg: Config) -> int:
    return cfg.search_epochs


def rounds_for(density: float, fraction: float) -> int:
    """LTR's pruning rounds: the r whose density (1 - fraction)^r is nearest ``density``."""
    return max(1, round(math.log(density) / math.log(1 - fraction)))


def ltr_epochs(cfg: Config, rounds: Optional[int] = None) -> int:
    """Training epochs LTR spends: dense to the end, then every round's retraining."""
    if rounds is None:
        rounds = rounds_for(cfg.search.density, cfg.search.ltr_fraction)
    return cfg.training.epochs + rounds * (cfg.training.epochs - cfg.search_epoch)


_SEARCHED = ("search.length", "search.lr", "search.lr_drop")   # methods that train scores or logits

METHODS: dict[str, Method] = {
    "cts": Method("cts:search", epochs=_search_epochs,
                  knobs=("search.objective", "search.controller", "search.temperature", "search.slack",
                         "search.lr_drop_at", "search.loss_scale", "search.rescale", *_SEARCHED)),
    "ltr": Method("ltr:search", needs_trained=True, epochs=ltr_epochs,
                  knobs=("search.ltr_fraction", "search.ltr_output_fraction")),
    "snip": Method("saliency:snip", knobs=("search.examples_per_class",)),
    "grasp": Method("saliency:grasp", knobs=("search.examples_per_class", "search.grasp_temperature")),
    "synflow": Method("saliency:synflow", knobs=("search.synflow_rounds",)),
    "magnitude": Method("simple:magnitude"),
    "random": Method("simple:random", scores=False),
    "gates": Method("strong:gates", strong=True, epochs=_search_epochs, default_init="kaiming_uniform",
                    knobs=("search.gate_sigma", "search.strong_init", *_SEARCHED)),
    "edge_popup": Method("strong:edge_popup", strong=True, epochs=_search_epochs, default_init="signed_constant",
                         knobs=("search.strong_init", *_SEARCHED)),
}
KNOBS = frozenset(k for m in METHODS.values() for k in m.knobs)   # keys only some methods read
STRONG_INITS = ("kaiming_uniform", "signed_constant", "kaiming_normal")   # search.strong_init's values
DEFAULT_INIT = {name: m.default_init for name, m in METHODS.items() if m.strong}   # each paper's


def applies(method: str, key: str) -> bool:
    """Whether config key ``key`` (dotted) can change what ``method`` does."""
    return key not in KNOBS or key in METHODS[method].knobs


def effective(flat: dict) -> dict:
    """A flattened config less the knobs its method does not read: two trials with equal
    ``effective`` configs are the same experiment (SNIP at two CTS temperatures)."""
    return {k: v for k, v in flat.items() if applies(flat["search.method"], k)}


def __getattr__(name: str):
    """``methods.SearchContext`` and ``methods.Ticket`` as before the split: imported on first use."""
    if name in ("SearchContext", "Ticket"):
        return getattr(importlib.import_module(f"{__name__}.base"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
