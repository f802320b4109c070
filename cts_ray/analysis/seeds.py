"""Seed variance: per (method, density) mean, std, 95 % CI, min/max; do methods differ in variance
(Brown–Forsythe), and which methods are significantly better than which (paired over shared
seeds, Holm-corrected within each density)."""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np

from . import plots, stats
from ..errors import AnalysisError
from .load import Results, settings

ALPHA = stats.ALPHA


def analyse(res: Results) -> dict:
    df = res.trials[res.trials["sanity"] == "none"]
    cells = []
    for (label, density), g in df.groupby(["label", "target_density"], sort=False):
        mean, std, lo, hi = stats.mean_ci(g["accuracy"])
        cells.append({"label": label, "method": g["method"].iloc[0], "variant": g["variant"].iloc[0],
                      "density": density, "n": len(g), "seeds": sorted(g["seed"].tolist()), "mean": mean,
                      "std": std, "ci": (lo, hi), "min": float(g["accuracy"].min()), "max": float(g["accuracy"].max())})
    if max(c["n"] for c in cells) < 2:
        raise AnalysisError(f"seed variance: every (method, density) has one seed here "
                            f"(seeds: {sorted(set(df['seed']))}); sweep ≥ 2, e.g. grid: {{seed: [0, 1, 2]}}")
    variance_tests, pairs = [], []
    for density, g in df.groupby("target_density", sort=True):   # every setting, named by its label
        by = {m: dict(zip(x["seed"], x["accuracy"])) for m, x in g.groupby("label")}
        multi = {m: v for m, v in by.items() if len(v) >= stats.MIN_TEST}
        if len(multi) >= 2:
            sds = {m: float(np.std(list(v.values()), ddof=1)) for m, v in multi.items()}
            variance_tests.append({"density": density, "methods": sorted(multi), "p": stats.levene_p(
                [np.array(list(v.values())) for v in multi.values()]), "stds": sds})
        found = []
        for a, b in itertools.combinations(sorted(by), 2):
            diff, p, test, n = stats.compare(by[a], by[b])
            found.append({"density": density, "a": a, "b": b, "diff": diff, "p": p, "test": test, "n": n})
        for f, adj in zip(found, stats.holm([f["p"] for f in found])):
            f["p_holm"] = adj
            f["significant"] = not math.isnan(adj) and adj < ALPHA
        pairs += found
    return {"cells": sorted(cells, key=lambda c: (c["method"], c["label"], -c["density"])),
            "variance_tests": variance_tests, "pairs": pairs}



def markdown(result: dict) -> str:
    out = ["| method | density % | seeds | mean % | std, points | 95 % CI, % | min % | max % |", "|---|---:|---|---:|---:|---|---:|---:|"]
    for c in result["cells"]:
        out.append(f"| {c['label']} | {100 * c['density']:.3g} | {','.join(map(str, c['seeds']))} | {stats.fmt(c['mean'])} "
                   f"| {stats.fmt(c['std'])} | [{stats.fmt(c['ci'][0])}, {stats.fmt(c['ci'][1])}] | {stats.fmt(c['min'])} | {stats.fmt(c['max'])} |")
    out += ["", "Columns: *seeds* the seeds of the setting; *mean*, *std* (sample, ≥ 2 seeds), *95 % CI* "
                "(Student t on the mean), *min*, *max* of its test accuracy in %. " + stats.RULE]
    if result["variance_tests"]:
        out += ["", "Do the methods' seed variances differ? (Brown–Forsythe test, per density)", "",
                "| density % | seed std per method | p | verdict |", "|---:|---|---:|---|"]
        for t in result["variance_tests"]:
            sds = ", ".join(f"{m} {s:.2f}" for m, s in sorted(t["stds"].items(), key=lambda kv: kv[1]))
            verdict = "variances differ" if t["p"] < ALPHA else "no detectable difference"
            out.append(f"| {100 * t['density']:.3g} | {sds} | {stats.p_text(t['p'])} | {verdict} |")
    if not result["variance_tests"]:
        out += ["", f"Variance test: not run (needs ≥ {stats.MIN_TEST} seeds for at least two methods at a density)."]
    sig = [p for p in result["pairs"] if p["significant"]]
    tested = [p for p in result["pairs"] if not math.isnan(p["p"])]
    if not tested:
        out += ["", f"Pairwise tests: not run (need ≥ {stats.MIN_TEST} seeds per method)."]
        return "\n".join(out)
    out += ["", f"Significantly better (two-sided, Holm-corrected p < {ALPHA} within each density; "
                f"{len(tested)} pairs tested, {len(sig)} significant):", ""]
    if sig:
        out += ["| density % | better | worse | difference, points | test (seeds) | p (Holm) |", "|---:|---|---|---:|---|---:|"]
        for p in sorted(sig, key=lambda p: (-p["density"], -abs(p["diff"]))):
            better, worse = (p["a"], p["b"]) if p["diff"] > 0 else (p["b"], p["a"])
            out.append(f"| {100 * p['density']:.3g} | {better} | {worse} | {abs(p['diff']):.2f} "
                       f"| {p['test']} ({p['n']}) | {stats.p_text(p['p_holm'])} |")
    else:
        out.append("none")
    return "\n".join(out)


def plot(res: Results, result: dict, out: Path) -> list[str]:
    """Per density: every seed as a dot, and the mean with its 95 % CI, per method."""
    main = res.trials[res.trials["sanity"] == "none"]
    densities = sorted(set(main["target_density"]), reverse=True)
    methods = settings(main)
    fig, axes = plots.figure(ncols=len(densities))
    for ax, d in zip(axes, densities):
        g = main[main["target_density"] == d]
        for i, m in enumerate(methods):
            acc = g[g["label"] == m]["accuracy"].to_numpy()
            if not len(acc):
                continue
            mean, _, lo, hi = stats.mean_ci(acc)
            ax.scatter(np.full(len(acc), i) + np.linspace(-0.12, 0.12, len(acc)), acc, s=14, alpha=0.7, color="C0")
            if not math.isnan(lo):
                ax.errorbar([i], [mean], yerr=[[mean - lo], [hi - mean]], fmt="_", color="C3", capsize=4,
                            markersize=14, label="mean ± 95 % CI" if i == 0 else None)
        ax.set_xticks(range(len(methods)), methods, rotation=60, fontsize="small")
        ax.set_title(f"density {100 * d:.3g} %", fontsize="medium")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel(f"{res.metric.replace('_', ' ')} (%), one dot per seed")
    if axes[0].get_legend_handles_labels()[0]:   # no intervals (too few seeds): nothing to explain
        axes[0].legend(loc="lower left", fontsize="small")
    fig.suptitle("Seed variance per method and density")
    return [plots.save(fig, out / "seed_variance.png")]
