"""Slot use of a real method comparison: useful compute / (wall × slots), with and without the
shared-work scheduler (cts_ray/sweep/schedule.py), side by side in one run.

Every method × 3 densities (LTR levels 0.8^2, 0.8^5, 0.8^8) × 2 seeds on an 8,000-image MNIST subset
(2,000 test images), LeNet-300-100, the mnist_lenet300 recipe, 1 CPU per trial, 2 slots, through
``runner.run_sweep`` exactly as ``cts-ray sweep`` runs it, each on a fresh local Ray.

Useful compute = the seconds trials spent training or searching, from the tables: every epoch
record's ``seconds`` that was computed rather than read from the sweep's cache (dense epochs, CTS and
strong-ticket search epochs, retraining epochs, LTR rounds), plus ``search_seconds`` of the methods
that search without epochs (snip, grasp, synflow, magnitude, random). Not useful: waiting on another
trial's dense run or LTR round, evaluation, setup, Tune. Wall = first trial start to last trial end
(Ray's startup is reported on its own).
"""
from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from pathlib import Path

from .report import Row

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "configs" / "mnist_lenet300.yaml"
METHODS = ["cts", "ltr", "snip", "grasp", "synflow", "magnitude", "random", "gates", "edge_popup"]
DENSITIES = [0.8 ** 2, 0.8 ** 5, 0.8 ** 8]
SLOTS, TARGET = 2, 0.90
SEARCHLESS = {"snip", "grasp", "synflow", "magnitude", "random"}   # no epoch records while searching


def useful_seconds(root: Path) -> float:
    from cts_ray.sweep import tables
    epochs = tables.read(root, "epochs").to_pylist()
    trials = tables.read(root, "trials").to_pylist()
    return (sum(r["seconds"] or 0.0 for r in epochs if not r["cached"])
            + sum(r["search_seconds"] or 0.0 for r in trials if r["method"] in SEARCHLESS))


def sweep(storage: Path, shared: bool, quick: bool) -> dict:
    import ray

    from cts_ray.sweep import runner, tables, work
    from cts_ray.sweep.spec import validate

    data_root = ROOT.parent / "shared" / "datasets"
    set_ = {"data.root": str(data_root), "data.subset": 2000 if quick else 8000,
            "data.test_subset": 500 if quick else 2000, "resources.cpus": 1,
            **({"training.epochs": 3} if quick else {})}
    name = f"bench-slots-{'shared' if shared else 'tune'}-{uuid.uuid4().hex[:6]}"
    spec = validate({"name": name, "base": str(BASE), "set": set_, "searcher": "grid", "max_failures": 0,
                     "grid": {"search.method": METHODS, "search.density": DENSITIES, "seed": [0, 1]},
                     "storage": str(storage),
                     "mlflow": {"tracking_uri": f"sqlite:///{storage / 'mlflow.db'}", "experiment": name}})
    work.SHARED_WORK = shared
    try:
        t0 = time.time()
        out = runner.run_sweep(spec, address=None, verbose=0)
        wall = time.time() - t0
    finally:
        work.SHARED_WORK = True
        ray.shutdown()
    rows = tables.read(spec.root, "trials").to_pylist()
    bad = [r["status"] for r in rows if r["status"] != "finished"]
    if out["errors"] or bad or len(rows) != len(METHODS) * len(DENSITIES) * 2:
        raise RuntimeError(f"{name}: {len(rows)} trials, not finished: {bad}; see {spec.root}")
    start, end = min(r["started_at"] for r in rows), max(r["ended_at"] for r in rows)
    useful = useful_seconds(spec.root)
    in_trial = sum(r["ended_at"] - r["started_at"] for r in rows)
    return {"wall": wall, "span": end - start, "in_trial": in_trial, "startup": start - t0, "useful": useful,
            "use": useful / ((end - start) * SLOTS), "use_all": useful / (wall * SLOTS), "trials": len(rows)}


def run(quick: bool = False, **_) -> list[Row]:
    storage = Path(tempfile.mkdtemp(prefix="cts-bench-slots-"))
    try:
        res = {}
        for shared in (False, True):   # Tune's grid order first, then the shared-work scheduler
            label = "shared-work scheduler" if shared else "Tune's grid order"
            print(f"  {label}: {len(METHODS)} methods x {len(DENSITIES)} densities x 2 seeds ...", flush=True)
            res[shared] = r = sweep(storage / ("shared" if shared else "tune"), shared, quick)
            print(f"    wall {r['wall']:.1f} s, trials span {r['span']:.1f} s, in trials {r['in_trial']:.1f} s, "
                  f"useful {r['useful']:.1f} s, "
                  f"slot use {100 * r['use']:.1f} %", flush=True)
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    rows = []
    for shared, label in ((False, "Tune's grid order"), (True, "shared-work scheduler")):
        r = res[shared]
        target, met = ("≥ 90 %", "yes" if r["use"] >= TARGET else "no") if shared else ("—", "—")
        rows += [Row(f"{label}: slot use", 100 * r["use"], "%", ratio="useful / (trial span × 2)",
                     target=target, met=met),
                 Row(f"{label}: slot use with Ray startup", 100 * r["use_all"], "%", ratio="useful / (wall × 2)"),
                 Row(f"{label}: useful compute", r["useful"], "s"),
                 Row(f"{label}: in-trial, not useful (setup, evaluation, waiting, writing)", r["in_trial"] - r["useful"],
                     "s"),
                 Row(f"{label}: between trials (Tune, idle slots)", r["span"] * SLOTS - r["in_trial"], "s"),
                 Row(f"{label}: trial span (first start → last end)", r["span"], "s"),
                 Row(f"{label}: wall", r["wall"], "s", ratio=f"{r['trials']} trials")]
    rows.append(Row("wall, Tune's order / shared-work", res[False]["wall"] / res[True]["wall"], "×"))
    return rows
