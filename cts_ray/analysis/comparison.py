"""Method comparison: sparsity–accuracy curves, the paper-style table (methods × densities), the
compute table (time to a retrained ticket, CTS / LTR speed-up), the nominal vs effective density
table (ticket anatomy: kept weights on an input→output path) and the sanity-check table."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..sweep import tables
from . import plots, stats
from ..errors import AnalysisError
from ..wording import count
from .load import Results, settings

ALPHA = stats.ALPHA
ZOOM = 6.0   # points below the best mean shown in the zoomed panel
OFF_TARGET = 0.01   # achieved density further than this (relative) from its column's is noted



def mean_std(x) -> str:
    """``mean ± std`` of ``x`` to two decimals (the mean alone for one value)."""
    mean, std, _, _ = stats.mean_ci(x)
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def analyse(res: Results) -> dict:
    """Every setting present is a row (labelled by what differs from the sweep's base config)."""
    main = res.trials[res.trials["sanity"] == "none"]
    if main.empty:
        raise AnalysisError("comparison: no trials without a sanity check here")
    labels = settings(main)
    densities = sorted(set(main["target_density"]), reverse=True)
    cells = {}
    for (lb, d), g in main.groupby(["label", "target_density"]):
        cells[lb, d] = {"acc": g["accuracy"].to_numpy(), "achieved": float(g["achieved_density"].mean()),
                        "ticket_s": float(g["ticket_seconds"].mean()), "search_s": float(g["search_seconds"].mean()),
                        "epochs": float(g["epochs_equivalent"].mean()), "n": len(g),
                        # NaN / 0 for tables written before ticket anatomy existed
                        "effective": float(g["effective_density"].mean()), "collapsed": int((g["collapsed"] > 0).sum())}
    dense = main.drop_duplicates("seed")["dense_test_accuracy"].dropna().to_numpy() * 100
    method = dict(zip(main["label"], main["method"]))
    speedup = {(lt, ct): {d: cells[lt, d]["ticket_s"] / cells[ct, d]["ticket_s"]
                          for d in densities if (lt, d) in cells and (ct, d) in cells}
               for lt in labels if method[lt] == "ltr" for ct in labels if method[ct] == "cts"}
    return {"labels": labels, "densities": densities, "cells": cells, "dense": dense,
            "speedup": {k: v for k, v in speedup.items() if v}, "sanity": _sanity(res),
            "left_out": _left_out(res), "alive": _alive_units(res, main)}


def _alive_units(res: Results, main) -> dict:
    """Mean alive units per layer of each (setting, density) cell, from the sweeps' layers tables:
    {"layers": [(layer, units)], "cells": {(label, density): [mean alive units per layer]}}."""
    import pandas as pd
    frames = []
    for folder, _ in res.sweeps:
        try:
            frames.append(tables.read(folder, "layers", ["sweep", "trial_id", "layer", "units", "alive_units"]).to_pandas())
        except FileNotFoundError:
            continue
    if not frames:
        return {}
    rows = pd.concat(frames).dropna(subset=["alive_units"])
    rows = rows.merge(main[["sweep", "trial_id", "label", "target_density"]], on=["sweep", "trial_id"])
    if rows.empty:
        return {}
    order = list(dict.fromkeys(rows["layer"]))
    units = rows.groupby("layer")["units"].first()
    cells = {k: [float(g[g["layer"] == n]["alive_units"].mean()) for n in order]
             for k, g in rows.groupby(["label", "target_density"])}
    return {"layers": [(n, int(units[n])) for n in order], "cells": cells}


def _left_out(res: Results) -> str:
    """What the tables do not show, and why (one line)."""
    parts = [count(n, f"{why} trial") for why, n in res.skipped.items() if n and not why.startswith("repeats")
             and not why.startswith("duplicate")]
    checks = int((res.trials["sanity"] != "none").sum())
    if checks:
        parts.append(count(checks, "sanity-check trial") + " (in Sanity checks)")
    repeats = sum(n for why, n in res.skipped.items() if why.startswith(("repeats", "duplicate")))
    if repeats:
        parts.append(count(repeats, "repeat") + " of a config or experiment already counted")
    return ("Not in this table: " + "; ".join(parts) + ". Only finished trials count.") if parts else \
        "Every finished trial is in this table."


def _sanity(res: Results) -> list[dict]:
    df = res.trials
    rows = []
    for (variant, d, check), g in df[df["sanity"] != "none"].groupby(["variant", "target_density", "sanity"]):
        base = df[(df["variant"] == variant) & (df["target_density"] == d) & (df["sanity"] == "none")]
        if base.empty:
            continue
        a, b = dict(zip(base["seed"], base["accuracy"])), dict(zip(g["seed"], g["accuracy"]))
        drop, p, test, n = stats.compare(a, b)
        one_sided = p / 2 if drop > 0 else 1 - p / 2 if not math.isnan(p) else math.nan
        rows.append({"label": g["label"].iloc[0], "method": g["method"].iloc[0], "density": d, "check": check,
                     "unmodified": float(base["accuracy"].mean()), "checked": float(g["accuracy"].mean()),
                     "drop": drop, "p": one_sided, "test": test, "n": n,
                     "passes": drop > 0 and not math.isnan(one_sided) and one_sided < ALPHA})
    order = settings(df)
    return sorted(rows, key=lambda r: (order.index(r["label"]) if r["label"] in order else len(order), -r["density"],
                                       r["check"]))


def accuracy_table(result: dict) -> str:
    ds = result["densities"]
    out = ["| method | " + " | ".join(f"{100 * d:.3g} %" for d in ds) + " |", "|---|" + "---:|" * len(ds)]
    ns = {c["n"] for c in result["cells"].values()}
    for m in result["labels"]:
        row = [(mean_std(result["cells"][m, d]["acc"])
                + ("" if len(ns) == 1 else f" (n={result['cells'][m, d]['n']})"))
               if (m, d) in result["cells"] else "–" for d in ds]
        out.append(f"| {m} | " + " | ".join(row) + " |")
    n = next(iter(ns))
    foot = (f"Test accuracy %, mean ± std over {count(n, 'seed')}" if len(ns) == 1 else
            "Test accuracy %, mean ± std (n seeds)")
    if len(result["dense"]):
        foot += f"; dense network {mean_std(result['dense'])} % ({count(len(result['dense']), 'seed')})"
    return "\n".join(out + ["", foot + ". Columns: target density (% of weights kept). Rows: every setting "
                             "present, named by its values of the keys that differ between the settings, where they "
                             "differ from the sweep's base config (the plain method name is the setting at that "
                             "base). " + result["left_out"] + " " + stats.RULE])


def off_target_notes(result: dict) -> str:
    """Cells whose achieved density is more than 1 % (relative) off their column's density."""
    order = result["labels"]
    off = [f"{lb} at {100 * d:.3g} % keeps {100 * c['achieved']:.3g} % ({c['achieved'] / d - 1:+.1%})"
           for (lb, d), c in sorted(result["cells"].items(), key=lambda kv: (order.index(kv[0][0]), -kv[0][1]))
           if abs(c["achieved"] / d - 1) > OFF_TARGET]
    return ("Achieved density more than 1 % off the column's (not the same budget): " + "; ".join(off) + ".") \
        if off else ""


def anatomy_table(result: dict) -> str:
    """Nominal (achieved) vs effective density per setting and density, with tickets that have a
    collapsed layer."""
    ds = result["densities"]
    if all(math.isnan(c["effective"]) for c in result["cells"].values()):
        raise AnalysisError("anatomy: these trials predate effective density (no effective_density column)")
    out = ["| method | " + " | ".join(f"{100 * d:.3g} %" for d in ds) + " |", "|---|" + "---:|" * len(ds)]
    for lb in result["labels"]:
        row = []
        for d in ds:
            c = result["cells"].get((lb, d))
            if c is None or math.isnan(c["effective"]):
                row.append("–")
                continue
            row.append(f"{100 * c['achieved']:.3g} → {100 * c['effective']:.3g} ({c['effective'] / c['achieved']:.0%})"
                       + (f", {c['collapsed']} of {c['n']} with a collapsed layer" if c["collapsed"] else ""))
        out.append(f"| {lb} | " + " | ".join(row) + " |")
    return "\n".join(out + ["", "Nominal → effective density (% of prunable weights, mean over seeds) and the share of "
                                "kept weights that lie on a path from input to output. A collapsed layer has no such "
                                "weight (without a shortcut around it the ticket is disconnected: chance accuracy)."])


def alive_table(result: dict, most: int = 6) -> str:
    """Alive units (output units with an effective incoming weight) per layer, mean over seeds."""
    alive = result.get("alive")
    if not alive:
        raise AnalysisError("alive units: no layers table with alive_units for these trials")
    ds, layers = result["densities"], alive["layers"]
    out = ["| method | " + " | ".join(f"{100 * d:.3g} %" for d in ds) + " |", "|---|" + "---:|" * len(ds)]
    for lb in result["labels"]:
        row = []
        for d in ds:
            a = alive["cells"].get((lb, d))
            if a is None:
                row.append("–")
            elif len(layers) <= most:
                row.append(" / ".join(f"{x:.0f}" for x in a))
            else:   # deep nets: how many layers lost units, and the worst one
                frac = [x / u for x, (_, u) in zip(a, layers)]
                worst = min(range(len(a)), key=frac.__getitem__)
                row.append(f"{sum(f < 1 for f in frac)} layers lose units; fewest: {layers[worst][0]} "
                           f"{a[worst]:.0f}/{layers[worst][1]}")
        out.append(f"| {lb} | " + " | ".join(row) + " |")
    what = " / ".join(f"{n} ({u})" for n, u in layers) if len(layers) <= most else f"{len(layers)} prunable layers"
    return "\n".join(out + ["", f"Alive units per layer, mean over seeds; layers (units): {what}."])


def compute_table(result: dict) -> str:
    ds = result["densities"]
    out = ["| method | " + " | ".join(f"{100 * d:.3g} %: ticket s (epochs) | method s" for d in ds) + " |",
           "|---|" + "---:|---:|" * len(ds)]
    for m in result["labels"]:
        row = []
        for d in ds:
            c = result["cells"].get((m, d))
            row += [f"{c['ticket_s']:.1f} ({c['epochs']:.1f})", f"{c['search_s']:.2f}"] if c else ["–", "–"]
        out.append(f"| {m} | " + " | ".join(row) + " |")
    out += ["", "Mean seconds to a retrained ticket (SPEC §1: dense to the search point + method + retraining; "
                "LTR: every round up to that density), with epochs-equivalent; `method s` is the search alone."]
    if result["speedup"]:
        sd = sorted({d for v in result["speedup"].values() for d in v}, reverse=True)
        out += ["", "| density % | " + " | ".join(f"{100 * d:.3g}" for d in sd) + " |", "|---|" + "---:|" * len(sd)]
        for (lt, ct), v in result["speedup"].items():
            out.append(f"| {lt} / {ct} time | " + " | ".join(f"{v[d]:.1f}×" if d in v else "–" for d in sd) + " |")
    return "\n".join(out)


def sanity_table(result: dict) -> str:
    if not result["sanity"]:
        raise AnalysisError("sanity checks: no trials with search.sanity shuffle|invert|reinit next to their "
                            "unmodified ticket here (see tune_configs/sanity_checks.yaml)")
    out = ["| method | density % | check | unmodified % | checked % | drop, points | test (seeds) | p (one-sided) "
           "| passes |", "|---|---:|---|---:|---:|---:|---|---:|---|"]
    for r in result["sanity"]:
        out.append(f"| {r['label']} | {100 * r['density']:.3g} | {r['check']} | {stats.fmt(r['unmodified'])} | {stats.fmt(r['checked'])} "
                   f"| {stats.fmt(r['drop'])} | {r['test']} ({r['n']}) | {stats.p_text(r['p'])} | {'yes' if r['passes'] else 'no'} |")
    return "\n".join(out + ["", "A method passes a check when its ticket loses accuracy under it "
                                f"(drop > 0, one-sided p < {ALPHA}): its mask carries information beyond per-layer density."])


def markdown(result: dict) -> str:
    parts = ["### Accuracy", "", accuracy_table(result), "", off_target_notes(result), "",
             "### Nominal vs effective density", ""]
    try:
        parts.append(anatomy_table(result))
        parts += ["", alive_table(result)]
    except AnalysisError as e:
        parts.append(f"_Not answerable: {e}_")
    parts += ["", "### Compute", "", compute_table(result), "", "### Sanity checks", ""]
    try:
        parts.append(sanity_table(result))
    except AnalysisError as e:
        parts.append(f"_Not answerable: {e}_")
    return "\n".join(parts)


def _accuracy_curves(ax, result: dict, x_key: str) -> None:
    """Mean ± seed std accuracy per setting against the cells' ``x_key`` density, on a log density axis."""
    for i, m in enumerate(result["labels"]):
        ds = [d for d in result["densities"] if (m, d) in result["cells"] and result["cells"][m, d][x_key] > 0]
        x = [result["cells"][m, d][x_key] for d in ds]
        acc = [result["cells"][m, d]["acc"] for d in ds]
        mean = np.array([a.mean() for a in acc])
        sd = np.array([a.std(ddof=1) if len(a) > 1 else np.nan for a in acc])   # no band from one seed
        ax.plot(x, mean, marker="o", color=f"C{i % 10}", label=m)
        lo, hi = np.clip(mean - sd, *stats.BOUNDS), np.clip(mean + sd, *stats.BOUNDS)
        ax.fill_between(x, lo, hi, color=f"C{i % 10}", alpha=0.15, linewidth=0)
    if len(result["dense"]):
        ax.axhline(result["dense"].mean(), color="k", linestyle="--", linewidth=1, label="dense")
    plots.density_axis(ax, result["densities"])
    ax.grid(alpha=0.3)


def _effective_plot(res: Results, result: dict, out: Path) -> str:
    """Accuracy against nominal (left) and effective (right) density: what each method really kept."""
    fig, axes = plots.figure(ncols=2)
    for ax, key, title in zip(axes, ("achieved", "effective"), ("nominal (achieved) density",
                                                                 "effective density (weights on a path)")):
        _accuracy_curves(ax, result, key)
        ax.set_title(title, fontsize="medium")
    axes[1].sharey(axes[0])
    xs = [x for ax in axes for x in ax.get_xlim()]
    for ax in axes:   # one density range for both, so the shift from nominal to effective shows
        ax.set_xlim(max(xs), min(xs))
    axes[0].set_ylabel(f"{res.metric.replace('_', ' ')} (%), mean ± seed std")
    axes[0].legend(loc="best", fontsize="small")
    fig.suptitle("Accuracy vs nominal and effective density (ticks at the target densities)")
    return plots.save(fig, out / "accuracy_vs_effective_density.png")


def plot(res: Results, result: dict, out: Path) -> list[str]:
    # left: the full range; right: zoomed to the top, where the methods worth comparing are
    fig, axes = plots.figure(ncols=2)
    top = max(a.mean() for a in (c["acc"] for c in result["cells"].values()))
    for ax, zoom in zip(axes, (False, True)):
        _accuracy_curves(ax, result, "achieved")
        if zoom:
            ax.set_ylim(top - ZOOM, top + 0.1 * ZOOM)
            ax.set_title(f"top {ZOOM:g} points", fontsize="medium")
        else:
            ax.set_title("full range", fontsize="medium")
    axes[0].set_ylabel(f"{res.metric.replace('_', ' ')} (%), mean ± seed std")
    axes[0].legend(loc="lower left", fontsize="small")
    fig.suptitle("Sparsity–accuracy (x: achieved density; ticks at the target densities)")
    files = [plots.save(fig, out / "accuracy_vs_density.png")]
    if not all(math.isnan(c["effective"]) for c in result["cells"].values()):
        files.append(_effective_plot(res, result, out))

    fig, (ax,) = plots.figure()
    for i, m in enumerate(result["labels"]):
        ds = [d for d in result["densities"] if (m, d) in result["cells"]]
        ax.plot([result["cells"][m, d]["achieved"] for d in ds], [result["cells"][m, d]["ticket_s"] for d in ds],
                marker="o", color=f"C{i % 10}", label=m)
    plots.density_axis(ax, result["densities"])
    ax.set_yscale("log")
    secs = [c["ticket_s"] for c in result["cells"].values()]
    ticks = [t * 10 ** e for e in range(-1, 6) for t in (1, 2, 5) if min(secs) / 1.5 <= t * 10 ** e <= max(secs) * 1.5]
    ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_ylabel("seconds to a retrained ticket (log scale)")
    ax.set_title("Time to ticket")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")   # outside: lines span the plot
    files.append(plots.save(fig, out / "time_to_ticket.png"))
    return files
