"""Inference cost: which method's tickets are cheapest to run at equal accuracy.

An unstructured ticket runs at the dense cost; its compact form (``cts_ray/compact.py``: dead units
and channels dropped, constants folded) is a narrower dense network that runs faster on any
hardware. Each cell sets a setting's test accuracy beside its compact FLOPs as a share of the dense
network's, per target density.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import AnalysisError
from .comparison import mean_std
from .load import Results, settings

# accuracies within this many points of a density's best count as equal when naming the cheapest
EQUAL_POINTS = 1.0


def analyse(res: Results) -> dict:
    t = res.trials[res.trials["sanity"] == "none"]
    if "compact_flops_fraction" not in t or t["compact_flops_fraction"].isna().all():
        raise AnalysisError("inference cost: no trial recorded its compact ticket's FLOPs "
                            "(tables written before cts-ray recorded them, or transformers only)")
    t = t[t["compact_flops_fraction"].notna()]
    rows = settings(t)
    densities = sorted(set(t["target_density"]), reverse=True)
    cells = {(lb, d): g for (lb, d), g in t.groupby(["label", "target_density"])}
    cheapest = {}
    for d in densities:
        here = {lb: cells[lb, d] for lb in rows if (lb, d) in cells}
        best = max(g["accuracy"].mean() for g in here.values())
        equal = {lb: g["compact_flops_fraction"].mean() for lb, g in here.items()
                 if g["accuracy"].mean() >= best - EQUAL_POINTS}
        cheapest[d] = min(equal, key=equal.get)
    return {"rows": rows, "densities": densities, "cells": cells, "cheapest": cheapest}


def _cell(g) -> str:
    flops = 100 * np.asarray(g["compact_flops_fraction"], dtype=float)
    spread = "" if len(flops) == 1 or math.isclose(flops.min(), flops.max()) else \
        f" ({flops.min():.3g}–{flops.max():.3g})"
    return f"{mean_std(g['accuracy'])} % · {flops.mean():.3g} %{spread}"


def markdown(result: dict) -> str:
    ds, cells = result["densities"], result["cells"]
    out = ["| setting | " + " | ".join(f"density {d:.4g}" for d in ds) + " |", "|---|" + "---:|" * len(ds)]
    for lb in result["rows"]:
        out.append(f"| {lb} | " + " | ".join(_cell(cells[lb, d]) if (lb, d) in cells else "–" for d in ds) + " |")
    cheapest = "; ".join(f"density {d:.4g}: {lb}" for d, lb in result["cheapest"].items())
    return "\n".join(out + [
        "", "Each cell: test accuracy % (mean ± std over seeds) · the compact ticket's FLOPs (multiply-adds "
            "per example) as a % of the dense network's, mean (min–max over seeds). Cheapest to run among the "
            f"settings within {EQUAL_POINTS:g} point of the density's best accuracy: {cheapest}."])
