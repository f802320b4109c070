"""What Ray Tune costs per trial on this machine, through the project's real sweep path.

Two sweeps, each on a fresh local Ray (``ray.shutdown()`` in between), built with
``spec.validate`` and run with ``runner.run_sweep`` exactly as ``cts-ray sweep`` does: the
project's trainable, per-epoch checkpoints, Parquet tables, MLflow (sqlite) on the driver.

1. Overhead: 32 of the smallest real trials (digits, 64 train/test examples, 1 epoch, random
   ticket, no dense baseline), a grid over ``seed``, 1 CPU per trial, so 2 at a time here.
   overhead/trial = (wall × concurrency − Σ in-trial wall) / trials, where a trial's in-trial wall
   is ``ended_at − started_at`` from the trials table (everything the trainable does between
   parsing its config and writing its row). The rest is split into Ray startup (``ray.init``,
   the MLflow callback's setup, the first actor) up to the first trial's start, the gaps between
   one trial ending and the next one starting in the freed slot (median and spread over the
   trials: a new actor process and its imports, since Tune does not reuse actors by default,
   Tune's bookkeeping, the trial's last Parquet writes and report), and the tail after the last
   trial. A trial's own wall also holds its process's cold first calls (imports inside the
   pipeline), so the table adds "everything but compute": wall × concurrency less the
   pipeline's own pretrain + search + retrain seconds, per trial.
2. Parallel efficiency: 4 trials of about 20 s each (full digits, many epochs; the epoch count is
   calibrated by two trials, of n and 4n epochs, in the first sweep's Ray session), efficiency = Σ in-trial wall /
   (wall × concurrency), the wall including Ray startup as a user sees it; also without it.

Storage and MLflow live in a temporary folder that is removed afterwards.
"""
from __future__ import annotations

import contextlib
import heapq
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from .report import Row, summary

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "configs" / "digits.yaml"
TRIALS, CONCURRENCY = 32, 2          # 1 CPU per trial on a 2-core machine
LONG_TRIALS, LONG_SECONDS = 4, 20.0
OVERHEAD_TARGET, EFFICIENCY_TARGET = 0.5, 0.85
TINY = {"training.epochs": 1, "training.milestones": [], "training.dense_baseline": False,
        "search.method": "random", "data.subset": 64, "data.test_subset": 64, "resources.cpus": 1}
# full digits with small batches: ~180 steps per epoch, so an epoch's compute outweighs its checkpoint
LONG = {"training.milestones": [], "training.dense_baseline": False, "training.batch_size": 8,
        "search.method": "random", "resources.cpus": 1}
CALIBRATION_EPOCHS = 10


@contextlib.contextmanager
def timed(owner, attr: str, box: dict, key: str):
    """Record (start, end) of calls to ``owner.attr`` in ``box[key]`` while inside; the runner looks
    these up at call time (``ray.init``, the MLflow callback's ``setup``), so its code is unchanged."""
    real = getattr(owner, attr)

    def wrapper(*args, **kwargs):
        t0 = time.time()
        try:
            return real(*args, **kwargs)
        finally:
            box[key] = (t0, time.time())

    setattr(owner, attr, wrapper)
    try:
        yield
    finally:
        setattr(owner, attr, real)


def sweep(storage: Path, tag: str, set_: dict, seeds: list[int], *, shutdown: bool = True) -> dict:
    """Run one sweep through spec.validate + runner.run_sweep; return its timings and trial rows."""
    import ray

    from cts_ray.sweep import runner, tables
    from cts_ray.sweep.mlflow_log import MLflowLogger
    from cts_ray.sweep.spec import validate

    name = f"bench-{tag}-{uuid.uuid4().hex[:8]}"
    spec = validate({"name": name, "base": str(BASE), "set": set_, "grid": {"seed": seeds},
                     "searcher": "grid", "max_failures": 0, "storage": str(storage),
                     "mlflow": {"tracking_uri": f"sqlite:///{storage / 'mlflow.db'}", "experiment": "bench-sweep"}})
    box = {}
    with timed(ray, "init", box, "ray.init"), timed(MLflowLogger, "setup", box, "mlflow"):
        t0 = time.time()
        out = runner.run_sweep(spec, address=None, verbose=0)
        t1 = time.time()
    if shutdown:
        ray.shutdown()
    rows = tables.read(spec.root, "trials").to_pylist()
    if out["errors"] or len(rows) != len(seeds) or any(r["status"] != "finished" for r in rows):
        raise RuntimeError(f"sweep {name}: {out['errors']} errored trials, "
                           f"statuses {sorted(r['status'] for r in rows)}; see {spec.root}")
    if out["mlflow_error"]:
        print(f"    warning: MLflow logging stopped ({out['mlflow_error']}); the driver did less work", flush=True)
    init, ml = box.get("ray.init", (t0, t0)), box.get("mlflow", (t0, t0))
    return {"t0": t0, "t1": t1, "wall": t1 - t0, "rows": rows, "ray_init": init[1] - init[0], "init_end": init[1],
            "mlflow_setup": ml[1] - ml[0], "mlflow_error": out["mlflow_error"]}


def durations(rows: list[dict]) -> list[float]:
    return [r["ended_at"] - r["started_at"] for r in rows]


def slot_gaps(rows: list[dict], concurrency: int) -> list[float]:
    """For each trial that had to wait for a slot: its start minus the end of the trial that freed it."""
    ends, gaps = [], []
    for r in sorted(rows, key=lambda r: r["started_at"]):
        if len(ends) == concurrency:
            gaps.append(r["started_at"] - heapq.heappop(ends))
        heapq.heappush(ends, r["ended_at"])
    return gaps


def run(quick: bool = False, **_) -> list[Row]:
    """``quick``: 8 tiny trials and 2 trials of ~5 s (a smoke check of the benchmark itself)."""
    import ray

    trials, long_trials, long_seconds = (8, 2, 5.0) if quick else (TRIALS, LONG_TRIALS, LONG_SECONDS)

    storage = Path(tempfile.mkdtemp(prefix="cts-bench-sweep-"))
    try:
        if ray.is_initialized():
            ray.shutdown()
        # ---- 1. per-trial overhead: 32 smallest real trials
        print(f"  sweep 1: {trials} tiny trials, {CONCURRENCY} at a time", flush=True)
        a = sweep(storage, "tiny", TINY, list(range(trials)), shutdown=False)
        dur = durations(a["rows"])
        compute = [r["pretrain_seconds"] + r["search_seconds"] + r["retrain_seconds"] for r in a["rows"]]
        first_start = min(r["started_at"] for r in a["rows"])
        last_end = max(r["ended_at"] for r in a["rows"])
        gaps = slot_gaps(a["rows"], CONCURRENCY)
        overhead = (a["wall"] * CONCURRENCY - sum(dur)) / trials
        print(f"    wall {a['wall']:.1f} s, ray.init {a['ray_init']:.1f} s, Σ in-trial {sum(dur):.1f} s, "
              f"overhead {overhead:.2f} s/trial", flush=True)

        # ---- calibration: trials of n and 4n epochs in the still-running Ray; their difference is
        # the per-epoch cost, free of the fixed part (loading full digits, first calls)
        walls = {}
        for n in (CALIBRATION_EPOCHS, 4 * CALIBRATION_EPOCHS):
            cal = sweep(storage, f"calibrate{n}", {**LONG, "training.epochs": n}, [100])
            walls[n] = durations(cal["rows"])[0]
        per_epoch = max((walls[4 * CALIBRATION_EPOCHS] - walls[CALIBRATION_EPOCHS]) / (3 * CALIBRATION_EPOCHS), 1e-3)
        fixed = max(walls[CALIBRATION_EPOCHS] - CALIBRATION_EPOCHS * per_epoch, 0.0)
        epochs = max(2, round((long_seconds - fixed) / per_epoch))
        print(f"  calibration: {per_epoch * 1000:.0f} ms/epoch + {fixed:.1f} s fixed → "
              f"{epochs} epochs for ~{long_seconds:.0f} s", flush=True)

        # ---- 2. parallel efficiency: 4 trials of ~20 s on a fresh Ray
        print(f"  sweep 2: {long_trials} trials of {epochs} epochs, {CONCURRENCY} at a time", flush=True)
        b = sweep(storage, "long", {**LONG, "training.epochs": epochs}, list(range(long_trials)))
        bdur = durations(b["rows"])
        eff = sum(bdur) / (b["wall"] * CONCURRENCY)
        eff_warm = sum(bdur) / ((b["t1"] - b["init_end"]) * CONCURRENCY)
        print(f"    wall {b['wall']:.1f} s, Σ in-trial {sum(bdur):.1f} s, efficiency {100 * eff:.1f} %", flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(storage, ignore_errors=True)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    med_dur, spread_dur = summary(dur)
    med_cmp, spread_cmp = summary(compute)
    med_gap, spread_gap = summary(gaps)
    bmed, bspread = summary(bdur)
    ok = lambda c: "yes" if c else "no"
    return [
        Row(f"sweep 1: wall, {trials} tiny trials", a["wall"], "s", ratio=f"{60 * trials / a['wall']:.1f} trials/min"),
        Row("sweep 1: overhead per trial", overhead, "s",
            ratio=f"(wall×{CONCURRENCY} − Σ in-trial) / {trials}", target=f"≤ {OVERHEAD_TARGET} s",
            met=ok(overhead <= OVERHEAD_TARGET)),
        Row("sweep 1: Ray startup (sweep start → 1st trial)", first_start - a["t0"], "s",
            ratio=f"ray.init {a['ray_init']:.1f} + MLflow setup {a['mlflow_setup']:.1f} + rest"),
        Row("sweep 1: gap, trial end → next start in slot", med_gap, "s", spread_gap),
        Row("sweep 1: tail, last trial end → sweep returns", a["t1"] - last_end, "s"),
        Row("sweep 1: in-trial wall (ended_at − started_at)", med_dur, "s", spread_dur),
        Row("sweep 1: in-trial compute (pretrain+search+retrain)", med_cmp, "s", spread_cmp),
        Row("sweep 1: everything but compute, per trial", (a["wall"] * CONCURRENCY - sum(compute)) / trials, "s",
            ratio=f"(wall×{CONCURRENCY} − Σ compute) / {trials}"),
        Row(f"sweep 2: wall, {long_trials} trials × {epochs} epochs", b["wall"], "s",
            ratio=f"{60 * long_trials / b['wall']:.1f} trials/min"),
        Row("sweep 2: in-trial wall", bmed, "s", bspread),
        Row("sweep 2: parallel efficiency", 100 * eff, "%", ratio=f"Σ in-trial / (wall×{CONCURRENCY})",
            target=f"≥ {100 * EFFICIENCY_TARGET:.0f} %", met=ok(eff >= EFFICIENCY_TARGET)),
        Row("sweep 2: efficiency without ray.init", 100 * eff_warm, "%", ratio="wall from ray.init's return"),
        Row("load average at end (1 min)", load, "", ratio=f"{os.cpu_count()} cores"),
    ]
