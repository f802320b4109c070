"""The table a sweep ends with: one row per setting (never pooled across settings), with trial
counts per status, accuracy over finished trials, and the best trials of a random or Optuna sweep."""
from __future__ import annotations

import json
import statistics
from collections import defaultdict
from typing import Optional

from . import tables
from .spec import SweepSpec

STATUSES = ("finished", "stopped", "diverged", "error")


def summarise(spec: SweepSpec, why: Optional[dict] = None) -> dict:
    """One row per setting: the swept values other than the seed (a knob that does not apply to a
    method is '–' for it), with trial counts per status, the accuracy of its finished trials, their
    mean effective density (kept weights on an input→output path) and how many have a collapsed layer.
    Random and Optuna sweeps (every trial its own setting) also get their best trials; every sweep,
    the trials with no row (``not_run``; ``why``: {config hash: reason} for some of them)."""
    from ..config import flatten, stable_hash
    from ..methods import applies, effective
    try:
        t = tables.read(spec.root, "trials").to_pylist()
    except FileNotFoundError:
        return {"keys": [], "rows": [], "best": None, "reasons": [], "not_run": not_run(spec, [], why)}
    keys = [k for k in {**spec.grid, **spec.sample} if k not in ("seed", "search.method", "search.density")]
    groups = defaultdict(list)
    for r in t:
        flat = flatten(json.loads(r["config"]))
        r["values"] = {k: flat.get(k) if applies(r["method"], k) else None for k in keys}
        r["experiment"] = stable_hash(effective(flat))
        groups[(r["method"], r["target_density"], json.dumps([r["values"][k] for k in keys]))].append(r)
    rows = []
    for (method, density, _), g in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1], kv[0][2])):
        # the same experiment twice (a knob that does not apply, swept) counts once
        done = {r["experiment"]: r for r in g if r["status"] == "finished" and r["test_accuracy"] is not None}
        accs = [r["test_accuracy"] for r in done.values()]
        rows.append({"method": method, "density": density, "values": g[0]["values"],
                     "counts": {st: sum(r["status"] == st for r in g) for st in STATUSES},
                     "seeds": sorted({r["seed"] for r in g if r["status"] == "finished"}), "n": len(accs),
                     "repeats": sum(r["status"] == "finished" for r in g) - len(done),
                     "mean": statistics.mean(accs) if accs else None,
                     "std": statistics.stdev(accs) if len(accs) > 1 else None,
                     "effective": statistics.mean(eff) if (eff := [r["effective_density"] for r in done.values()
                                                                    if r.get("effective_density") is not None]) else None,
                     "collapsed": sum(1 for r in done.values() if r.get("collapsed"))})
    best = None
    if spec.searcher != "grid":
        metric, mode = (spec.metric, spec.mode) if isinstance(spec.metric, str) else (spec.metric[0], spec.mode[0])
        done = [r for r in t if r["status"] == "finished" and r[metric] is not None]
        best = {"metric": metric, "mode": mode, "trials": sorted(done, key=lambda r: r[metric],
                                                                 reverse=mode == "max")[:5]}
    reasons = [f"{r['status']}: trial {r['trial_id']} (seed {r['seed']}): {r['error']}"
               for r in sorted(t, key=lambda r: r["trial_id"]) if r["status"] != "finished"]
    return {"keys": keys, "rows": rows, "best": best, "reasons": reasons, "not_run": not_run(spec, t, why)}


NOT_RUN_SHOWN = 20   # points listed by name; the rest are counted


def not_run(spec: SweepSpec, trials: list, why: Optional[dict] = None) -> list[dict]:
    """The recorded sweep's trials that have no row (``resume.missing``): one entry per grid point
    (None: a random or Optuna sweep's sampled trial) with how many of its repeats, and why
    (``why``: by config hash; else it never started)."""
    from ..config import from_dict
    from .resume import missing
    out: dict = {}
    for p in missing(spec, trials):
        entry = out.setdefault(json.dumps(p, sort_keys=True), {"point": p, "count": 0})
        entry["count"] += 1
        reason = (why or {}).get(from_dict(spec.trial_raw(p)).hash) if p is not None and why else None
        entry["reason"] = f"{reason or 'not started'}; --resume runs it"
    return list(out.values())


def format_not_run(entries: list[dict]) -> list[str]:
    """The summary's "not run" section (empty when every trial has its row)."""
    if not entries:
        return []
    lines = ["", f"not run ({sum(e['count'] for e in entries)} trial(s) with no row):"]
    for e in entries[:NOT_RUN_SHOWN]:
        what = "a sampled trial" if e["point"] is None else \
            ", ".join(f"{k.removeprefix('search.')}={_value(v)}" for k, v in e["point"].items()) or "the base config"
        times = f" (×{e['count']})" if e["count"] > 1 else ""
        lines.append(f"  {what}{times}: {e['reason']}")
    if len(entries) > NOT_RUN_SHOWN:
        lines.append(f"  … and {len(entries) - NOT_RUN_SHOWN} more point(s)")
    return lines


def _value(v) -> str:
    return "–" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def format_summary(summary: dict) -> str:
    keys = summary["keys"]
    short = [k.removeprefix("search.") for k in keys]
    head = ["method", "density", *short, "finished", "stopped", "diverged", "failed", "seeds", "effective",
            "test accuracy % (mean ± std of finished trials)"]
    table = [head]
    for r in summary["rows"]:
        acc = "-" if r["mean"] is None else f"{100 * r['mean']:.2f}" + \
            (f" ± {100 * r['std']:.2f} %" if r["std"] is not None else " %  (one trial: no std)")
        c = r["counts"]
        table.append([r["method"], _value(r["density"]), *(_value(r["values"][k]) for k in keys),
                      str(c["finished"]), str(c["stopped"]), str(c["diverged"]), str(c["error"]),
                      ",".join(map(str, r["seeds"])) or "-",
                      "-" if r["effective"] is None else f"{r['effective']:.4g}", acc])
    widths = [max(len(row[i]) for row in table) for i in range(len(head) - 1)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(row[:-1], widths)) + "  " + row[-1] for row in table]
    collapsed = [r for r in summary["rows"] if r["collapsed"]]
    if collapsed:
        lines += ["", "collapsed (a prunable layer with no weight on an input→output path): " + "; ".join(
            f"{r['method']} at density {_value(r['density'])}: {r['collapsed']} ticket(s)" for r in collapsed)]
    repeats = [r for r in summary["rows"] if r["repeats"]]
    if repeats:
        lines += ["", "counted once: " + "; ".join(
            f"{r['method']} at density {_value(r['density'])}: {r['repeats']} trial(s) repeat an identical experiment "
            f"(a swept knob that does not apply to {r['method']})" for r in repeats)]
    if summary["best"]:
        b = summary["best"]
        lines += ["", f"best trials by {b['metric']} ({b['mode']}):"]
        for r in b["trials"]:
            values = ", ".join(f"{k.removeprefix('search.')}={_value(r['values'][k])}" for k in keys)
            value = f"{100 * r[b['metric']]:.4g} %" if "accuracy" in b["metric"] else f"{r[b['metric']]:.4g}"
            lines.append(f"  {r['trial_id']}  {value}"
                         f"  {r['method']} density {_value(r['target_density'])} seed {r['seed']}"
                         + (f"  {values}" if values else ""))
    if summary["reasons"]:
        lines += ["", "not finished:"] + [f"  {why}" for why in summary["reasons"]]
    lines += format_not_run(summary.get("not_run", []))
    return "\n".join(lines)
