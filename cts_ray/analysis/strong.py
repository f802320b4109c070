"""Strong tickets (weights never trained): sparsity against accuracy per method and frozen weights.

A strong ticket's accuracy depends on the weights it selects from as much as on the selection, so
every column names its weights: ``search.strong_init``, null resolved to the method's paper
default (gates: kaiming_uniform, edge_popup: signed_constant). Columns on the same weights differ
only in how the mask was chosen (both methods draw the same weights for a seed when the knob is set).
"""
from __future__ import annotations

import re

from ..methods import DEFAULT_INIT, METHODS
from . import stats
from .comparison import mean_std
from ..errors import AnalysisError
from ..wording import count
from .load import Results, method_key


def weights(flat: dict) -> str:
    """The frozen weights of a strong-ticket trial, resolved."""
    return flat.get("search.strong_init") or DEFAULT_INIT[flat["search.method"]]


def _column(label: str, init: str) -> str:
    """The setting's label less its strong_init (named as the weights instead)."""
    base = re.sub(r"strong_init=\w+(, )?", "", label).replace(", )", ")").replace(" ()", "")
    return f"{base} on {init}"


def analyse(res: Results) -> dict:
    t = res.trials
    t = t[t["method"].map(lambda m: m in METHODS and METHODS[m].strong) & (t["sanity"] == "none")]
    if t.empty:
        raise AnalysisError("strong tickets: no gates or edge_popup trials (without a sanity check) here")
    t = t.assign(weights=[weights(f) for f in t["_flat"]])
    t = t.assign(column=[_column(lb, w) for lb, w in zip(t["label"], t["weights"])])
    keys = {c: (w, method_key(m), c) for c, w, m in zip(t["column"], t["weights"], t["method"])}
    columns = sorted(keys, key=keys.get)   # grouped by weights, methods in registry order
    cells = {(round(100 * (1 - d), 6), c): g["accuracy"].to_numpy()
             for (d, c), g in t.groupby(["target_density", "column"])}
    sparsities = sorted({s for s, _ in cells})
    return {"columns": columns, "sparsities": sparsities, "cells": cells}


def markdown(result: dict) -> str:
    cols, cells = result["columns"], result["cells"]
    ns = {len(a) for a in cells.values()}
    out = ["| sparsity % | " + " | ".join(cols) + " |", "|---:|" + "---:|" * len(cols)]
    for s in result["sparsities"]:
        row = [(mean_std(cells[s, c]) + ("" if len(ns) == 1 else f" (n={len(cells[s, c])})"))
               if (s, c) in cells else "–" for c in cols]
        out.append(f"| {s:.4g} | " + " | ".join(row) + " |")
    seeds = f"over {count(next(iter(ns)), 'seed')}" if len(ns) == 1 else "(n seeds)"
    return "\n".join(out + ["", f"Test accuracy % of the strong ticket as found (never trained), mean ± std {seeds}. "
                                "Rows: sparsity = 1 − target density, in % of prunable weights. Columns: method "
                                "on its frozen weights (`search.strong_init`; null is the method's paper default: "
                                "gates kaiming_uniform, edge_popup signed_constant); with the knob set, columns on "
                                "the same weights select from identical tensors at each seed. " + stats.RULE])
