"""`cts-ray sweep`: start or join Ray, run a sweep's trials through Tune (a new sweep, a resumed
one, or the trials --extend adds), and say where everything went. What --resume and --extend may
do is resume.py's, the summary summary.py's, --dry-run preview.py's."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Optional

from ..config import from_dict
from ..errors import ConfigError
from . import tables
from .adapters import restored_tuner
from .preflight import decode_images
from .resume import check, forgotten, write_record
from .spec import POINT, TUNE_DIR, SweepSpec
from .summary import summarise
from .work import shared_work


def _domain(dist: dict):
    from ray import tune
    kind, args = next(iter(dist.items()))
    return {"uniform": lambda: tune.uniform(*args), "loguniform": lambda: tune.loguniform(*args),
            "randint": lambda: tune.randint(*args), "choice": lambda: tune.choice(args)}[kind]()


def param_space(spec: SweepSpec, points: Optional[list] = None) -> dict:
    """Tune's search space; ``points``: only these grid points (the trials `--extend` adds)."""
    from ray import tune
    if points is not None:
        return {POINT: tune.grid_search(points)}
    space = {k: _domain(d) for k, d in spec.sample.items()}
    for k, values in spec.grid.items():
        space[k] = tune.grid_search(values) if spec.searcher != "optuna" else tune.choice(values)
    return space


def _searcher(spec: SweepSpec):
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator
    if spec.searcher in ("grid", "random"):
        return BasicVariantGenerator(random_state=spec.seed, max_concurrent=spec.max_concurrent or 0)
    import optuna
    from ray.tune.search.optuna import OptunaSearch
    storage = optuna.storages.RDBStorage(optuna_storage(spec))
    search = OptunaSearch(metric=spec.metric, mode=spec.mode, sampler=optuna.samplers.TPESampler(seed=spec.seed),
                          study_name=spec.name, storage=storage, seed=spec.seed)
    return ConcurrencyLimiter(search, max_concurrent=spec.max_concurrent) if spec.max_concurrent else search


def _shared_work_grid(spec: SweepSpec, points: Optional[list]):
    """The dependency-aware grid searcher (schedule.py) where a grid's trials share work, else None."""
    work = shared_work(spec, points)
    if work is None:
        return None
    from .schedule import SharedWorkGrid
    return SharedWorkGrid(work, spec.root.parent / "_cache" / "dense", repeats=spec.num_samples)


@contextlib.contextmanager
def _pending_trials(cfg0):
    """Tune keeps one trial pending for a custom searcher; as many as the cluster has slots lets
    the autoscaler see the demand, while suggestions stay late enough to follow their priority."""
    import ray
    key = "TUNE_MAX_PENDING_TRIALS_PG"
    if key in os.environ:
        yield
        return
    cpus = ray.cluster_resources().get("CPU", 1.0)
    os.environ[key] = str(max(2, int(cpus / max(cfg0.resources.cpus, 1e-4))))
    try:
        yield
    finally:
        os.environ.pop(key, None)


def optuna_storage(spec: SweepSpec) -> str:
    return f"sqlite:///{spec.root / 'optuna.db'}"


def _scheduler(spec: SweepSpec):
    if not spec.scheduler:
        return None
    from ray.tune.schedulers import ASHAScheduler
    opts = spec.scheduler["asha"]
    # ticket_iteration: reported only beside a trial's own ticket metrics (trainable.py)
    return ASHAScheduler(metric=spec.metric, mode=spec.mode, time_attr="ticket_iteration",
                         grace_period=opts.get("grace_period", 1), reduction_factor=opts.get("reduction_factor", 2),
                         max_t=opts.get("max_t", 10_000))


def tracking_uri(spec: SweepSpec) -> str:
    from .mlflow_log import default_tracking_uri
    return spec.mlflow["tracking_uri"] or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(spec.root)


def run_sweep(spec: SweepSpec, *, address: Optional[str] = None, resume: bool = False, extend: bool = False,
              verbose: int = 1) -> dict:
    """Run, resume or extend a sweep, holding its driver lease (lease.py); returns {"summary":
    summarise's, "paths": paths', "errors": trials Tune saw fail in this run, "failed": trials of the
    sweep that failed or diverged (``_failed``), "mlflow_error": why MLflow logging
    stopped or None, "mlflow_experiment": its id, "interrupted": None, or after Ctrl-C/SIGTERM
    {"running": trials recorded as interrupted, "not_started": trials with no row}}.
    ``verbose``: 0 nothing live, 1 the live view (live.py), 2 Tune's own tables."""
    from .lease import take
    with take(spec.root):
        return _run_sweep(spec, address, resume, extend, verbose)


def _run_sweep(spec: SweepSpec, address: Optional[str], resume: bool, extend: bool, verbose: int) -> dict:
    from ray import tune

    from .trainable import spec_state, trial
    _quiet_tune()
    points = check(spec, resume=resume, extend=extend)
    decode_images(spec)   # a damaged image: refused here, once, before Ray starts
    resume = resume and not extend
    if resume and not tune.Tuner.can_restore(str(spec.root / TUNE_DIR)):
        raise ConfigError(f"--resume: no sweep to resume at {str(spec.root / TUNE_DIR)!r}; run it without --resume "
                          "first")
    write_record(spec, resume=resume, added=points)
    logger = _mlflow_logger(spec)
    logger.start()   # overlaps ray.init
    _connect(address, verbose)
    cfg0 = from_dict(spec.trial_raw(spec.grid_points()[0] if spec.grid else {}))
    state = spec_state(spec)
    if resume:
        state["orphans"] = forgotten(spec.root)
        logger.defer = set(state["orphans"])
    trainable = tune.with_resources(tune.with_parameters(trial, spec_state=state),
                                    {"cpu": cfg0.resources.cpus, "gpu": cfg0.resources.gpus})
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from .live import LiveView
    live = LiveView(spec.trial_count() if points is None else len(points) * spec.num_samples, logger.resolve,
                    show=verbose == 1)
    callbacks = [logger, live, JsonLoggerCallback(), CSVLoggerCallback()]
    if resume:
        shared = _shared_work_grid(spec, None)   # what the restored searcher is (the spec is unchanged)
        tuner = restored_tuner(str(spec.root / TUNE_DIR), trainable, callbacks, verbose=_tune_verbose(verbose))
    else:
        tuner, shared = _new_tuner(spec, trainable, callbacks, points, verbose)
    with _Interrupts() as interrupts, _tune_output(verbose):
        grid = _fit(tuner, logger, cfg0 if shared is not None else None)
    running = _record_interrupted(spec, live) if interrupts.count else set()
    _wrap_up(spec, grid, skip=running)
    summary, errors = summarise(spec), sum(1 for r in grid if r.error)
    return {"summary": summary, "paths": paths(spec), "errors": errors, "failed": _failed(summary, errors),
            "mlflow_error": logger.failed, "mlflow_experiment": logger.store.experiment_id,
            "interrupted": _interrupted_counts(spec, running) if interrupts.count else None}


def _failed(summary: dict, errors: int) -> int:
    """Trials of the sweep that failed or diverged: over all its rows (a resumed sweep's earlier
    ones too), or Tune's errors of this run where more (a trial whose worker died writes no row)."""
    return max(sum(r["counts"]["error"] + r["counts"]["diverged"] for r in summary["rows"]), errors)


def _tune_verbose(verbose: int) -> int:
    return 1 if verbose >= 2 else 0   # Tune's tables only when asked for (--verbose)


@contextlib.contextmanager
def _tune_output(verbose: int):
    """Tune's console output off unless ``verbose`` >= 2: its newer engine prints an experiment
    box at verbose 0 still; the older one at 0 prints nothing."""
    key = "RAY_AIR_NEW_OUTPUT"
    before = os.environ.get(key)
    if verbose < 2:
        os.environ[key] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


class _Interrupts:
    """Ctrl-C and SIGTERM during ``tuner.fit`` end the sweep as Tune ends it on SIGUSR1: running
    trials stop, its state is saved, ``fit`` returns; ``count`` says it happened. A second one
    raises KeyboardInterrupt (Tune's cleanup skipped). Tune's own SIGINT handler is kept out (it
    cannot tell anyone it fired), and so are its log lines on it (its hint is Tuner.restore, not
    our command)."""

    def __init__(self):
        self.count, self.saved = 0, {}

    def __enter__(self) -> "_Interrupts":
        import logging
        import signal
        import threading
        if threading.current_thread() is threading.main_thread():
            self.usr1 = signal.getsignal(signal.SIGUSR1)   # Tune sets its own once its loop starts
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.saved[sig] = signal.signal(sig, self._on_signal)
            self.env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        self.tune_log = logging.getLogger("ray.tune.tune")
        self.tune_log.addFilter(self._unless_interrupt)
        return self

    def _on_signal(self, signum, frame) -> None:
        import signal
        self.count += 1
        if self.count > 1 or signal.getsignal(signal.SIGUSR1) is self.usr1:   # or before Tune's loop: nothing runs
            raise KeyboardInterrupt
        signal.raise_signal(signal.SIGUSR1)   # Tune's own stop: trials end, its state is saved

    def _unless_interrupt(self, record) -> bool:
        text = str(record.msg)
        return not (self.count and any(t in text for t in ("interrupted", "Trials did not complete", "Stop signal")))

    def __exit__(self, *exc) -> None:
        import signal
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        if self.saved:
            signal.signal(signal.SIGUSR1, self.usr1)   # Tune leaves its handler of a finished run
            if self.env is None:
                os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
            else:
                os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = self.env
        self.tune_log.removeFilter(self._unless_interrupt)


def _record_interrupted(spec: SweepSpec, live) -> set:
    """A row with status ``interrupted`` for each trial that was running when the driver was
    interrupted; returns their Tune trial ids. Their progress files stay: --resume continues them."""
    from .trainable import write_interrupted
    out = set()
    for trial_id, (status, config, last) in live.trials.items():
        if status not in ("RUNNING", "PAUSED") or trial_id in live.ended:
            continue
        try:
            write_interrupted(spec.root, spec, trial_id, config, last)
        except Exception as e:   # one trial's row: never the reason the others get none
            print(f"cts-ray: recording trial {trial_id} as interrupted failed ({type(e).__name__}: {e})",
                  file=sys.stderr)
        out.add(trial_id)
    return out


def _interrupted_counts(spec: SweepSpec, running: set) -> dict:
    """What an interrupted sweep left: trials recorded as interrupted, and the sweep's trials with
    no row at all (not started)."""
    try:
        rows = len(tables.read(spec.root, "trials", ["trial_id"]))
    except FileNotFoundError:
        rows = 0
    return {"running": len(running), "not_started": max(0, (spec.trial_count() or 0) - rows)}


def _quiet_tune() -> None:
    # trials checkpoint every retraining epoch by design; Tune's warning about it is noise here
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's own loggers but its TensorBoard one, which fsyncs on the driver after every result (about
    # a third of the driver's time per trivial trial); MLflow has the metrics. result.json stays
    # (write_stopped, Tune's analysis read it).
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")


def _mlflow_logger(spec: SweepSpec):
    from .mlflow_log import MLflowLogger
    return MLflowLogger(tracking_uri(spec), spec.mlflow["experiment"], spec.name,
                        {"searcher": spec.searcher, "source": spec.source},
                        resolve=lambda params: from_dict(spec.trial_raw(params)))


def _new_tuner(spec: SweepSpec, trainable, callbacks: list, points: Optional[list], verbose: int):
    """(the Tuner of a new sweep, or of the trials --extend adds; its shared-work searcher or None)."""
    from ray import tune
    run_config = tune.RunConfig(name=TUNE_DIR, storage_path=str(spec.root),
                                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                                callbacks=callbacks, verbose=_tune_verbose(verbose))
    space, search_alg, samples = param_space(spec, points), _searcher(spec), spec.num_samples
    shared = _shared_work_grid(spec, points)
    if shared is not None:   # trials share dense runs or LTR rounds: none may wait for another
        space, search_alg, samples = {}, shared, len(shared.todo)
    tuner = tune.Tuner(trainable, param_space=space,
                       tune_config=tune.TuneConfig(search_alg=search_alg, scheduler=_scheduler(spec),
                                                   num_samples=samples,
                                                   max_concurrent_trials=spec.max_concurrent,
                                                   # a worker keeps torch & data loaded between trials
                                                   reuse_actors=True),
                       run_config=run_config)
    return tuner, shared


def _fit(tuner, logger, cfg0=None):
    """``tuner.fit()``, with the pending trials a shared-work searcher needs when ``cfg0`` (the first
    trial's config) is given; what Tune reported is in MLflow before the summary (or the error) is shown."""
    try:
        with _pending_trials(cfg0) if cfg0 is not None else contextlib.nullcontext():
            return tuner.fit()
    finally:
        logger.flush()


def _wrap_up(spec: SweepSpec, grid, skip: set = frozenset()) -> None:
    """Rows for the trials a scheduler stopped, then the tables compacted. ``skip``: the Tune ids of
    trials an interrupt stopped (they have their rows)."""
    from .trainable import write_stopped
    for result in grid:   # no error and no final report: a scheduler stopped it
        if result.error is None and result.metrics and result.metrics.get("phase") != "final" \
                and result.metrics.get("trial_id") not in skip:
            write_stopped(spec.root, spec, result, next(iter(spec.scheduler or {"the scheduler": 0})))
    try:   # no trial writes now: one file per method and table instead of one per trial
        tables.compact(spec.root)
    except Exception as e:   # the per-trial files are still whole and read as before
        print(f"cts-ray: compacting the tables failed ({type(e).__name__}: {e}); they stay one file per trial",
              file=sys.stderr)


def _connect(address: Optional[str], verbose: int) -> None:
    """Join the cluster at ``address`` (or start a local Ray) unless this process is already in one."""
    import ray
    if ray.is_initialized():
        return
    try:
        ray.init(address=address, log_to_driver=verbose > 2, include_dashboard=False,
                 **({} if address else {"configure_logging": False}))
    except (ConnectionError, RuntimeError) as e:
        # Ray 2.60 sends a token only when RAY_AUTH_MODE=token (or for address auto): turning it on
        # by itself would break clusters without auth, so say what to set.
        if address and "InvalidAuthToken" in _chain_text(e):
            raise ConfigError(f"--address {address}: the cluster has token authentication on and refused this "
                              "client; set RAY_AUTH_MODE=token, with the cluster's token in RAY_AUTH_TOKEN, "
                              "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token") from None
        raise


def _chain_text(e: BaseException) -> str:
    parts = []
    while e is not None and len(parts) < 10:
        parts.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    return "\n".join(parts)


def paths(spec: SweepSpec) -> dict:
    root = spec.root
    out = {"sweep folder": root, "trials table": root / "tables" / "trials",
           "epochs table": root / "tables" / "epochs", "layers table": root / "tables" / "layers",
           "run folders": root / "trials", "tune state": root / TUNE_DIR,
           "mlflow": tracking_uri(spec)}
    if spec.searcher == "optuna":
        out["optuna study"] = f"{optuna_storage(spec)} (study {spec.name!r})"
    return out
