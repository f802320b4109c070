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

With ``trials=[N, ...]`` (``python -m bench sweep --trials 100 400 2000``) it instead runs the
tiny-trial sweep once per N, each on a fresh local Ray, and reports how the cost per trial grows
with N: the span from the first trial's start to the last one's end × concurrency / N (Ray's start
excluded: it is paid once), its in-trial/overhead split, the slot gaps early and late in the sweep,
the driver's peak memory (VmHWM, reset before each sweep), MLflow's queue (largest while running,
left at the end, the wait for it to drain, runs finished in the store) and how long
``cts-ray report`` and ``cts-ray analyze comparison`` take over the N-trial result (each a fresh
process, as a user runs them).

Storage and MLflow live in a temporary folder that is removed afterwards.
"""
from __future__ import annotations

import contextlib
import heapq
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
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


@contextlib.contextmanager
def watched(owner, box: dict):
    """Keep the instance whose ``start`` is called in ``box["logger"]`` (the runner's MLflowLogger),
    and time its ``flush`` calls (the longest in ``box["flush"]``: the wait for the queue to drain)."""
    start, flush = owner.start, owner.flush

    def start_(self, *args, **kwargs):
        box["logger"] = self
        return start(self, *args, **kwargs)

    def flush_(self, *args, **kwargs):
        t0 = time.time()
        try:
            return flush(self, *args, **kwargs)
        finally:
            box["flush"] = max(box.get("flush", 0.0), time.time() - t0)

    owner.start, owner.flush = start_, flush_
    try:
        yield
    finally:
        owner.start, owner.flush = start, flush


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
    box = {"queue_max": 0}
    done = threading.Event()

    def poll():   # MLflow's backlog while the sweep runs
        while not done.wait(0.2):
            q = getattr(box.get("logger"), "_queue", None)
            if q is not None:
                box["queue_max"] = max(box["queue_max"], q.qsize())

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    with timed(ray, "init", box, "ray.init"), timed(MLflowLogger, "setup", box, "mlflow"), \
            watched(MLflowLogger, box):
        t0 = time.time()
        try:
            out = runner.run_sweep(spec, address=None, verbose=0)
        finally:
            done.set()
        t1 = time.time()
    poller.join()
    q = getattr(box.get("logger"), "_queue", None)
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
            "mlflow_setup": ml[1] - ml[0], "mlflow_error": out["mlflow_error"], "root": spec.root,
            "queue_end": q.qsize() if q is not None else None, "queue_max": box["queue_max"],
            "flush": box.get("flush", 0.0), "mlflow_db": storage / "mlflow.db"}


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


def run(quick: bool = False, trials: list[int] | None = None, **_) -> list[Row]:
    """``quick``: 8 tiny trials and 2 trials of ~5 s (a smoke check of the benchmark itself).
    ``trials``: the N-trial cost curve instead (``curve``)."""
    import ray

    if trials:
        return curve(trials, quick)

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


# ---- the N-trial cost curve (``--trials``)
def _hwm_reset() -> bool:
    """Reset this process's peak RSS (Linux: clear_refs 5), so each sweep's peak is its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _hwm_mib() -> float:
    try:
        return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024
    except (OSError, AttributeError):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cli(*args) -> tuple[float, int]:
    """Seconds (and exit status) of one ``cts-ray`` command in a fresh process."""
    exe = Path(sys.executable).with_name("cts-ray")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "import sys; from cts_ray.cli import main; "
                                                                 "sys.exit(main())"]
    t0 = time.time()
    p = subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True)
    if p.returncode:
        print(f"    cts-ray {' '.join(map(str, args[:2]))}: exit {p.returncode}: {p.stderr.strip()[-300:]}", flush=True)
    return time.time() - t0, p.returncode


def _mlflow_runs(db: Path) -> tuple[int, int]:
    """(finished trial runs, all trial runs) in the sweep's sqlite store."""
    with contextlib.closing(sqlite3.connect(db)) as c:
        rows = c.execute("select r.status from runs r join tags t on t.run_uuid = r.run_uuid "
                         "where t.key = 'cts.role' and t.value = 'trial'").fetchall()
    return sum(1 for (st,) in rows if st == "FINISHED"), len(rows)


def curve(ns: list[int], quick: bool = False) -> list[Row]:
    import ray

    out, base = [], None
    for n in ns:
        storage = Path(tempfile.mkdtemp(prefix=f"cts-bench-sweep{n}-"))
        try:
            if ray.is_initialized():
                ray.shutdown()
            print(f"  {n} tiny trials, {CONCURRENCY} at a time", flush=True)
            reset = _hwm_reset()
            a = sweep(storage, f"n{n}", TINY, list(range(n)))
            peak = _hwm_mib()
            rows = a["rows"]
            dur = durations(rows)
            first_start = min(r["started_at"] for r in rows)
            last_end = max(r["ended_at"] for r in rows)
            span = last_end - first_start
            cost = span * CONCURRENCY / n
            overhead = (span * CONCURRENCY - sum(dur)) / n
            gaps = slot_gaps(rows, CONCURRENCY)
            tenth = max(1, len(gaps) // 10)
            # the same sweep's first and last tenth of trials: growth with N, free of load drift between sweeps
            by_start = sorted(rows, key=lambda r: r["started_at"])
            window = lambda rs: (max(r["ended_at"] for r in rs) - min(r["started_at"] for r in rs)) * CONCURRENCY / len(rs)
            k = max(CONCURRENCY, n // 10)
            first_k, last_k = window(by_start[:k]), window(by_start[-k:])
            early, late = summary(gaps[:tenth]), summary(gaps[-tenth:])
            finished, runs = _mlflow_runs(a["mlflow_db"])
            t_report, rc_report = _cli("report", a["root"], "--out", storage / "report")
            t_analyze, rc_analyze = _cli("analyze", "comparison", a["root"])
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            base = base or cost
            print(f"    wall {a['wall']:.1f} s, span {span:.1f} s, {cost:.4f} s/trial ({cost / base:.2f}× N={ns[0]}), "
                  f"peak RSS {peak:.0f} MiB, MLflow queue max {a['queue_max']} end {a['queue_end']} "
                  f"(flush {a['flush']:.1f} s, {finished}/{runs} runs finished), report {t_report:.1f} s, "
                  f"analyze {t_analyze:.1f} s, load {load:.2f}", flush=True)
        finally:
            if ray.is_initialized():
                ray.shutdown()
            shutil.rmtree(storage, ignore_errors=True)
        ok = lambda c: "yes" if c else "no"
        out += [
            Row(f"N={n}: cost per trial (first start → last end)×{CONCURRENCY}/N", cost, "s",
                ratio=f"{cost / base:.2f}× N={ns[0]}", target=f"≤ 1.2× N={ns[0]}", met=ok(cost <= 1.2 * base)),
            Row(f"N={n}: cost per trial, last tenth of this sweep's trials", last_k, "s",
                ratio=f"{last_k / first_k:.2f}× its first tenth ({first_k:.4g} s)", target="≤ 1.2× first tenth",
                met=ok(last_k <= 1.2 * first_k)),
            Row(f"N={n}: overhead per trial (span×{CONCURRENCY} − Σ in-trial)/N", overhead, "s",
                ratio=f"in-trial {sum(dur) / n:.4f} s/trial"),
            Row(f"N={n}: cost per trial to the sweep's return (first start → returned)×{CONCURRENCY}/N",
                (a["t1"] - first_start) * CONCURRENCY / n, "s",
                ratio=f"tail {a['t1'] - last_end:.1f} s (MLflow drain, compaction, summary)"),
            Row(f"N={n}: wall incl. Ray start", a["wall"], "s", ratio=f"{60 * n / a['wall']:.0f} trials/min"),
            Row(f"N={n}: gap, trial end → next start, first tenth", early[0], "s", early[1],
                ratio=f"last tenth {late[0]:.4g} s ({late[1]})"),
            Row(f"N={n}: driver peak RSS" + ("" if reset else " (process peak: no reset)"), peak, "MiB"),
            Row(f"N={n}: MLflow queue left at end", a["queue_end"] if a["queue_end"] is not None else float("nan"),
                "events", ratio=f"max {a['queue_max']} while running; drain wait {a['flush']:.2f} s; "
                                f"{finished}/{runs} trial runs FINISHED", target="0",
                met=ok(a["queue_end"] == 0 and finished == n)),
            Row(f"N={n}: cts-ray report", t_report, "s", ratio=f"exit {rc_report}", target="≤ 10 s",
                met=ok(t_report <= 10 and rc_report == 0)),
            Row(f"N={n}: cts-ray analyze comparison", t_analyze, "s", ratio=f"exit {rc_analyze}", target="≤ 10 s",
                met=ok(t_analyze <= 10 and rc_analyze == 0)),
            Row(f"N={n}: load average after (1 min)", load, "", ratio=f"{os.cpu_count()} cores"),
        ]
    return out
