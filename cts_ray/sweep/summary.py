"""The table a sweep ends with: one row per setting (never pooled across settings), with trial
counts per status, accuracy over finished trials, and the best trials of a random or Optuna sweep."""
from __future__ import annotations

import json
import statistics
from collections import defaultdict
from typing import Optional

from ..wording import count
from . import tables
from .spec import SweepSpec

STATUSES = ("finished", "stopped", "diverged", "error", "interrupted")
SHOWN = {"error": "failed"}   # the stored status `error` (kept for older tables) as users read it
LIST_AT_MOST = 8     # values (or runs of values) a summary cell lists before it gives a count
REASONS_AT_MOST = 12   # "not finished" lines before the rest are counted
LINE_AT_MOST = 160   # an error message longer than this is cut (the trials table has it whole)


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
    rows = [_row(method, density, g, spec) for (method, density, _), g in
            sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1], kv[0][2]))]
    best = None
    if spec.searcher != "grid":
        metric, mode = (spec.metric, spec.mode) if isinstance(spec.metric, str) else (spec.metric[0], spec.mode[0])
        done = [r for r in t if r["status"] == "finished" and r[metric] is not None]
        best = {"metric": metric, "mode": mode, "trials": sorted(done, key=lambda r: r[metric],
                                                                 reverse=mode == "max")[:5]}
    reasons = [f"{SHOWN.get(r['status'], r['status'])}: trial {r['trial_id']} (seed {r['seed']}): {r['error']}"
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
    lines = ["", f"not run ({count(sum(e['count'] for e in entries), 'trial')} with no row):"]
    for e in entries[:NOT_RUN_SHOWN]:
        what = "a sampled trial" if e["point"] is None else \
            ", ".join(f"{k.removeprefix('search.')}={_value(v)}" for k, v in e["point"].items()) or "the base config"
        times = f" (×{e['count']})" if e["count"] > 1 else ""
        lines.append(f"  {what}{times}: {e['reason']}")
    if len(entries) > NOT_RUN_SHOWN:
        lines.append(f"  … and {count(len(entries) - NOT_RUN_SHOWN, 'more point')}")
    return lines


def _row(method: str, density: float, g: list, spec: SweepSpec) -> dict:
    """One setting's summary row from its trials' rows ``g``."""
    # the same experiment twice (a knob that does not apply, swept) counts once
    done = {r["experiment"]: r for r in g if r["status"] == "finished" and r["test_accuracy"] is not None}
    accs = [r["test_accuracy"] for r in done.values()]
    dups = _duplicates(g, spec)
    extra = sum(max(0, sum(r["status"] == "finished" for r in g if r["config_hash"] == h) - spec.num_samples)
                for h in dups)
    eff = [r["effective_density"] for r in done.values() if r.get("effective_density") is not None]
    return {"method": method, "density": density, "values": g[0]["values"],
            "counts": {st: sum(r["status"] == st for r in g) for st in STATUSES},
            "seeds": sorted({r["seed"] for r in g if r["status"] == "finished"}), "n": len(accs),
            "repeats": sum(r["status"] == "finished" for r in g) - len(done) - extra,
            "duplicates": sorted(dups.values()),
            "mean": statistics.mean(accs) if accs else None,
            "std": statistics.stdev(accs) if len(accs) > 1 else None,
            "effective": statistics.mean(eff) if eff else None,
            "collapsed": sum(1 for r in done.values() if r.get("collapsed"))}


def _duplicates(g: list, spec: SweepSpec) -> dict:
    """{config hash: (seed, rows)} of a grid's points with more rows than ``num_samples`` asks:
    the same point run again (e.g. by two drivers), not a knob that does not apply."""
    if spec.searcher != "grid":
        return {}
    by_hash = defaultdict(list)
    for r in g:
        by_hash[r["config_hash"]].append(r)
    return {h: (rs[0]["seed"], len(rs)) for h, rs in by_hash.items() if len(rs) > spec.num_samples}


def value_runs(values: list, at_most: int = LIST_AT_MOST) -> str:
    """Sorted integers as runs (``0–4999 (5,000)``), at most ``at_most`` runs then a count; with
    the number of values whenever not every one is written out."""
    if not values:
        return "-"
    runs, start = [], values[0]
    for prev, v in zip(values, values[1:] + [None]):
        if v is None or not (isinstance(v, int) and isinstance(prev, int) and v == prev + 1):
            runs.append((start, prev))
            start = v
    parts = []
    for a, b in runs:   # a run of two reads better as two values
        parts += [str(a)] if a == b else [str(a), str(b)] if b == a + 1 else [f"{a}–{b}"]
    text = ",".join(parts[:at_most])
    if len(parts) > at_most:
        text += f",… (+{len(parts) - at_most} more)"
    return text if len(parts) == len(values) and len(parts) <= at_most else f"{text} ({len(values):,})"


def _cut(text: str, width: int = LINE_AT_MOST) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _value(v) -> str:
    return "–" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def format_summary(summary: dict) -> str:
    lines = _table(summary)
    rows = summary["rows"]
    collapsed = [r for r in rows if r["collapsed"]]
    if collapsed:
        lines += ["", "collapsed (a prunable layer with no weight on an input→output path): " + _joined(
            f"{r['method']} at density {_value(r['density'])}: {count(r['collapsed'], 'ticket')}" for r in collapsed)]
    dups = [(r, seed, n) for r in rows for seed, n in r.get("duplicates", [])]
    if dups:
        lines += ["", "ran more often than the sweep asks (a point run again, e.g. by a second driver): " + _joined(
            f"{r['method']} at density {_value(r['density'])} seed {seed}: ran {n} times" for r, seed, n in dups)]
    repeats = [r for r in rows if r["repeats"]]
    if repeats:
        lines += ["", "counted once: " + _joined(
            f"{r['method']} at density {_value(r['density'])}: {count(r['repeats'], 'trial')} {'repeats' if r['repeats'] == 1 else 'repeat'} an identical experiment "
            f"(a swept knob that does not apply to {r['method']})" for r in repeats)]
    if summary["best"]:
        lines += ["", *_best(summary["best"], summary["keys"])]
    reasons = summary["reasons"]
    if reasons:
        lines += ["", "not finished:"] + [f"  {_cut(why)}" for why in reasons[:REASONS_AT_MOST]]
        if len(reasons) > REASONS_AT_MOST:
            lines.append(f"  … and {len(reasons) - REASONS_AT_MOST:,} more (the trials table's status and error "
                         "columns have every one)")
    lines += format_not_run(summary.get("not_run", []))
    return "\n".join(lines)


def _table(summary: dict) -> list[str]:
    """The per-setting table; the interrupted column only when a trial was."""
    keys, rows = summary["keys"], summary["rows"]
    statuses = [st for st in STATUSES if st != "interrupted" or any(r["counts"].get(st) for r in rows)]
    head = ["method", "density", *(k.removeprefix("search.") for k in keys), *(SHOWN.get(st, st) for st in statuses),
            "seeds", "effective", "test accuracy % (mean ± std of finished trials)"]
    table = [head]
    for r in rows:
        acc = "-" if r["mean"] is None else f"{100 * r['mean']:.2f}" + \
            (f" ± {100 * r['std']:.2f} %" if r["std"] is not None else " %  (one trial: no std)")
        table.append([r["method"], _value(r["density"]), *(_value(r["values"][k]) for k in keys),
                      *(f"{r['counts'].get(st, 0):,}" for st in statuses), value_runs(r["seeds"]),
                      "-" if r["effective"] is None else f"{r['effective']:.4g}", acc])
    widths = [max(len(row[i]) for row in table) for i in range(len(head) - 1)]
    return ["  ".join(x.ljust(w) for x, w in zip(row[:-1], widths)) + "  " + row[-1] for row in table]


def _best(b: dict, keys: list) -> list[str]:
    lines = [f"best trials by {b['metric']} ({b['mode']}):"]
    for r in b["trials"]:
        values = ", ".join(f"{k.removeprefix('search.')}={_value(r['values'][k])}" for k in keys)
        value = f"{100 * r[b['metric']]:.4g} %" if "accuracy" in b["metric"] else f"{r[b['metric']]:.4g}"
        lines.append(f"  {r['trial_id']}  {value}"
                     f"  {r['method']} density {_value(r['target_density'])} seed {r['seed']}"
                     + (f"  {values}" if values else ""))
    return lines


def _joined(parts, at_most: int = LIST_AT_MOST) -> str:
    """``; ``-joined, at most ``at_most`` parts, then how many more."""
    parts = list(parts)
    more = f"; … and {len(parts) - at_most:,} more" if len(parts) > at_most else ""
    return "; ".join(parts[:at_most]) + more
