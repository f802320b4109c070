"""MLflow logging from the sweep driver: one parent run per sweep, one child run per trial.

Logging happens on the driver (a Tune callback), so there is a single writer per store and a
tracking server only needs to be reachable from the head. The callbacks only queue their events;
one background thread makes every MLflow call in order, so a slow store (a new sqlite file's
migrations, a remote server) never holds up Tune starting trials. Runs are found again by tags
(``cts.sweep``, ``cts.trial_id``), so a resumed sweep or a retried trial continues its run rather
than starting a new one, and steps already logged are not logged twice. A failing tracking
store is reported once and then skipped: the Parquet tables are written by the trials themselves.
"""
from __future__ import annotations

import json
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from ray.tune import Callback

from ..config import flatten
from ..runtime import code_version

PHASE_METRICS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "objective", "expected_density",
                 "hard_density", "lambda", "topk_changed", "lr", "seconds")
FINAL_METRICS = ("test_accuracy", "peak_test_accuracy", "dense_test_accuracy", "achieved_density",
                 "ticket_seconds",
                 "effective_density", "effective_kept", "collapsed")   # ticket anatomy (anatomy.py)


def default_tracking_uri(root: Path) -> str:
    return f"sqlite:///{Path(root).resolve().parent / 'mlflow.db'}"


class MLflowLogger(Callback):
    def __init__(self, tracking_uri: str, experiment: str, sweep: str, sweep_meta: dict, resolve):
        """``resolve(trial.config)`` gives the trial's resolved run config as a Config."""
        self.tracking_uri, self.experiment, self.sweep, self.meta = tracking_uri, experiment, sweep, sweep_meta
        self.resolve = resolve
        self.client = None
        self.parent_id: Optional[str] = None
        self.runs: dict[str, str] = {}       # trial id -> run id
        self.logged: dict[str, int] = {}     # run id -> last step logged
        self.failed: Optional[str] = None

    # ---- plumbing: every MLflow call goes through here, so one failure disables logging cleanly
    def _call(self, what: str, fn, *args, **kwargs):
        if self.failed is not None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:   # the tracking store is down or broken: keep the sweep going
            self.failed = f"{what}: {type(e).__name__}: {e}"
            print(f"cts-ray: MLflow logging stopped ({self.failed}); Parquet tables are unaffected",
                  file=sys.stderr)
            return None

    # ---- the background thread: every MLflow call runs there, in the order the events came
    def start(self) -> None:
        """Start the logging thread and open the store and the parent run on it (overlapping Ray's
        own start when called before ``ray.init``)."""
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._work, daemon=True).start()
        self._later(self._open)

    def _work(self):
        while True:
            fn, args = self._queue.get()
            try:
                fn(*args)
            except Exception as e:   # a bug here must not kill the thread and hang flush()
                self.failed = self.failed or f"{getattr(fn, '__name__', fn)}: {type(e).__name__}: {e}"
            finally:
                self._queue.task_done()

    def _later(self, fn, *args):
        if getattr(self, "_queue", None) is None:
            self.start()
        self._queue.put((fn, args))

    def flush(self) -> None:
        """Wait until everything queued so far is logged (or logging has stopped)."""
        if getattr(self, "_queue", None) is not None:
            self._queue.join()

    def _open(self):
        from mlflow.tracking import MlflowClient
        self.client = self._call("open store", MlflowClient, self.tracking_uri)
        self._call("parent run", self._parent)

    def __getstate__(self):   # Tune pickles its run config (callbacks included) into the sweep state
        return {k: v for k, v in self.__dict__.items() if k not in ("_queue", "client")}

    def setup(self, **info):
        if getattr(self, "_queue", None) is None:
            self.start()

    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        return exp.experiment_id if exp else self.client.create_experiment(self.experiment)

    def _parent(self):
        exp = self._experiment_id()
        found = self.client.search_runs([exp], f"tags.`cts.sweep` = '{self.sweep}' and tags.`cts.role` = 'parent'")
        if found:
            self.parent_id = found[0].info.run_id
            return
        run = self.client.create_run(exp, run_name=self.sweep, tags={"cts.sweep": self.sweep, "cts.role": "parent",
                                                                     **{f"cts.{k}": str(v) for k, v in self.meta.items()}})
        self.parent_id = run.info.run_id

    def _child(self, tid: str, config: dict) -> Optional[str]:
        if tid in self.runs:
            return self.runs[tid]

        def find_or_create():
            exp = self._experiment_id()
            found = self.client.search_runs([exp], f"tags.`cts.sweep` = '{self.sweep}' and tags.`cts.trial_id` = '{tid}'")
            if found:
                run_id = found[0].info.run_id
                history = self.client.get_metric_history(run_id, "step")
                self.logged[run_id] = int(max((m.value for m in history), default=0))
                self.client.update_run(run_id, status="RUNNING")
            else:
                cfg = self.resolve(config)
                run = self.client.create_run(exp, run_name=f"{cfg.search.method}-d{cfg.search.density:g}-s{cfg.seed}-{tid}",
                                             tags={"mlflow.parentRunId": self.parent_id, "cts.sweep": self.sweep,
                                                   "cts.trial_id": tid, "cts.role": "trial",
                                                   "cts.config_hash": cfg.hash, "cts.method": cfg.search.method,
                                                   "cts.seed": str(cfg.seed), "cts.code_version": code_version()})
                run_id = run.info.run_id
                from mlflow.entities import Param
                params = [Param(k, (json.dumps(v) if isinstance(v, (list, tuple)) else str(v))[:6000])
                          for k, v in flatten(cfg.to_dict()).items()]
                self.client.log_batch(run_id, params=params)
                self.logged[run_id] = 0
            return run_id

        run_id = self._call("child run", find_or_create)
        if run_id is not None:
            self.runs[tid] = run_id
        return run_id

    # ---- Tune's callbacks (on Tune's thread): copy what the event says and queue it
    def on_trial_start(self, iteration, trials, trial, **info):
        self._later(self._child, trial.trial_id, dict(trial.config))

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
    def _result(self, tid: str, config: dict, result: dict):
        run_id = self._child(tid, config)
        step = int(result.get("step", 0))
        if run_id is None or step <= self.logged.get(run_id, 0):
            return
        phase = result.get("phase")
        if phase == "final":
            metrics = {k: result[k] for k in FINAL_METRICS if isinstance(result.get(k), (int, float))}
            self._call("tags", self.client.set_tag, run_id, "cts.status", result.get("status", ""))
            if result.get("run_dir"):
                self._artifacts(run_id, Path(result["run_dir"]))
        else:
            # the record's own values (the result also carries the ticket's, for Tune's schedulers)
            own = json.loads(result["row"]) if result.get("row") else result
            own = {**own, "objective": own.get("search_objective", own.get("objective"))}
            metrics = {f"{phase}/{k}": own[k] for k in PHASE_METRICS if isinstance(own.get(k), (int, float))}
            if "epoch" in result:
                metrics[f"{phase}/epoch"] = result["epoch"]
        metrics["step"] = step
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self._call("metrics", self.client.log_batch, run_id,
                   metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
        self.logged[run_id] = step

    def _artifacts(self, run_id: str, run_dir: Path):
        for name in ("mask.pt", "layers.json", "summary.json", "config.yaml"):
            if (run_dir / name).exists():
                self._call("artifacts", self.client.log_artifact, run_id, str(run_dir / name))

    def _end(self, tid: str, config: dict, status: str):
        run_id = self._child(tid, config)
        if run_id:
            self._call("end run", self.client.set_terminated, run_id, status)

    def _stopped(self, tid: str, config: dict, phase, epoch):
        run_id = self._child(tid, config)
        if run_id:
            self._call("tags", self.client.set_tag, run_id, "cts.status", "stopped")
            self._call("tags", self.client.set_tag, run_id, "cts.stopped_at", f"{phase} epoch {epoch}")
            self._call("end run", self.client.set_terminated, run_id, "KILLED")

    def _end_parent(self, status: str):
        if self.parent_id:
            self._call("end parent", self.client.set_terminated, self.parent_id, status)
