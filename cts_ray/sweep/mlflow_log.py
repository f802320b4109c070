"""MLflow logging from the sweep driver: one parent run per sweep, one child run per trial.

Logging happens on the driver (a Tune callback), so there is a single writer per store and a
tracking server only needs to be reachable from the head. The callbacks only queue their events;
one background thread makes every MLflow call in order, so a slow store (a new sqlite file's
migrations, a remote server) never holds up Tune starting trials. Runs are found again by tags
(``cts.sweep``, ``cts.trial_id``), so a resumed sweep or a retried trial continues its run rather
than starting a new one, and steps already logged are not logged twice; a trial ``--retry-failed``
runs afresh gets a new run in place of its old one (deleted). A failing tracking
store is reported once and then skipped: the Parquet tables are written by the trials themselves.
``Tracking`` is what a run logs (params as applied, metrics stepped by epoch within each phase,
artifacts, the data set as a dataset input); ``cts-ray run --mlflow`` logs through it too.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Optional
from urllib.parse import quote, urlencode

from ray.tune import Callback

from ..config import flatten
from ..records import FINAL_METRICS, Epoch, final_metrics
from ..versions import code_version

ARTIFACTS = ("mask.pt", "layers.json", "summary.json", "config.yaml")
# MLflow's log_batch limits (mlflow.utils.validation): 100 params and 100 tags, 1000 entities in all
BATCH_PARAMS_TAGS, BATCH_ENTITIES = 100, 1000
# Without a kind MLflow 3's UI opens an experiment on its GenAI traces page, not on its runs.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def ui_link(experiment_id: str, sweep: Optional[str] = None) -> str:
    """Where the MLflow UI shows the experiment's training runs; with ``sweep``, that sweep's trials
    listed flat (no parent row to expand) and sorted by test accuracy, best first.

    MLflow 3.17's UI picks an experiment's page by its GenAI / Model training switch, which
    ``workflowType`` sets; it reads its search facets (``searchFilter``, ``orderByKey``,
    ``orderByAsc``) from the link, and nests child runs under their parent only when the runs are
    unfiltered and sorted by start time."""
    link = f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    if sweep is None:
        return link
    quote_mark = '"' if "'" in sweep else "'"   # MLflow's filter takes either around a string
    facets = {"searchFilter": f"tags.`cts.sweep` = {quote_mark}{sweep}{quote_mark} AND tags.`cts.role` = 'trial'",
              "orderByKey": "metrics.`test_accuracy`", "orderByAsc": "false"}
    return f"{link}&{urlencode(facets, quote_via=quote)}"


def default_tracking_uri(root: Path) -> str:
    return f"sqlite:///{Path(root).resolve().parent / 'mlflow.db'}"


def artifact_location(tracking_uri: str) -> Optional[str]:
    """Artifacts of a local sqlite store go beside it (``mlflow.db`` -> ``mlartifacts/``), never into
    ./mlruns of whatever folder the command ran from; a server decides for itself (None)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return (Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()


def run_params(cfg) -> dict:
    """The resolved config as params, with the values that applied where a field defers to another
    (``search.lr: null`` means the training LR; ``training.retrain: null`` the method's default),
    and without the knobs the method does not read (SNIP has no temperature)."""
    from ..methods import applies
    params = flatten(cfg.to_dict())
    params.update({"search.lr": cfg.mask_lr, "training.retrain": cfg.retrain})
    return {k: v for k, v in params.items() if applies(cfg.search.method, k)}


class SystemMetrics:
    """CPU and memory (and GPU when there is one) as MLflow measures them, sampled by the trial at
    each report (CPU use is the average since the last one) and logged as ``system/...`` metrics."""

    def __init__(self):
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
        self.monitors = [CPUMonitor()]
        try:
            import torch
            if torch.cuda.is_available():
                from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
                self.monitors.append(GPUMonitor())
        except Exception:   # no NVML: CPU and memory only
            pass
        self.sample()   # psutil's CPU use counts from its previous call

    def sample(self) -> dict:
        out = {}
        for m in self.monitors:
            m.collect_metrics()
            out.update({f"system/{k}": v for k, v in m.aggregate_metrics().items()})
            m.clear_metrics()
        return out


class Tracking:
    """One tracking store and experiment, and what cts-ray logs to it: a run per trial (or per
    ``cts-ray run --mlflow``) with its params, per-epoch metrics, artifacts and data set. Every call
    goes through ``attempt``: a failing store is reported once and then skipped."""

    def __init__(self, tracking_uri: str, experiment: str):
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.client = None
        self.experiment_id: Optional[str] = None
        self.failed: Optional[str] = None

    def attempt(self, what: str, fn, *args, **kwargs):
        if self.failed is not None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:   # the tracking store is down or broken (or its disk full): keep the work going
            self.failed = f"{what}: {_root_cause(e)}"
            print(f"cts-ray: MLflow logging stopped ({self.failed}); Parquet tables are unaffected",
                  file=sys.stderr)
            return None

    def open(self, unsynced: bool = False) -> str:
        """Connect and find (or create) the experiment, a local sqlite store ``unsynced()`` if asked;
        raises when the store fails (callers wrap it in ``attempt``)."""
        # MLflow's import first: Tune's fit imports mlflow on the driver's main thread too, and two
        # threads that begin importing it at different modules deadlock on its circular imports
        from mlflow.tracking import MlflowClient
        # MLflow logs a failed SQL statement with its traceback, then raises it to ``attempt``, which says it
        logging.getLogger("mlflow.store.db.utils").addFilter(_raised_on)
        if unsynced:
            self.unsynced()
        self.client = MlflowClient(self.tracking_uri)
        exp = self.client.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp else \
            self.client.create_experiment(self.experiment, artifact_location=artifact_location(self.tracking_uri))
        if exp is None or exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:   # older experiments too
            self.client.set_experiment_tag(exp_id, *EXPERIMENT_KIND)
        self.experiment_id = exp_id
        return exp_id

    def unsynced(self) -> bool:
        """A local sqlite store written without an fsync per commit (``PRAGMA synchronous=OFF`` on
        the connections this process opens to its file; nothing in the file changes). A sweep makes
        about ten commits per trial, which at ~7 ms each is slower than trivial trials finish, so
        logging fell ever further behind. A killed driver loses nothing it committed; a power cut
        or OS crash during a sweep can damage mlflow.db (the Parquet tables are the record).
        ``CTS_RAY_MLFLOW_SYNC=full`` keeps sqlite's default. Connections opened before it are unchanged."""
        if not self.tracking_uri.startswith("sqlite:") or os.environ.get("CTS_RAY_MLFLOW_SYNC") == "full":
            return False
        from sqlalchemy.engine import make_url
        database = make_url(self.tracking_uri).database
        if not database or database == ":memory:":
            return False
        _UNSYNCED_FILES.add(os.path.realpath(database))
        _listen_for_sqlite_connections()
        return True

    def create_run(self, cfg, name: str, tags: dict, with_params: bool = True) -> Optional[str]:
        """A run tagged with the config's identity; its params too unless ``with_params`` is false
        (the caller sends ``params(cfg)`` in a later batch)."""
        def create():
            run = self.client.create_run(self.experiment_id, run_name=name,
                                         tags={"cts.config_hash": cfg.hash, "cts.method": cfg.search.method,
                                               "cts.seed": str(cfg.seed), "cts.code_version": code_version(), **tags})
            if with_params:
                self.client.log_batch(run.info.run_id, params=self.params(cfg))
            return run.info.run_id
        return self.attempt("create run", create)

    @staticmethod
    def params(cfg) -> list:
        from mlflow.entities import Param
        return [Param(k, (json.dumps(v) if isinstance(v, (list, tuple)) else str(v))[:6000])
                for k, v in run_params(cfg).items()]

    def log_result(self, run_id: str, result: dict, step: int) -> None:
        """One reported record: ``phase/metric`` at its epoch within the phase (``phase_step``),
        final metrics and ``system/...`` at the run's running ``step`` (also logged, as a metric,
        so a resumed run knows where it was)."""
        self.log_batch(run_id, self.result_metrics(result, step))

    def log_batch(self, run_id: str, metrics=(), tags=(), params=()) -> None:
        """Metrics, tags and params in as few calls as MLflow's batch limits allow (one, mostly)."""
        metrics, tags, params = list(metrics), list(tags), list(params)
        while metrics or tags or params:
            p, t = params[:BATCH_PARAMS_TAGS], tags[:BATCH_PARAMS_TAGS]
            m = metrics[:BATCH_ENTITIES - len(p) - len(t)]
            self.attempt("metrics", self.client.log_batch, run_id, metrics=m, params=p, tags=t)
            metrics, tags, params = metrics[len(m):], tags[len(t):], params[len(p):]

    def result_metrics(self, result: dict, step: int) -> list:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        phase = result.get("phase")
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
        metrics = [Metric(k, float(v), now, step) for k, v in result.items() if k.startswith("system/") and number(v)]
        if phase == "final":
            metrics += [Metric(k, float(result[k]), now, step) for k in FINAL_METRICS if number(result.get(k))]
        else:
            at = int(result.get("phase_step", step))
            # the record's own values (a sweep's result also carries the ticket's, for Tune's schedulers)
            epoch = Epoch.from_row(json.loads(result["row"])) if result.get("row") else Epoch.from_record(result)
            metrics += [Metric(k, v, now, at) for k, v in epoch.metrics().items()]
        metrics.append(Metric("step", float(step), now, step))
        return metrics

    def log_outputs(self, run_id: str, run_dir: Path) -> None:
        """The run folder's artifacts, and its data set (from summary.json) as a dataset input."""
        for name in ARTIFACTS:
            if (run_dir / name).exists():
                self.attempt("artifacts", self.client.log_artifact, run_id, str(run_dir / name))
        summary = run_dir / "summary.json"
        data = json.loads(summary.read_text()).get("data") if summary.exists() else None
        if data:
            self.attempt("dataset", self.client.log_inputs, run_id, [dataset_input(data)])

    def end(self, run_id: str, status: str) -> None:
        self.attempt("end run", self.client.set_terminated, run_id, status)


def _root_cause(e: BaseException) -> str:
    """The innermost exception of ``e``'s chain, in one line (SQLAlchemy's text spans several)."""
    for _ in range(10):
        nxt = e.__cause__ or e.__context__
        if nxt is None:
            break
        e = nxt
    lines = str(e).strip().splitlines() or [""]
    return f"{type(e).__name__}: {lines[0][:300]}"


def _raised_on(record: logging.LogRecord) -> bool:
    return record.exc_info is None


# a trial row's status -> its MLflow run's (as the Tune callbacks end them: a diverged trial ends
# normally, tagged cts.status)
RUN_STATUS = {"finished": "FINISHED", "diverged": "FINISHED", "error": "FAILED", "stopped": "KILLED",
              "interrupted": "KILLED"}


_UNSYNCED_FILES: set = set()   # sqlite files whose new connections in this process skip the fsync


def _listen_for_sqlite_connections() -> None:
    """Every SQLAlchemy engine's new connection to a file in ``_UNSYNCED_FILES`` (MLflow's store
    opens its own engines) gets ``PRAGMA synchronous=OFF``: SQLAlchemy's documented way to set a
    sqlite pragma per connection, with no handle on MLflow's engine needed."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine
    if not event.contains(Engine, "connect", _unsync):
        event.listen(Engine, "connect", _unsync)


def _unsync(dbapi_connection, _record) -> None:
    if not isinstance(dbapi_connection, sqlite3.Connection):
        return
    cursor = dbapi_connection.cursor()
    try:
        files = {os.path.realpath(row[2]) for row in cursor.execute("PRAGMA database_list") if row[2]}
        if files & _UNSYNCED_FILES:
            cursor.execute("PRAGMA synchronous=OFF")
    finally:
        cursor.close()


def dataset_input(data: dict):
    """A data set as an MLflow dataset input: metadata only (name, source folder, content digest,
    split sizes and per-file notes in its profile), never the data itself."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    profile = {k: v for k, v in data.items() if k not in ("name", "source", "digest")}
    return DatasetInput(Dataset(name=data["name"], digest=data["digest"], source_type="local",
                                source=json.dumps({"uri": data["source"]}), profile=json.dumps(profile)),
                        tags=[InputTag("mlflow.data.context", "train+test")])


class MLflowLogger(Callback):
    def __init__(self, tracking_uri: str, experiment: str, sweep: str, sweep_meta: dict, resolve):
        """``resolve(trial.config)`` gives the trial's resolved run config as a Config."""
        self.tracking_uri, self.experiment, self.sweep, self.meta = tracking_uri, experiment, sweep, sweep_meta
        self.resolve = resolve
        self.store: Optional[Tracking] = None
        self.parent_id: Optional[str] = None
        self.runs: dict[str, str] = {}       # trial id -> run id
        self.logged: dict[str, int] = {}     # run id -> last step logged
        self.known: dict[str, str] = {}      # trial id -> run id of the runs this sweep had when it started
        self.pending: dict[str, tuple] = {}  # run id -> (metrics, tags, params) not yet sent
        self.defer: set = set()              # config hashes of forgotten trials a resumed one may adopt
        self.alias: dict[str, str] = {}      # Tune's trial id -> id of the forgotten trial it adopted
        self.fresh: set = set()              # trial ids retried afresh: their old runs are deleted, not continued

    @property
    def failed(self) -> Optional[str]:
        store = getattr(self, "store", None)   # absent on a copy Tune unpickled
        return store.failed if store is not None else None

    # ---- the background thread: every MLflow call runs there, in the order the events came
    def start(self) -> None:
        """Start the logging thread and open the store and the parent run on it (overlapping Ray's
        own start when called before ``ray.init``)."""
        self._queue: queue.Queue = queue.Queue()
        self.pending = {}
        self.store = Tracking(self.tracking_uri, self.experiment)
        threading.Thread(target=self._work, daemon=True).start()
        self._later(self._open)

    def _work(self):
        while True:
            fn, args = self._queue.get()
            try:
                fn(*args)
                if self._queue.empty():   # caught up: send what was gathered (one call per run)
                    self._send()
            except Exception as e:   # a bug here must not kill the thread and hang flush()
                self.store.failed = self.store.failed or f"{getattr(fn, '__name__', fn)}: {type(e).__name__}: {e}"
            finally:
                self._queue.task_done()

    def _gather(self, run_id: str, metrics=(), tags=(), params=()) -> None:
        """Keep a run's metrics, tags and params for one batched call, made when the queue is empty,
        before the run ends, or when a batch is full. A backlog (trials finishing faster than the
        store writes) then costs a few calls per trial, not one per result: logging catches up."""
        m, t, p = self.pending.setdefault(run_id, ([], [], []))
        m.extend(metrics)
        t.extend(tags)
        p.extend(params)
        if len(m) + len(t) + len(p) >= BATCH_ENTITIES:
            self._send(run_id)

    def _send(self, run_id: Optional[str] = None) -> None:
        for rid in ([run_id] if run_id is not None else list(self.pending)):
            metrics, tags, params = self.pending.pop(rid, ([], [], []))
            if metrics or tags or params:
                self.store.log_batch(rid, metrics, tags, params)

    def _later(self, fn, *args):
        if getattr(self, "_queue", None) is None:
            self.start()
        self._queue.put((fn, args))

    def flush(self, timeout: Optional[float] = None) -> None:
        """Wait until everything queued so far is logged (or logging has stopped), or ``timeout``
        seconds have passed."""
        q = getattr(self, "_queue", None)
        if q is None:
            return
        if timeout is None:
            q.join()
            return
        with q.all_tasks_done:   # queue.join with a deadline
            end = time.monotonic() + timeout
            while q.unfinished_tasks and time.monotonic() < end:
                q.all_tasks_done.wait(end - time.monotonic())

    def _open(self):
        self.store.attempt("parent run", lambda: (self.store.open(unsynced=True), self._parent()))

    def __getstate__(self):   # Tune pickles its run config (callbacks included) into the sweep state
        return {k: v for k, v in self.__dict__.items() if k not in ("_queue", "store", "pending")}

    def setup(self, **info):
        if getattr(self, "_queue", None) is None:
            self.start()

    def _parent(self):
        """Find the sweep's runs (a resumed or extended sweep's) with one search, newest first, as
        the parent and each trial's run; create the parent if there is none."""
        client, exp = self.store.client, self.store.experiment_id
        token, parent, retried = None, None, []
        while True:
            page = client.search_runs([exp], f"tags.`cts.sweep` = '{self.sweep}'", max_results=1000,
                                      page_token=token)
            for run in page:
                role, tid = run.data.tags.get("cts.role"), run.data.tags.get("cts.trial_id")
                if role == "parent" and parent is None:
                    parent = run.info.run_id
                elif tid in self.fresh:
                    retried.append(run.info.run_id)
                elif tid is not None:
                    self.known.setdefault(tid, run.info.run_id)
            token = page.token
            if not token:
                break
        for run_id in retried:   # a retried trial's new run replaces it: one run per trial, as in the tables
            client.delete_run(run_id)
        if parent is not None:
            self.parent_id = parent
            return
        run = client.create_run(exp, run_name=self.sweep, tags={"cts.sweep": self.sweep, "cts.role": "parent",
                                                                **{f"cts.{k}": str(v) for k, v in self.meta.items()}})
        self.parent_id = run.info.run_id

    def _child(self, tid: str, config: dict) -> Optional[str]:
        tid = self.alias.get(tid, tid)
        if tid in self.runs:
            return self.runs[tid]

        def find():   # a run this trial had before (a resumed sweep): continue it
            client = self.store.client
            run_id = self.known.get(tid)
            if run_id is None:
                return None
            history = client.get_metric_history(run_id, "step")
            self.logged[run_id] = int(max((m.value for m in history), default=0))
            client.update_run(run_id, status="RUNNING")
            if not client.get_run(run_id).data.params:   # created, then the driver died before its batch
                self._gather(run_id, params=self.store.params(self.resolve(config)))
            return run_id

        if self.store.client is None or self.store.experiment_id is None:
            return None
        run_id = self.store.attempt("child run", find)
        if run_id is None and self.store.failed is None:
            run_id = self._new_run(tid, self.resolve(config))
        if run_id is not None:
            self.logged.setdefault(run_id, 0)
            self.runs[tid] = run_id
        return run_id

    def _new_run(self, tid: str, cfg) -> Optional[str]:
        """A trial's run under the sweep's parent; its params go in the run's next batch."""
        run_id = self.store.create_run(cfg, f"{cfg.search.method}-d{cfg.search.density:g}-s{cfg.seed}-{tid}",
                                       {"mlflow.parentRunId": self.parent_id, "cts.sweep": self.sweep,
                                        "cts.trial_id": tid, "cts.role": "trial"}, with_params=False)
        if run_id is not None:
            self._gather(run_id, params=self.store.params(cfg))
        return run_id

    # ---- Tune's callbacks (on Tune's thread): copy what the event says and queue it
    def on_trial_start(self, iteration, trials, trial, **info):
        self._later(self._start, trial.trial_id, dict(trial.config))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._later(self._result, trial.trial_id, dict(trial.config), dict(result))

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        if last.get("phase", "final") != "final":   # a scheduler stopped it: the run stays, marked so
            self._later(self._stopped, trial.trial_id, dict(trial.config), last.get("phase"), last.get("epoch"))
            return
        self._later(self._end, trial.trial_id, dict(trial.config), "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._later(self._end, trial.trial_id, dict(trial.config), "FAILED")

    def on_experiment_end(self, trials, **info):
        status = "FINISHED" if all(t.status == "TERMINATED" for t in trials) else "FAILED"
        self._later(self._end_parent, status)
        self.flush()

    # ---- what the thread does for each event
    def _start(self, tid: str, config: dict):
        # a trial that may adopt a forgotten one gets its run at its first result, which says
        if not (self.defer and self.resolve(config).hash in self.defer):
            self._child(tid, config)

    def _result(self, tid: str, config: dict, result: dict):
        if result.get("adopted_from"):
            self.alias[tid] = result["adopted_from"]
        run_id = self._child(tid, config)
        step = int(result.get("step", 0))
        if run_id is None or step <= self.logged.get(run_id, 0):
            return
        from mlflow.entities import RunTag
        tags = []
        if result.get("phase") == "final":
            tags.append(RunTag("cts.status", str(result.get("status", ""))))
            if result.get("run_dir"):
                self.store.log_outputs(run_id, Path(result["run_dir"]))
        self._gather(run_id, self.store.result_metrics(result, step), tags)
        self.logged[run_id] = step

    def _end(self, tid: str, config: dict, status: str):
        run_id = self._child(tid, config)
        if run_id:
            if status == "FAILED":   # no final report said it: searchable as its row (status error)
                from mlflow.entities import RunTag
                self._gather(run_id, tags=[RunTag("cts.status", "error")])
            self._send(run_id)
            self.store.end(run_id, status)

    def _stopped(self, tid: str, config: dict, phase, epoch):
        from mlflow.entities import RunTag
        run_id = self._child(tid, config)
        if run_id:
            self._gather(run_id, tags=[RunTag("cts.status", "stopped"),
                                       RunTag("cts.stopped_at", f"{phase} epoch {epoch}")])
            self._send(run_id)
            self.store.end(run_id, "KILLED")

    # ---- after a resume: the runs agree with the rows
    def settle(self, trial_rows: list) -> None:
        """Every trial with a row has one run, ended as its row says: a trial that ended while no
        driver logged it (killed, or Tune's state lost it) would otherwise keep a RUNNING run
        without its final numbers, or none. Waits until done."""
        self._later(self._settle, [dict(r) for r in trial_rows])
        self.flush()

    def _settle(self, trial_rows: list) -> None:
        client = self.store.client
        if client is None or self.store.experiment_id is None:
            return
        runs = self.store.attempt("settle", client.search_runs, [self.store.experiment_id],
                                  f"tags.`cts.sweep` = '{self.sweep}' and tags.`cts.role` = 'trial'",
                                  max_results=10_000) or []
        running = {r.data.tags.get("cts.trial_id"): r for r in runs if r.info.status == "RUNNING"}
        from ..config import from_dict
        from mlflow.entities import RunTag
        for row in trial_rows:
            tid = row["trial_id"]
            if tid in running:
                run_id, step = running[tid].info.run_id, int(running[tid].data.metrics.get("step", 0))
            elif tid in self.runs or tid in self.known:
                continue   # ended as it ran
            else:   # never logged: its run from the row
                run_id, step = self._new_run(tid, from_dict(json.loads(row["config"]))), 0
                if run_id is None:
                    return
                if row.get("run_dir"):
                    self.store.log_outputs(run_id, Path(row["run_dir"]))
            final = {"phase": "final", **{k: row[k] for k in FINAL_METRICS if row.get(k) is not None}}
            self._gather(run_id, self.store.result_metrics(final, step + 1), [RunTag("cts.status", str(row["status"]))])
            self._send(run_id)
            self.store.end(run_id, RUN_STATUS.get(row["status"], "FINISHED"))
        self._drop_rowless(trial_rows, runs)

    def _drop_rowless(self, trial_rows: list, runs: list) -> None:
        """A trial run without a row whose config has one is a point counted twice: a trial a fault
        (a full disk) ended before it wrote anything, whose point then ran under another id. Deleted
        (MLflow's trash: ``mlflow gc`` or the UI can still restore it)."""
        ids, hashes = {r["trial_id"] for r in trial_rows}, {r["config_hash"] for r in trial_rows}
        client = self.store.client
        for run in runs:
            tags = run.data.tags
            if tags.get("cts.trial_id") not in ids and tags.get("cts.config_hash") in hashes:
                self.store.attempt("settle", client.delete_run, run.info.run_id)

    def _end_parent(self, status: str):
        self._send()
        if self.parent_id:
            self.store.end(self.parent_id, status)


def logged_run(tracking_uri: str, experiment: str, cfg, out: Path, run) -> dict:
    """``cts-ray run --mlflow``: one run logged as it goes, as a sweep's trial is (``run(on_record)``
    runs the experiment). A failing store is reported and skipped; the run folder is written anyway."""
    store = Tracking(tracking_uri, experiment)
    run_id = store.create_run(cfg, Path(out).name, {"cts.role": "run"}) \
        if store.attempt("open store", store.open) is not None else None
    step = 0

    def on_record(record: dict, progress) -> None:
        nonlocal step
        step += 1
        if run_id:
            store.log_result(run_id, record, step)

    try:
        summary = run(on_record)
    except BaseException as e:
        if run_id:
            store.end(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    if run_id:
        store.log_outputs(run_id, Path(out))
        store.log_result(run_id, {"phase": "final", **final_metrics(summary)}, step + 1)
        store.end(run_id, "FINISHED")
    return summary
