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

With ``resources.workers`` > 1 the trial process holds a sliver of a CPU and runs a Ray Train
``TorchTrainer`` of N workers (``_trainer``); every worker computes the run (``compute``, as the
one-process trial does), rank 0 alone doing the above, its reports relayed to Tune by the trial
process (``adapters.fit_relaying_reports``). Tune sees one trial.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pyarrow.parquet as pq
from ray import tune

from .. import storage
from ..cache import DenseCache
from ..config import from_dict
from ..errors import ConfigError, DivergedError
from ..records import (FINAL_STATUSES, REPORTED, TUNE_METRICS, Epoch, Layer, Trial,
                       final_metrics)
from . import tables


def trial(params: dict, spec_state: dict) -> None:
    """``params``: this trial's sampled values (dotted keys); ``spec_state``: base config and folders.
    A full, read-only or vanished storage ends it with one ``StorageError`` line (the driver stops
    the sweep on it: runner.StorageGuard), whatever library the failed write was in."""
    with storage.named_faults(Path(spec_state["root"])):
        _run_trial(params, spec_state)


def _run_trial(params: dict, spec_state: dict) -> None:
    spec, cfg = _resolve(params, spec_state)
    root = Path(spec_state["root"])
    # the id this trial's rows, run folder, progress and MLflow run go under: its own, or that of a
    # trial the resumed Tune state forgot and this one goes on as (resume.orphans)
    trial_id, orphan = adopt(root, cfg.hash, tune.get_context().get_trial_id(), spec_state.get("orphans", {}))
    adopted = {"adopted_from": trial_id} if orphan is not None else {}
    if _report_ended(root, cfg, trial_id, orphan, adopted, spec_state):
        return
    ident = progress_path(root, trial_id).with_suffix(".json")   # what resume.orphans matches it by
    ident.parent.mkdir(exist_ok=True)
    storage.write_text(ident, json.dumps({"config_hash": cfg.hash}))
    job = Job(spec.trial_raw(params), trial_id, adopted, spec_state)
    if cfg.resources.workers == 1:
        compute(job, tune.report, cfg)
    else:
        from .adapters import fit_relaying_reports
        fit_relaying_reports(lambda channel: _trainer(job, cfg, channel), tune.report)


@dataclass(frozen=True)
class Job:
    """What every process computing one trial needs (plain data, shipped to Ray Train's workers)."""
    raw: dict          # the trial's run config, as from_dict takes it
    trial_id: str      # the id its rows, run folder and progress go under
    adopted: dict      # {"adopted_from": id} when it goes on as a trial the resumed Tune state forgot
    state: dict        # spec_state()


def compute(job: Job, send: Callable[[dict], None], cfg=None) -> None:
    """The trial's ``pipeline.run`` in this process: the trial's own, or one of its data-parallel
    workers. The main rank (the only one in a world of one) saves progress and sends every record
    (``Reporter``), writes the rows and sends the final report; the others compute alongside.
    ``cfg``: ``job.raw`` resolved, where the caller has it (resolving checks the data folder)."""
    import torch   # here, not at the top: the driver imports this module and needs no torch

    from .. import pipeline
    from ..distributed import World
    cfg, root, trial_id = cfg or from_dict(job.raw), Path(job.state["root"]), job.trial_id
    if cfg.resources.threads is None:   # one torch thread per CPU the process holds, never more
        torch.set_num_threads(max(1, int(cfg.resources.cpus)))
    # The trial's own checkpoint, not Tune's: Tune deletes an old checkpoint before its state
    # snapshot names the new one, so a driver killed in between would resume from a deleted one.
    saved = progress_path(root, trial_id)
    resume = pipeline.Progress.from_state(torch.load(saved, weights_only=True)) if saved.exists() else None
    world = World.current()
    nodes = world.gather(_node_id())   # where this group's ranks run (a node lost: where the next one did)
    reporter = Reporter(cfg, saved, job.adopted, resume, job.state.get("system_metrics"), send) if world.main else None
    run_dir = root / "trials" / trial_id
    common = {"sweep": job.state["name"], "trial_id": trial_id, "config_hash": cfg.hash, **tables.axes(cfg)}
    cache = DenseCache(Path(job.state["storage_root"]) / "_cache" / "dense")
    try:
        summary = pipeline.run(cfg, run_dir, overwrite=True, progress=False, on_record=reporter,
                               cache=cache, resume=resume)
        status, error = "finished", None
    except DivergedError as e:   # deterministic: retrying would diverge again
        status, error, summary = "diverged", str(e), None
    except ConfigError as e:     # deterministic too (e.g. data missing on this node): no retries
        status, error, summary = "error", f"ConfigError: {e}", None
    except Exception as e:   # the row says why; on a full disk it may not be written (then resume runs it again)
        if reporter is not None:
            fault = storage.classify(e, root)
            write_trial_row(root, cfg, common, Trial(
                status="error", error=str(fault) if fault else f"{type(e).__name__}: {e}", node_id=reporter.node_id,
                started_at=reporter.started, run_dir=str(run_dir), dense_cache_hit=False), None)
        raise
    if reporter is None:
        return
    _write_rows(root, cfg, common, reporter, status, error, summary, run_dir, nodes)
    _forget_progress(root, trial_id)   # done: nothing to continue
    send(reporter.final(status, summary, run_dir))


# ------------------------------------------------------------- a trial of data-parallel workers

TRIAL_CPUS = 0.05   # a multi-worker trial's own process: it waits on Ray Train and relays reports


def tune_resources(cfg) -> dict:
    """What Tune reserves for each trial: the trial process's CPUs and GPUs; with workers > 1 a
    sliver of a CPU for it, its Ray Train workers reserving their own (``_trainer``)."""
    r = cfg.resources
    return {"cpu": r.cpus, "gpu": r.gpus} if r.workers == 1 else {"cpu": TRIAL_CPUS, "gpu": 0}


def trial_cpus(cfg) -> float:
    """The CPUs one trial takes on the cluster, its workers' included."""
    r = cfg.resources
    return r.cpus if r.workers == 1 else r.cpus * r.workers + TRIAL_CPUS


def _trainer(job: Job, cfg, channel):
    """Ray Train's TorchTrainer of this trial: ``resources.workers`` workers of ``resources.cpus``
    and ``resources.gpus`` each (``ResourcesConfig.backend``), its run named after the trial (a
    restarted worker group and a resumed sweep find it again), under the sweep folder. A failed or
    killed worker restarts the group, up to the sweep's ``max_failures`` times; the new group goes
    on from the trial's saved progress."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    r = cfg.resources
    per_worker = {"CPU": r.cpus, **({"GPU": r.gpus} if r.gpus else {})}
    return TorchTrainer(
        _worker, train_loop_config={"job": job, "channel": channel},
        torch_config=TorchConfig(backend=r.backend),
        scaling_config=ScalingConfig(num_workers=r.workers, use_gpu=r.gpus > 0, resources_per_worker=per_worker),
        run_config=RunConfig(name=job.trial_id, storage_path=str(Path(job.state["root"]) / "train"),
                             failure_config=FailureConfig(max_failures=job.state.get("max_failures", 2))))


def _worker(config: dict) -> None:
    """One Ray Train worker of a trial (its torch.distributed world set up by Train): ``compute``,
    rank 0 sending its reports to the trial (``adapters.fit_relaying_reports``). Train
    runs it with its GPU as torch's current device where CUDA is (TorchConfig's train_func_context;
    ``ray.train.torch.get_device()`` says cuda:N on a GPU reservation without CUDA too)."""
    job, channel = config["job"], config["channel"]
    with storage.named_faults(Path(job.state["root"])):
        compute(job, channel.send)


def _resolve(params: dict, spec_state: dict):
    """The sweep spec and this trial's resolved Config."""
    from .spec import SweepSpec
    spec = SweepSpec(name=spec_state["name"], base=spec_state["base"], set=spec_state["set"],
                     storage=spec_state["storage"], cwd=spec_state["cwd"])
    return spec, from_dict(spec.trial_raw(params))


def _report_ended(root: Path, cfg, trial_id: str, orphan, adopted: dict, spec_state: dict) -> bool:
    """A trial that ended before the driver died, after Tune's last state snapshot: report its row
    again instead of running it. So does, on a resume, a trial of a grid point that already has its
    finished rows under other ids (Tune's restored state made it again): it goes on as one of them.
    A trial the resume runs again (``rerun``: interrupted, or failed and retried) runs."""
    rerun = trial_id in spec_state.get("rerun", ())
    done = None if rerun else _finished_row(root, cfg.search.method, trial_id)
    if done is None and orphan is not None and orphan["status"] in FINAL_STATUSES:
        done = orphan
    if done is None and orphan is None and not rerun and spec_state.get("repeats"):
        done = _point_done(root, cfg.hash, trial_id, spec_state["repeats"])
        adopted = {"adopted_from": done["trial_id"]} if done is not None else adopted
    if done is None:
        return False
    tune.report({"phase": "final", "step": done["steps"] + 1, "already_finished": 1, **adopted,
                 **{k: done[k] for k in REPORTED if done[k] is not None}})
    return True


def _point_done(root: Path, config_hash: str, trial_id: str, repeats: int):
    """A finished row of this config under another trial id, when it has ``repeats`` of them."""
    import pyarrow.compute as pc
    try:
        t = tables.read(root, "trials")
    except FileNotFoundError:
        return None
    t = t.filter(pc.and_(pc.equal(t["config_hash"], config_hash), pc.equal(t["status"], "finished")))
    done = [r for r in t.to_pylist() if r["trial_id"] != trial_id]
    if len(done) < repeats:
        return None
    epochs = tables.read(root, "epochs", ["trial_id"]).column("trial_id")
    done[0]["steps"] = pc.sum(pc.equal(epochs, done[0]["trial_id"])).as_py() or 0   # the final's step
    return done[0]


class Reporter:
    """``pipeline.run``'s ``on_record``: reports every record (``send``: to Tune, or to the trial
    process that does), after saving the trial's progress with it, and keeps what the trial's final
    report and rows need."""

    def __init__(self, cfg, saved: Path, adopted: dict, resume, system_metrics: bool,
                 send: Callable[[dict], None] = tune.report):
        self.saved, self.adopted, self.node_id, self.send = saved, adopted, _node_id(), send
        self.started = time.time()
        # every report carries these (the ticket's, as known so far), so Tune finds the metric in each
        self.running = {**dict.fromkeys(TUNE_METRICS, 0.0), "achieved_density": cfg.search.density}
        self.final_round = None
        if cfg.search.method == "ltr":   # LTR's last round retrains the ticket itself
            from ..methods.ltr import rounds_for
            self.final_round = rounds_for(cfg.search.density, cfg.search.ltr_fraction)
        self.system = None
        if system_metrics:
            from .mlflow_log import SystemMetrics
            self.system = SystemMetrics()
        self.records, self.step, self.ticket_iteration = [], 0, 0
        if resume is not None and resume.records:
            self.records = list(resume.records)
            self.step = len(self.records)
            self.ticket_iteration = sum(1 for r in self.records if r["phase"] != "dense")
            self.started = self.records[0].get("started_at", self.started)
            # the last saved epoch may not have reached Tune (killed between saving and reporting):
            last = self.records.pop()   # report it again; MLflow skips a step it already has
            self.step -= 1
            self.ticket_iteration -= last["phase"] != "dense"
            self(last, None)

    def __call__(self, record: dict, progress) -> None:
        self.records.append(record)
        self.step += 1
        ticket = record["phase"] in ("retrain", "evaluate") and record.get("round", self.final_round) == self.final_round
        if ticket and record.get("test_accuracy") is not None:
            self.running["test_accuracy"] = record["test_accuracy"]
            self.running["peak_test_accuracy"] = max(self.running["peak_test_accuracy"], record["test_accuracy"])
        self.running["ticket_seconds"] += record.get("seconds", 0.0) if not record.get("cached") else 0.0
        if self.step == 1:
            record["started_at"] = self.started
        metrics = {**self.running, **_numeric(record), "phase": record["phase"], "step": self.step,
                   "node_id": self.node_id, **self.adopted,
                   "row": json.dumps(Epoch.from_record(record).row()),   # what the driver keeps of a stopped trial
                   **(self.system.sample() if self.system else {})}
        if record["phase"] != "dense":
            self.ticket_iteration += 1
        if ticket:   # the scheduler's time axis: only beside this trial's own ticket metrics
            metrics["ticket_iteration"] = self.ticket_iteration
        if progress is not None:   # written before the report: what Tune saw is never ahead of it
            self.saved.parent.mkdir(exist_ok=True)
            storage.save_torch(progress.to_state(), self.saved)
        self.send(metrics)

    def final(self, status: str, summary, run_dir: Path) -> dict:
        """The trial's last report: its status and the ticket's final metrics (``Summary.final``)."""
        out = {"phase": "final", "status": status, "step": self.step + 1, "node_id": self.node_id,
               **self.adopted, "run_dir": str(run_dir), "ticket_iteration": self.ticket_iteration + 1,
               **self.running}
        return {**out, **final_metrics(summary)} if summary is not None else out


def _write_rows(root: Path, cfg, common: dict, reporter: Reporter, status: str, error, summary,
                run_dir: Path, nodes: list) -> None:
    """The trial's rows of the three tables (``_write_trial``). A failed trial keeps no epochs; a
    diverged one keeps those that show how it diverged. ``nodes``: each rank's node."""
    records = [] if status == "error" else reporter.records
    last = records[-1] if records else {}
    layers = json.loads((run_dir / "layers.json").read_text())[:-1] if summary is not None else None
    _write_trial(root, cfg, common, Trial(
        status=status, error=error, node_id=reporter.node_id, worker_node_ids=nodes, started_at=reporter.started,
        dense_cache_hit=_dense_cached(records), run_dir=str(run_dir),
        mask_path=str(run_dir / "mask.pt") if summary is not None else None,
        last_phase=last.get("phase"), last_epoch=last.get("epoch")), summary,
        [Epoch.from_record(r).row() for r in records], reporter.node_id,
        None if layers is None else [Layer.from_record(r).row() for r in layers])


def _dense_cached(records) -> bool:
    """Whether a trial's dense run was read from the cache (its dense epoch records say so)."""
    return any(r.get("cached") for r in records if r["phase"] == "dense")


def _write_trial(root: Path, cfg, common: dict, trial: Trial, summary, epochs: list, node_id,
                 layers: Optional[list] = None) -> None:
    """A trial's epochs and layers rows, then its trials row: that row says the others are whole
    (a resume never runs a point with a finished row again). A write that fails (a full disk) takes
    this trial's new epochs and layers files with it, so the point runs again with none left over."""
    method, written = cfg.search.method, []
    try:
        written.append(tables.write(root, "epochs", method, common["trial_id"], epochs, {**common, "node_id": node_id}))
        if layers is not None:
            written.append(tables.write(root, "layers", method, common["trial_id"], layers, common))
        write_trial_row(root, cfg, common, trial, summary)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def progress_path(root: Path, trial_id: str) -> Path:
    """The last finished epoch of an unfinished trial (records, search and retraining state),
    which a retried or resumed trial continues from."""
    return root / "progress" / f"{trial_id}.pt"


def forget_progress(root: Path, trial_ids) -> None:
    """A retried trial starts afresh: its saved progress goes (``--retry-failed``)."""
    for tid in trial_ids:
        _forget_progress(root, tid)


def _forget_progress(root: Path, trial_id: str) -> None:
    path = progress_path(root, trial_id)
    path.unlink(missing_ok=True)
    path.with_suffix(".json").unlink(missing_ok=True)


def adopt(root: Path, config_hash: str, tune_id: str, orphans: dict) -> tuple:
    """(trial id to go on as, the orphan adopted or None). ``orphans``: resume.orphans, by config
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
        try:
            with os.fdopen(fd, "w") as f:
                f.write(tune_id)
        except OSError:   # an empty claim would bar every trial from this orphan: leave none
            (claims / o["trial_id"]).unlink(missing_ok=True)
            raise
        return o["trial_id"], o
    return tune_id, None


def _finished_row(root: Path, method: str, trial_id: str):
    path = root / "tables" / "trials" / f"method={method}" / f"{trial_id}.parquet"
    if not path.exists():
        return None
    row = pq.read_table(path).to_pylist()[0]
    if row["status"] not in FINAL_STATUSES:
        return None
    epochs = root / "tables" / "epochs" / f"method={method}" / f"{trial_id}.parquet"
    row["steps"] = pq.read_metadata(epochs).num_rows if epochs.exists() else 0   # its records: the final's step
    return row


def write_stopped(root: Path, spec, result, scheduler: str) -> None:
    """The row of a trial a scheduler stopped (its thread never returns): from its Tune results.
    ``result``: the trial's ``ray.tune.Result``."""
    history = [json.loads(line) for line in (Path(result.path) / "result.json").read_text().splitlines() if line]
    last = history[-1]
    cfg, common = _row_keys(spec, result.config, last, last["trial_id"])
    tid, rows = common["trial_id"], {}
    for r in history:   # a retried trial reports some epochs twice: keep the last
        if r.get("row"):
            row = json.loads(r["row"])
            rows[(row["phase"], row["round"], row["epoch"])] = row
    where = f"{last['phase']} epoch {last.get('epoch')}, ticket iteration {last.get('ticket_iteration')}"
    summary = {"test_accuracy": last["test_accuracy"] if last.get("ticket_iteration") else None,
               "peak_test_accuracy": last.get("peak_test_accuracy") or None, "ticket_seconds": last["ticket_seconds"]}
    started = history[0].get("started_at") or last.get("timestamp", 0) - last.get("time_total_s", 0)
    _write_trial(root, cfg, common, Trial(
        status="stopped", error=f"stopped by {scheduler} at {where}", node_id=last.get("node_id"),
        dense_cache_hit=_dense_cached(rows.values()),
        started_at=started, hostname=last.get("hostname"), ended_at=last.get("timestamp"),
        last_phase=last.get("phase"), last_epoch=last.get("epoch")), summary, list(rows.values()), last.get("node_id"))
    for staging in (root / "trials").glob(f".{tid}.partial-*"):   # the stopped run's unfinished folder
        shutil.rmtree(staging, ignore_errors=True)
    _forget_progress(root, tid)


def _row_keys(spec, config: dict, last: dict, tune_id: str) -> tuple:
    """(the Config of a trial the driver writes a row for, its key columns): under the id of the
    trial it adopted, if any (``last``: its last report)."""
    cfg = from_dict(spec.trial_raw(config))
    tid = last.get("adopted_from") or tune_id
    return cfg, {"sweep": spec.name, "trial_id": tid, "config_hash": cfg.hash, **tables.axes(cfg)}


def write_interrupted(root: Path, spec, tune_id: str, config: dict, last: dict) -> None:
    """The row of a trial that was running when the driver was interrupted (Ctrl-C, SIGTERM), from
    its last report (``last``, empty when it had reported nothing). Its progress file stays, so
    --resume continues it; its row is then replaced (same trial id). A row of a trial that ended
    meanwhile is kept."""
    cfg, common = _row_keys(spec, config, last, tune_id)
    if _finished_row(root, cfg.search.method, common["trial_id"]) is not None:
        return
    where = f" at {last['phase']} epoch {last.get('epoch')}" if last.get("phase") else " before its first epoch"
    started = last.get("timestamp", time.time()) - last.get("time_total_s", 0)
    write_trial_row(root, cfg, common, Trial(
        status="interrupted", error=f"interrupted{where} (the driver got Ctrl-C or SIGTERM); --resume continues it",
        node_id=last.get("node_id"), dense_cache_hit=False, started_at=started, hostname=last.get("hostname"),
        last_phase=last.get("phase"), last_epoch=last.get("epoch")), None)


def write_trial_row(root, cfg, common: dict, trial: Trial, summary) -> None:
    """``summary``: the run's (``records.Summary`` as a dict), a stopped trial's partial one, or None."""
    from .. import versions
    trial.hostname = trial.hostname or socket.gethostname()
    trial.ended_at = trial.ended_at or time.time()
    trial.code_version, trial.library_versions = versions.code_version(), versions.library_versions()
    trial.config = cfg.to_dict()
    tables.write(root, "trials", cfg.search.method, common["trial_id"], [trial.row(summary)], common)


def _numeric(record: dict) -> dict:
    return {k: v for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _node_id() -> str:
    try:
        import ray
        return ray.get_runtime_context().get_node_id()
    except Exception:
        return socket.gethostname()


def spec_state(spec, rerun=(), resumed: bool = False) -> dict:
    """What trials need of the sweep spec (plain data, shipped to workers). ``rerun``: trial ids a
    resume runs again; ``resumed``: a grid point with its finished rows already is not run again."""
    return {"rerun": set(rerun), "repeats": spec.num_samples if resumed and spec.searcher == "grid" else 0,
            "name": spec.name, "base": spec.base, "set": spec.set, "storage": spec.storage, "cwd": spec.cwd,
            "root": str(spec.root), "storage_root": str(spec.root.parent),
            "system_metrics": spec.mlflow["system_metrics"], "max_failures": spec.max_failures}

