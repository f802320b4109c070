"""The Ray Tune trainable: one trial = one pipeline run (dense → search → retrain → evaluate).

Every metrics record is reported to Tune; retraining epochs carry a checkpoint (the ticket plus
the retraining state), so a retried trial continues after its last finished epoch. The dense run
comes from the sweep's shared cache. At the end the trial writes its rows of the three Parquet
tables; MLflow is logged from the driver (see mlflow_log.py), so a tracking-server failure cannot
lose these rows.
"""
from __future__ import annotations

import json
import math
import socket
import tempfile
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
    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    root = Path(spec_state["root"])
    run_dir = root / "trials" / trial_id
    node_id = _node_id()
    started = time.time()
    # every report carries these (as known so far), so schedulers and searchers find their metric
    running = {"test_accuracy": 0.0, "best_test_accuracy": 0.0, "ticket_seconds": 0.0,
               "achieved_density": cfg.search.density}
    step = [0]
    system = None
    if spec_state.get("system_metrics"):
        from .mlflow_log import SystemMetrics
        system = SystemMetrics()

    done = _finished_row(root, cfg.search.method, trial_id)
    if done is not None:   # finished before the driver died, after Tune's last state snapshot
        tune.report({"phase": "final", "status": done["status"], "step": 1, "node_id": done["node_id"],
                     "run_dir": done["run_dir"], "already_finished": 1,
                     **{k: done[k] for k in ("test_accuracy", "best_test_accuracy", "achieved_density",
                                             "ticket_seconds") if done[k] is not None}})
        return

    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume = pipeline.Progress.from_state(torch.load(Path(d) / "progress.pt", weights_only=True))
        step[0] = len(resume.records)
        started = resume.records[0].get("started_at", started) if resume.records else started

    records = list(resume.records) if resume is not None else []

    def on_record(record: dict, progress) -> None:
        records.append(record)
        step[0] += 1
        if record.get("test_accuracy") is not None:
            running["test_accuracy"] = record["test_accuracy"]
            if record["phase"] in ("retrain", "evaluate"):
                running["best_test_accuracy"] = max(running["best_test_accuracy"], record["test_accuracy"])
        running["ticket_seconds"] += record.get("seconds", 0.0) if not record.get("cached") else 0.0
        if step[0] == 1:
            record["started_at"] = started
        metrics = {**_numeric(record), **running, "phase": record["phase"], "step": step[0], "node_id": node_id,
                   **(system.sample() if system else {})}
        if progress is None:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            torch.save(progress.to_state(), Path(d) / "progress.pt")
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    common = {"sweep": spec.name, "trial_id": trial_id, "config_hash": cfg.hash, **tables.axes(cfg)}
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
    _write_trial_row(root, cfg, common, status, error, summary, run_dir, node_id, started, hit)
    method = cfg.search.method
    tables.write(root, "epochs", method, trial_id, [tables.epoch_row(r) for r in records],
                 {**common, "node_id": node_id})
    if summary is not None:
        layers = json.loads((run_dir / "layers.json").read_text())[:-1]
        tables.write(root, "layers", method, trial_id,
                     [{k: r[k] for k in ("layer", "numel", "kept", "density")} for r in layers], common)
    final = {"phase": "final", "status": status, "step": step[0] + 1, "node_id": node_id,
             "run_dir": str(run_dir), **running}
    if summary is not None:
        final.update({k: summary[k] for k in ("test_accuracy", "best_test_accuracy", "achieved_density",
                                              "ticket_seconds", "dense_test_accuracy") if summary[k] is not None})
    tune.report(final)


def _finished_row(root: Path, method: str, trial_id: str):
    path = root / "tables" / "trials" / f"method={method}" / f"{trial_id}.parquet"
    if not path.exists():
        return None
    row = pq.read_table(path).to_pylist()[0]
    return row if row["status"] in ("finished", "diverged") else None


def _write_trial_row(root, cfg, common, status, error, summary, run_dir, node_id, started, hit=False):
    s = summary or {}
    row = {"status": status, "error": error, "strong_ticket": s.get("strong_ticket"),
           "dense_cache_hit": hit, "run_dir": str(run_dir),
           "mask_path": str(run_dir / "mask.pt") if summary else None, "node_id": node_id,
           "hostname": socket.gethostname(), "started_at": started, "ended_at": time.time(),
           "code_version": runtime.code_version(), "library_versions": tables.json_text(runtime.library_versions()),
           "levels": tables.json_text(s.get("levels")), "config": tables.json_text(cfg.to_dict())}
    for k in ("achieved_density", "kept_weights", "prunable_weights", "test_accuracy", "best_test_accuracy",
              "dense_test_accuracy", "pretrain_seconds", "search_seconds", "retrain_seconds", "ticket_seconds",
              "epochs_equivalent", "mask_sha256"):
        row[k] = s.get(k)
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

