"""Method comparison: sparsity–accuracy curves, the paper-style table (methods × densities), the
compute table (time to a retrained ticket, CTS / LTR speed-up) and the sanity-check table."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from . import plots, stats
from .load import AnalysisError, Results, settings

ALPHA = 0.05
ZOOM = 6.0   # points below the best mean shown in the zoomed panel



def _ms(x) -> str:
    mean, std, _, _ = stats.mean_ci(x)
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def analyse(res: Results) -> dict:
    """Every setting present is a row (labelled by what differs from the defaults)."""
    main = res.trials[res.trials["sanity"] == "none"]
    if main.empty:
        raise AnalysisError("comparison: no trials without a sanity check here")
    labels = settings(main)
    densities = sorted(set(main["target_density"]), reverse=True)
    cells = {}
    for (lb, d), g in main.groupby(["label", "target_density"]):
        cells[lb, d] = {"acc": g["accuracy"].to_numpy(), "achieved": float(g["achieved_density"].mean()),
                        "ticket_s": float(g["ticket_seconds"].mean()), "search_s": float(g["search_seconds"].mean()),
                        "epochs": float(g["epochs_equivalent"].mean()), "n": len(g)}
    dense = main.drop_duplicates("seed")["dense_test_accuracy"].dropna().to_numpy() * 100
    method = dict(zip(main["label"], main["method"]))
    speedup = {(lt, ct): {d: cells[lt, d]["ticket_s"] / cells[ct, d]["ticket_s"]
                          for d in densities if (lt, d) in cells and (ct, d) in cells}
               for lt in labels if method[lt] == "ltr" for ct in labels if method[ct] == "cts"}
    return {"labels": labels, "densities": densities, "cells": cells, "dense": dense,
            "speedup": {k: v for k, v in speedup.items() if v}, "sanity": _sanity(res),
            "left_out": _left_out(res)}


def _left_out(res: Results) -> str:
    """What the tables do not show, and why (one line)."""
    parts = [f"{n} {why} trial(s)" for why, n in res.skipped.items() if n and not why.startswith("repeats")
             and not why.startswith("duplicate")]
    checks = int((res.trials["sanity"] != "none").sum())
    if checks:
        parts.append(f"{checks} sanity-check trial(s) (in Sanity checks)")
    repeats = sum(n for why, n in res.skipped.items() if why.startswith(("repeats", "duplicate")))
    if repeats:
        parts.append(f"{repeats} repeat(s) of a config or experiment already counted")
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
        row = [(_ms(result["cells"][m, d]["acc"]) + ("" if len(ns) == 1 else f" (n={result['cells'][m, d]['n']})"))
               if (m, d) in result["cells"] else "–" for d in ds]
        out.append(f"| {m} | " + " | ".join(row) + " |")
    n = next(iter(ns))
    foot = f"Test accuracy %, mean ± std over {n} seeds" if len(ns) == 1 else "Test accuracy %, mean ± std (n seeds)"
    if len(result["dense"]):
        foot += f"; dense network {_ms(result['dense'])} % ({len(result['dense'])} seeds)"
    return "\n".join(out + ["", foot + ". Columns: target density (% of weights kept). Rows: every setting "
                             "present, named by what differs from the defaults (the plain method name is the "
                             "setting at the defaults). " + result["left_out"] + " " + stats.RULE])


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
    parts = ["### Accuracy", "", accuracy_table(result), "", "### Compute", "", compute_table(result), "",
             "### Sanity checks", ""]
    try:
        parts.append(sanity_table(result))
    except AnalysisError as e:
        parts.append(f"_Not answerable: {e}_")
    return "\n".join(parts)


def plot(res: Results, result: dict, out: Path) -> list[str]:
    # left: the full range; right: zoomed to the top, where the methods worth comparing are
    fig, axes = plots.figure(ncols=2)
    top = max(a.mean() for a in (c["acc"] for c in result["cells"].values()))
    for ax, zoom in zip(axes, (False, True)):
        for i, m in enumerate(result["labels"]):
            ds = [d for d in result["densities"] if (m, d) in result["cells"]]
            x = [result["cells"][m, d]["achieved"] for d in ds]
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
        if zoom:
            ax.set_ylim(top - ZOOM, top + 0.1 * ZOOM)
            ax.set_title(f"top {ZOOM:g} points", fontsize="medium")
        else:
            ax.set_title("full range", fontsize="medium")
    axes[0].set_ylabel(f"{res.metric.replace('_', ' ')} (%), mean ± seed std")
    axes[0].legend(loc="lower left", fontsize="small")
    fig.suptitle("Sparsity–accuracy (x: achieved density; ticks at the target densities)")
    files = [plots.save(fig, out / "accuracy_vs_density.png")]

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
