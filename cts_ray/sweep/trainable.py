"""The Ray Tune trainable: one trial = one pipeline run (dense → search → retrain → evaluate).

Every metrics record is reported to Tune; search and retraining epochs first save the trial's
progress (``progress_path``), so a retried or resumed trial continues after its last finished
epoch. Schedulers see
only the ticket: ``ticket_iteration`` (the time axis they use) counts the method's own epochs
(search, LTR rounds) and the ticket's retraining, and is reported only with records whose metrics
are this trial's final ticket (its retraining epochs, its evaluation) — never with the dense phase
that trials share, so an early stop compares tickets. A trial a scheduler stops gets its row from
the driver (``write_stopped``), from what it reported. The dense run
comes from the sweep's shared cache. At the end the trial writes its rows of the three Parquet
tables; MLflow is logged from the driver (see mlflow_log.py), so a tracking-server failure cannot
lose these rows.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from ray import tune

from .. import pipeline, runtime
from ..cache import DenseCache
from ..config import ConfigError, from_dict
from ..train import DivergedError
from . import tables


def trial(params: dict, spec_state: dict) -> None:
    """``params``: this trial's sampled values (dotted keys); ``spec_state``: base config and folders."""
    raw = spec_state["base"]
    from .spec import SweepSpec
    spec = SweepSpec(name=spec_state["name"], base=raw, set=spec_state["set"], storage=spec_state["storage"],
                     cwd=spec_state["cwd"])
    cfg = from_dict(spec.trial_raw(params))
    if cfg.resources.threads is None:   # one torch thread per CPU the trial holds, never more
        torch.set_num_threads(max(1, int(cfg.resources.cpus)))
    root = Path(spec_state["root"])
    # the id this trial's rows, run folder, progress and MLflow run go under: its own, or that of a
    # trial the resumed Tune state forgot and this one goes on as (runner.orphans)
    trial_id, orphan = adopt(root, cfg.hash, tune.get_context().get_trial_id(), spec_state.get("orphans", {}))
    adopted = {"adopted_from": trial_id} if orphan is not None else {}
    run_dir = root / "trials" / trial_id
    node_id = _node_id()
    started = time.time()
    # every report carries these (the ticket's, as known so far), so Tune finds the metric in each
    running = {"test_accuracy": 0.0, "peak_test_accuracy": 0.0, "ticket_seconds": 0.0,
               "achieved_density": cfg.search.density}
    step, ticket_iteration = [0], [0]
    final_round = None
    if cfg.search.method == "ltr":   # LTR's last round retrains the ticket itself
        from ..methods.ltr import rounds_for
        final_round = rounds_for(cfg.search.density, cfg.search.ltr_fraction)
    system = None
    if spec_state.get("system_metrics"):
        from .mlflow_log import SystemMetrics
        system = SystemMetrics()

    done = _finished_row(root, cfg.search.method, trial_id)
    if done is None and orphan is not None and orphan["status"] in FINAL:
        done = orphan
    if done is not None:   # finished before the driver died, after Tune's last state snapshot
        tune.report({"phase": "final", "step": done["steps"] + 1, "already_finished": 1, **adopted,
                     **{k: done[k] for k in REPORTED if done[k] is not None}})
        return
    ident = progress_path(root, trial_id).with_suffix(".json")   # what runner.orphans matches it by
    ident.parent.mkdir(exist_ok=True)
    ident.write_text(json.dumps({"config_hash": cfg.hash}))

    # The trial's own checkpoint, not Tune's: Tune deletes an old checkpoint before its state
    # snapshot names the new one, so a driver killed in between would resume from a deleted one.
    saved = progress_path(root, trial_id)
    resume = None
    if saved.exists():
        resume = pipeline.Progress.from_state(torch.load(saved, weights_only=True))
        step[0] = len(resume.records)
        ticket_iteration[0] = sum(1 for r in resume.records if r["phase"] != "dense")
        started = resume.records[0].get("started_at", started) if resume.records else started

    records = list(resume.records) if resume is not None else []

    def on_record(record: dict, progress) -> None:
        records.append(record)
        step[0] += 1
        ticket = record["phase"] in ("retrain", "evaluate") and record.get("round", final_round) == final_round
        if ticket and record.get("test_accuracy") is not None:
            running["test_accuracy"] = record["test_accuracy"]
            running["peak_test_accuracy"] = max(running["peak_test_accuracy"], record["test_accuracy"])
        running["ticket_seconds"] += record.get("seconds", 0.0) if not record.get("cached") else 0.0
        if step[0] == 1:
            record["started_at"] = started
        metrics = {**running, **_numeric(record), "phase": record["phase"], "step": step[0], "node_id": node_id,
                   **adopted,
                   "row": json.dumps(tables.epoch_row(record)),   # what the driver keeps of a stopped trial
                   **(system.sample() if system else {})}
        if record["phase"] != "dense":
            ticket_iteration[0] += 1
        if ticket:   # the scheduler's time axis: only beside this trial's own ticket metrics
            metrics["ticket_iteration"] = ticket_iteration[0]
        if progress is not None:   # written before the report: what Tune saw is never ahead of it
            saved.parent.mkdir(exist_ok=True)
            tmp = saved.with_suffix(f".{os.getpid()}.tmp")
            torch.save(progress.to_state(), tmp)
            os.replace(tmp, saved)
        tune.report(metrics)

    common = {"sweep": spec.name, "trial_id": trial_id, "config_hash": cfg.hash, **tables.axes(cfg)}
    if records:   # the last saved epoch may not have reached Tune (killed between saving and reporting):
        last = records.pop()   # report it again; MLflow skips a step it already has
        step[0] -= 1
        ticket_iteration[0] -= last["phase"] != "dense"
        on_record(last, None)
    cache = DenseCache(Path(spec_state["storage_root"]) / "_cache" / "dense")
    status, error, summary = "finished", None, None
    try:
        summary = pipeline.run(cfg, run_dir, overwrite=True, progress=False, on_record=on_record,
                               cache=cache, resume=resume)
    except DivergedError as e:   # deterministic: retrying would diverge again
        status, error = "diverged", str(e)
    except ConfigError as e:     # deterministic too (e.g. data missing on this node): no retries
        status, error = "error", f"ConfigError: {e}"
    except Exception as e:
        _write_trial_row(root, cfg, common, "error", f"{type(e).__name__}: {e}", None, run_dir, node_id,
                         started)
        raise
    if status == "error":   # a diverged trial keeps the epochs that show how it diverged
        records = []
    hit = any(r.get("cached") for r in records if r["phase"] == "dense")
    _write_trial_row(root, cfg, common, status, error, summary, run_dir, node_id, started, hit,
                     last={k: records[-1].get(k) for k in ("phase", "epoch")} if records else None)
    method = cfg.search.method
    tables.write(root, "epochs", method, trial_id, [tables.epoch_row(r) for r in records],
                 {**common, "node_id": node_id})
    if summary is not None:
        layers = json.loads((run_dir / "layers.json").read_text())[:-1]
        tables.write(root, "layers", method, trial_id,
                     [{k: r[k] for k in ("layer", "numel", "kept", "density", "units", "effective_kept",
                                         "alive_units")} for r in layers], common)
    final = {"phase": "final", "status": status, "step": step[0] + 1, "node_id": node_id, **adopted,
             "run_dir": str(run_dir), "ticket_iteration": ticket_iteration[0] + 1, **running}
    if summary is not None:
        final.update({k: summary[k] for k in ("test_accuracy", "peak_test_accuracy", "achieved_density",
                                              "ticket_seconds", "dense_test_accuracy") if summary[k] is not None})
        final.update(effective_density=summary["effective_density"], effective_kept=summary["effective_kept"],
                     collapsed=len(summary["collapsed_layers"]))
    _forget_progress(root, trial_id)   # done: nothing to continue
    tune.report(final)


def progress_path(root: Path, trial_id: str) -> Path:
    """The last finished epoch of an unfinished trial (records, search and retraining state),
    which a retried or resumed trial continues from."""
    return root / "progress" / f"{trial_id}.pt"


def _forget_progress(root: Path, trial_id: str) -> None:
    path = progress_path(root, trial_id)
    path.unlink(missing_ok=True)
    path.with_suffix(".json").unlink(missing_ok=True)


def adopt(root: Path, config_hash: str, tune_id: str, orphans: dict) -> tuple:
    """(trial id to go on as, the orphan adopted or None). ``orphans``: runner.orphans, by config
    hash. Each orphan is claimed once (``<sweep>/adopted/<its id>`` holds the claimer's Tune id,
    created exclusively, on the shared storage), so two trials of one point never adopt the same
    one; a retried trial finds its own claim again."""
    candidates = orphans.get(config_hash, [])
    if not candidates:
        return tune_id, None
    claims = root / "adopted"
    for o in candidates:
        claim = claims / o["trial_id"]
        if claim.exists() and claim.read_text() == tune_id:
            return o["trial_id"], o
    claims.mkdir(exist_ok=True)
    for o in candidates:
        try:
            fd = os.open(claims / o["trial_id"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as f:
            f.write(tune_id)
        return o["trial_id"], o
    return tune_id, None


FINAL = ("finished", "diverged")   # statuses a rerun would only repeat
# what a trial reports of a row that already ended (its own, or an adopted one's: runner.orphans)
REPORTED = ("status", "node_id", "run_dir", "test_accuracy", "peak_test_accuracy", "achieved_density",
            "ticket_seconds")


def _finished_row(root: Path, method: str, trial_id: str):
    path = root / "tables" / "trials" / f"method={method}" / f"{trial_id}.parquet"
    if not path.exists():
        return None
    row = pq.read_table(path).to_pylist()[0]
    if row["status"] not in FINAL:
        return None
    epochs = root / "tables" / "epochs" / f"method={method}" / f"{trial_id}.parquet"
    row["steps"] = pq.read_metadata(epochs).num_rows if epochs.exists() else 0   # its records: the final's step
    return row


def write_stopped(root: Path, spec, result, scheduler: str) -> None:
    """The row of a trial a scheduler stopped (its thread never returns): from its Tune results.
    ``result``: the trial's ``ray.tune.Result``."""
    history = [json.loads(line) for line in (Path(result.path) / "result.json").read_text().splitlines() if line]
    last = history[-1]
    tid = last.get("adopted_from") or last["trial_id"]
    cfg = from_dict(spec.trial_raw(result.config))
    common = {"sweep": spec.name, "trial_id": tid, "config_hash": cfg.hash, **tables.axes(cfg)}
    rows = {}
    for r in history:   # a retried trial reports some epochs twice: keep the last
        if r.get("row"):
            row = json.loads(r["row"])
            rows[(row["phase"], row["round"], row["epoch"])] = row
    where = f"{last['phase']} epoch {last.get('epoch')}, ticket iteration {last.get('ticket_iteration')}"
    summary = {"test_accuracy": last["test_accuracy"] if last.get("ticket_iteration") else None,
               "peak_test_accuracy": last.get("peak_test_accuracy") or None, "ticket_seconds": last["ticket_seconds"]}
    started = history[0].get("started_at") or last.get("timestamp", 0) - last.get("time_total_s", 0)
    _write_trial_row(root, cfg, common, "stopped", f"stopped by {scheduler} at {where}", summary, None,
                     last.get("node_id"), started, last=last)
    tables.write(root, "epochs", cfg.search.method, tid, list(rows.values()), {**common, "node_id": last.get("node_id")})
    for staging in (root / "trials").glob(f".{tid}.partial-*"):   # the stopped run's unfinished folder
        shutil.rmtree(staging, ignore_errors=True)
    _forget_progress(root, tid)


def _write_trial_row(root, cfg, common, status, error, summary, run_dir, node_id, started, hit=False,
                     last=None):
    """``last``: the last record (or, for a stopped trial, Tune result) the trial reached."""
    s = summary or {}
    done = summary is not None and status != "stopped"
    row = {"status": status, "error": error, "strong_ticket": s.get("strong_ticket"),
           "dense_cache_hit": hit, "run_dir": str(run_dir) if run_dir else None,
           "mask_path": str(run_dir / "mask.pt") if done else None, "node_id": node_id,
           "hostname": (last or {}).get("hostname") or socket.gethostname(), "started_at": started,
           "ended_at": (last or {}).get("timestamp") or time.time(),
           "last_phase": (last or {}).get("phase"), "last_epoch": (last or {}).get("epoch"),
           "code_version": runtime.code_version(), "library_versions": tables.json_text(runtime.library_versions()),
           "levels": tables.json_text(s.get("levels")), "config": tables.json_text(cfg.to_dict())}
    for k in ("achieved_density", "kept_weights", "prunable_weights", "test_accuracy", "peak_test_accuracy",
              "dense_test_accuracy", "pretrain_seconds", "search_seconds", "retrain_seconds", "ticket_seconds",
              "epochs_equivalent", "mask_sha256", "effective_density", "effective_kept"):
        row[k] = s.get(k)
    if "collapsed_layers" in s:   # number of collapsed layers: > 0 means no path from input to output
        row["collapsed"] = len(s["collapsed_layers"])   # (a stopped trial has no ticket, so no anatomy)
    tables.write(root, "trials", cfg.search.method, common["trial_id"], [row], common)


def _numeric(record: dict) -> dict:
    return {k: v for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _node_id() -> str:
    try:
        import ray
        return ray.get_runtime_context().get_node_id()
    except Exception:
        return socket.gethostname()


def spec_state(spec) -> dict:
    """What trials need of the sweep spec (plain data, shipped to workers)."""
    return {"name": spec.name, "base": spec.base, "set": spec.set, "storage": spec.storage, "cwd": spec.cwd,
            "root": str(spec.root), "storage_root": str(spec.root.parent),
            "system_metrics": spec.mlflow["system_metrics"]}

