"""How much does each swept hyperparameter move accuracy, compared with seeds alone?

For every method, axis (temperature, mask learning rate, search length, objective, controller,
search point) and density where the trials hold ≥ 2 values of that axis with everything else
equal: the range and standard deviation of the per-value mean accuracy (with percentile-bootstrap
95 % CIs, resampling seeds within each value), the pooled seed standard deviation, a one-way
ANOVA p-value, and a plain verdict.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from . import plots, stats
from ..records import AXIS_KEYS
from ..errors import AnalysisError
from .load import AXES, Results, check_axes, context, held_at, varying_keys

ALPHA = stats.ALPHA


def _span(values) -> str:
    if all(isinstance(v, (int, float)) for v in values):
        return f"{min(values):.4g}–{max(values):.4g}"
    return ", ".join(map(str, values))


def analyse(res: Results, axes=None, method=None) -> list[dict]:
    df = res.trials[res.trials["sanity"] == "none"]
    if method is not None:
        if method not in set(df["method"]):
            raise AnalysisError(f"method: {method!r} has no finished trials here; "
                                f"allowed: {', '.join(sorted(set(df['method'])))}")
        df = df[df["method"] == method]
    check_axes(axes)
    rows, seen = [], {}
    swept = {m: varying_keys(g["_flat"]) for m, g in df.groupby("method")}
    for axis in axes or AXES:
        ctx = [context(f, drop=(AXIS_KEYS[axis],)) for f in df["_flat"]]
        for (m, _, density), g in df.assign(_ctx=ctx).groupby(["method", "_ctx", "target_density"], sort=True):
            values = sorted(g[axis].dropna().unique().tolist())
            seen.setdefault(axis, set()).update(values)
            if len(values) < 2:
                continue
            groups = [g[g[axis] == v]["accuracy"].to_numpy() for v in values]
            means = [float(x.mean()) for x in groups]
            rng, std = stats.spread(groups)
            (rlo, rhi), (slo, shi) = stats.bootstrap_spread(groups)
            seed_std = stats.pooled_std(groups)
            p = stats.anova_p(groups)
            best = values[int(np.argmax(means))]
            rows.append({"method": m, "axis": axis, "density": density, "values": values,
                         "held": held_at(g, swept[m], drop=(axis,)),
                         "n": [len(x) for x in groups], "means": means,
                         "stds": [float(x.std(ddof=1)) if len(x) > 1 else math.nan for x in groups],
                         "range": rng, "range_ci": (rlo, rhi),
                         "std": std, "std_ci": (slo, shi), "seed_std": seed_std,
                         "ratio": std / seed_std if seed_std and not math.isnan(seed_std) else math.nan,
                         "p": p, "best": best,
                         "verdict": _verdict(rng, seed_std, p, values, best, std, min(len(x) for x in groups))})
    if not rows:
        held = "; ".join(f"{a}: {', '.join(map(stats.value_text, sorted(vs)))}"
                         for a, vs in seen.items() if vs)
        asked = ", ".join(axes) if axes else "every axis"
        raise AnalysisError(f"insensitivity: {asked} has a single value at each setting in these trials ({held}); "
                            f"sweep one, e.g. grid: {{search.temperature: [0.25, 0.5, 1.0]}}")
    return sorted(rows, key=lambda r: (r["method"], AXES.index(r["axis"]), -r["density"]))


def _verdict(rng, seed_std, p, values, best, std, seeds) -> str:
    span = _span(values)
    if seeds < stats.MIN_TEST:
        return (f"indicative: {rng:.2f} points across {span}; no test (needs ≥ {stats.MIN_TEST} seeds per value, "
                f"has {seeds})")
    if p >= ALPHA:
        return (f"insensitive: within {rng:.2f} points across {span}, no effect beyond seed noise "
                f"(seed std {seed_std:.2f}, p = {stats.p_text(p)})")
    where = f"best at {best:.4g}" if isinstance(best, float) else f"best: {best}"
    return f"sensitive: {rng:.2f} points across {span}, {std / seed_std:.1f}× the seed std; {where} (p {stats.p_relation(p)})"



def markdown(rows: list[dict]) -> str:
    out = ["| method | axis | held at | density % | values (seeds each) | mean accuracy % per value | range, points [95 % CI] "
           "| std across values [95 % CI] | seed std | std across values / seed std | ANOVA p | verdict |",
           "|---|---|---|---:|---|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        vals = ", ".join(map(stats.value_text, r["values"]))
        ns = sorted(set(r["n"]))
        out.append(f"| {r['method']} | {r['axis']} | {r['held']} | {100 * r['density']:.3g} | {vals} ({'/'.join(map(str, ns))}) "
                   f"| {', '.join(stats.fmt(m) for m in r['means'])} "
                   f"| {stats.fmt(r['range'])} [{stats.fmt(r['range_ci'][0])}, {stats.fmt(r['range_ci'][1])}] "
                   f"| {stats.fmt(r['std'])} [{stats.fmt(r['std_ci'][0])}, {stats.fmt(r['std_ci'][1])}] | {stats.fmt(r['seed_std'])} "
                   f"| {stats.fmt(r['ratio'], 1)} | {stats.p_text(r['p'])} | {r['verdict']} |")
    return "\n".join(out + ["", COLUMNS, "", stats.RULE])


COLUMNS = ("Columns: *held at* the values of the other swept settings at which the axis was varied; "
           "*values (seeds each)* the axis values compared, everything else equal, and the seeds per "
           "value; *mean accuracy* per value, over its seeds; *range* max − min of those means; *std across values* "
           "the std of those means; [95 % CI] percentile bootstrap over seeds resampled within each value; *seed std* "
           "the within-value std pooled over values; *std across values / seed std* how many seed-noise units the "
           "axis moves accuracy; *ANOVA p* one-way ANOVA of accuracy on the value; *verdict* insensitive when "
           f"p ≥ {ALPHA}, sensitive below.")


def plot(res: Results, rows: list[dict], out: Path) -> list[str]:
    """One figure per (method, axis): mean accuracy ± seed std against the axis, a line per density."""
    files = []
    for (method, axis) in dict.fromkeys((r["method"], r["axis"]) for r in rows):
        fig, (ax,) = plots.figure()
        sel = [r for r in rows if r["method"] == method and r["axis"] == axis]
        numeric = all(isinstance(v, (int, float)) for r in sel for v in r["values"])
        cats = sorted({v for r in sel for v in r["values"]}, key=str)
        for r in sel:
            x = r["values"] if numeric else [cats.index(v) for v in r["values"]]
            ax.errorbar(x, r["means"], yerr=stats.std_bars(r["means"], r["stds"]), marker="o", capsize=3, label=f"density {100 * r['density']:.3g} %"
                        + ("" if r["held"] == "–" else f", {r['held']}"))
        if numeric:
            vals = [v for r in sel for v in r["values"]]
            if min(vals) > 0 and max(vals) / min(vals) >= 4:
                ax.set_xscale("log")
            ax.set_xticks(sorted(set(vals)), [f"{v:.3g}" for v in sorted(set(vals))])
            ax.minorticks_off()
        else:
            ax.set_xticks(range(len(cats)), cats)
        ax.set_xlabel(axis.replace("_", " ") + (" (log scale)" if ax.get_xscale() == "log" else ""))
        ax.set_ylabel(f"{res.metric.replace('_', ' ')} (%), mean ± seed std")
        ax.set_title(f"{method}: accuracy against {axis.replace('_', ' ')}")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
        files.append(plots.save(fig, out / f"insensitivity_{method}_{axis}.png"))
    return files
