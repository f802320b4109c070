"""Do two swept hyperparameters act independently? For every method, pair of swept axes and density
where the trials form a full grid of the two (every combination, everything else equal): a two-way
ANOVA of accuracy on both axes with their interaction (each axis's main effect and the interaction,
F tests against the seed variance), a plain verdict, and an interaction plot (mean accuracy against
one axis, a line per value of the other: parallel lines mean no interaction).
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path

from . import plots, stats
from ..errors import AnalysisError
from ..records import AXIS_KEYS
from .load import Results, check_axes, context, held_at, swept_axes, varying_keys


def analyse(res: Results, axes=None, method=None) -> list[dict]:
    df = res.trials[res.trials["sanity"] == "none"]
    if method is not None:
        df = df[df["method"] == method]
    check_axes(axes)
    rows = []
    for m, trials in df.groupby("method", sort=True):
        swept = varying_keys(trials["_flat"])
        names = [a for a in swept_axes(swept) if not axes or a in axes]
        for a, b in itertools.combinations(names, 2):
            rows += _pair(trials, m, a, b, swept)
    if not rows:
        raise AnalysisError("interaction: no two swept axes form a grid (every value of one at every value of the "
                            "other, everything else equal) in these trials; sweep two, e.g. grid: "
                            "{search.lr: [0.01, 0.1], search.objective: [ce, kl_reverse]}")
    return rows


def _pair(trials, method: str, a: str, b: str, swept: list) -> list[dict]:
    """One row per (context, density) where axes ``a`` and ``b`` form a full grid."""
    ctx = [context(f, drop=(AXIS_KEYS[a], AXIS_KEYS[b])) for f in trials["_flat"]]
    rows = []
    for (_, density), g in trials.assign(_ctx=ctx).groupby(["_ctx", "target_density"], sort=True):
        g = g.dropna(subset=[a, b])
        va, vb = _order(set(g[a])), _order(set(g[b]))
        cells = {(x, y): c["accuracy"].to_numpy() for (x, y), c in g.groupby([a, b])}
        if len(va) < 2 or len(vb) < 2 or len(cells) < len(va) * len(vb):
            continue   # not a grid of the two here
        p = stats.two_way_anova(cells)
        rows.append({"method": method, "a": a, "b": b, "density": density, "held": held_at(g, swept, drop=(a, b)),
                     "a_values": va, "b_values": vb, "means": {k: float(v.mean()) for k, v in cells.items()},
                     "stds": {k: float(v.std(ddof=1)) if len(v) > 1 else math.nan for k, v in cells.items()},
                     "n": min(len(v) for v in cells.values()), "p": p, "verdict": _verdict(a, b, p, cells)})
    return rows


def _verdict(a: str, b: str, p: dict, cells: dict) -> str:
    seeds = min(len(v) for v in cells.values())
    if math.isnan(p["ab"]):
        return f"indicative: no test (needs ≥ {stats.MIN_TEST} seeds per cell, has {seeds})"
    if p["ab"] < stats.ALPHA:
        return (f"{a} and {b} interact (p {stats.p_relation(p['ab'])}): the effect of {a} depends on {b}; read each "
                f"{a} row of the insensitivity table at its {b}, not as one effect")
    return (f"no interaction (p {stats.p_relation(p['ab'])}): the effects add; {a}: {_effect(p['a'])}, {b}: {_effect(p['b'])}")


def _effect(p: float) -> str:
    return f"an effect (p {stats.p_relation(p)})" if p < stats.ALPHA else f"no effect beyond seed noise (p {stats.p_relation(p)})"


def _order(values) -> list:
    """Numbers in numeric order, names in alphabetical order."""
    return sorted(values) if all(isinstance(v, (int, float)) for v in values) else sorted(values, key=str)


def markdown(rows: list[dict]) -> str:
    out = ["| method | axes A × B | held at | density % | seeds per cell | mean accuracy % per cell (A / B) "
           "| p: A | p: B | p: A × B | verdict |", "|---|---|---|---:|---:|---|---:|---:|---:|---|"]
    for r in rows:
        means = "; ".join(f"{stats.value_text(x)} / {stats.value_text(y)}: {stats.fmt(r['means'][x, y])}"
                          for x in r["a_values"] for y in r["b_values"])
        out.append(f"| {r['method']} | {r['a']} × {r['b']} | {r['held']} | {100 * r['density']:.3g} | {r['n']} "
                   f"| {means} | {stats.p_text(r['p']['a'])} | {stats.p_text(r['p']['b'])} "
                   f"| {stats.p_text(r['p']['ab'])} | {r['verdict']} |")
    return "\n".join(out + ["", COLUMNS, "", stats.RULE])


COLUMNS = ("Two-way ANOVA of accuracy on two swept axes and their interaction, everything else held as named. "
           "*p: A*, *p: B* each axis's main effect (Type II: adjusted for the other), *p: A × B* their interaction; "
           f"F tests against the seed variance within cells. The two interact when p: A × B < {stats.ALPHA}: then "
           "neither axis has one effect, and the interaction plot's lines are not parallel.")


def plot(res: Results, rows: list[dict], out: Path) -> list[str]:
    """One figure per (method, A, B): mean accuracy ± seed std against A, a line per value of B, a
    panel per density (and held-at setting)."""
    files = []
    for method, a, b in dict.fromkeys((r["method"], r["a"], r["b"]) for r in rows):
        sel = [r for r in rows if (r["method"], r["a"], r["b"]) == (method, a, b)]
        fig, panels = plots.figure(ncols=len(sel))
        for ax, r in zip(panels, sel):
            _panel(ax, r)
        panels[0].set_ylabel(f"{res.metric.replace('_', ' ')} (%), mean ± seed std")
        fig.suptitle(f"{method}: {a} × {b} (parallel lines: no interaction)")
        files.append(plots.save(fig, out / f"interaction_{method}_{a}_{b}.png"))
    return files


def _panel(ax, r: dict) -> None:
    x = range(len(r["a_values"]))
    for i, y in enumerate(r["b_values"]):
        means = [r["means"][v, y] for v in r["a_values"]]
        sd = [r["stds"][v, y] for v in r["a_values"]]
        ax.errorbar(x, means, yerr=stats.std_bars(means, sd), marker="o", capsize=3, color=f"C{i % 10}", label=f"{r['b']}={stats.value_text(y)}")
    ax.set_xticks(list(x), [stats.value_text(v) for v in r["a_values"]])
    ax.set_xlabel(r["a"].replace("_", " "))
    title = f"density {100 * r['density']:.3g} %" + ("" if r["held"] == "–" else f"\n{r['held']}")
    ax.set_title(title, fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
