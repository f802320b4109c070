"""`cts-ray sweep`: start or join Ray, run a sweep's trials through Tune (a new sweep, a resumed
one, or the trials --extend adds), and say where everything went. What --resume and --extend may
do is resume.py's, the summary summary.py's, --dry-run preview.py's."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from .. import storage
from ..config import from_dict
from ..errors import ConfigError, StorageError
from . import tables
from .adapters import restored_tuner
from .interrupts import Interrupts, interrupted_counts, record_interrupted
from .preflight import decode_images
from .resume import (INTERRUPTED, afresh, check, claimable, forgotten, missing, points_of, reruns, restorable,
                     rows, set_aside, settle_study, write_record)
from .spec import POINT, TUNE_DIR, SweepSpec
from .summary import summarise
from .work import shared_work

LOGGER_SETTLE_S = 10   # a failed start waits this long at most for MLflow's first calls to finish


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


def _searcher(spec: SweepSpec, seed: Optional[int] = None, grid: bool = False):
    """The spec's searcher, seeded with ``seed`` (default the spec's); ``grid``: Tune's grid over
    given points whatever the spec's searcher (--extend, or the trials a resume still needs)."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator
    seed = spec.seed if seed is None else seed
    if grid or spec.searcher in ("grid", "random"):
        return BasicVariantGenerator(random_state=seed, max_concurrent=spec.max_concurrent or 0)
    import optuna
    from ray.tune.search.optuna import OptunaSearch
    storage = optuna.storages.RDBStorage(optuna_storage(spec))
    search = OptunaSearch(metric=spec.metric, mode=spec.mode, sampler=optuna.samplers.TPESampler(seed=seed),
                          study_name=spec.name, storage=storage, seed=seed)
    return ConcurrencyLimiter(search, max_concurrent=spec.max_concurrent) if spec.max_concurrent else search


def _shared_work_grid(spec: SweepSpec, points: Optional[list], repeats: Optional[int] = None):
    """The dependency-aware grid searcher (schedule.py) where a grid's trials share work, else None."""
    work = shared_work(spec, points)
    if work is None:
        return None
    from .schedule import SharedWorkGrid
    return SharedWorkGrid(work, spec.root.parent / "_cache" / "dense",
                          repeats=spec.num_samples if repeats is None else repeats)


@contextlib.contextmanager
def _pending_trials(cfg0):
    """Tune keeps one trial pending for a custom searcher; as many as the cluster has slots lets
    the autoscaler see the demand, while suggestions stay late enough to follow their priority."""
    import ray
    key = "TUNE_MAX_PENDING_TRIALS_PG"
    if key in os.environ:
        yield
        return
    from .trainable import trial_cpus
    cpus = ray.cluster_resources().get("CPU", 1.0)
    os.environ[key] = str(max(2, int(cpus / max(trial_cpus(cfg0), 1e-4))))
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
              retry: tuple = (), verbose: int = 1) -> dict:
    """Run, resume or extend a sweep, holding its driver lease (lease.py); returns {"summary":
    summarise's, "paths": paths', "errors": trials Tune saw fail in this run, "failed": trials of the
    sweep that failed or diverged (``_failed``), "mlflow_error": why MLflow logging
    stopped or None, "mlflow_experiment": its id, "interrupted": None, or after Ctrl-C/SIGTERM
    {"running": trials recorded as interrupted, "not_started": trials with no row}}.
    ``retry``: with ``resume``, the row statuses whose trials run again (resume.RETRY_FAILED ...).
    ``verbose``: 0 nothing live, 1 the live view (live.py), 2 Tune's own tables."""
    from .lease import take
    with take(spec.root):
        return _run_sweep(spec, address, resume, extend, retry, verbose)


@dataclass
class _Session:
    """What every Tuner of one `cts-ray sweep` command shares."""
    spec: SweepSpec
    logger: Any          # mlflow_log.MLflowLogger
    live: Any            # live.LiveView
    interrupts: Interrupts
    cfg0: Any            # the first trial's Config (resources; shared-work pending trials)
    verbose: int
    guard: Any           # guard.StorageGuard: a storage fault in any of the command's Tuners ends it
    interrupted: set = field(default_factory=set)   # Tune ids of the trials recorded as interrupted

    def callbacks(self) -> list:
        """Tune's callbacks for one Tuner: our MLflow logger, live view and storage guard (shared by the
        Tuners of one command) and new instances of Tune's file loggers."""
        from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
        return [self.logger, self.live, self.guard, JsonLoggerCallback(), CSVLoggerCallback()]


def _run_sweep(spec: SweepSpec, address: Optional[str], resume: bool, extend: bool, retry: tuple,
               verbose: int) -> dict:
    from .live import LiveView
    from .trainable import spec_state
    _quiet_tune()
    points = check(spec, resume=resume, extend=extend, retry=retry)
    decode_images(spec)   # a damaged image: refused here, once, before Ray starts
    resume = resume and not extend
    started = time.time()
    write_record(spec, resume=resume, added=points)
    retried = afresh(rows(spec.root), retry)
    logger = _mlflow_logger(spec)
    logger.fresh = set(retried)
    logger.start()   # overlaps ray.init
    try:
        _connect(address, verbose)
        cfg0 = _first_config(spec)
        spec = dataclasses.replace(spec, max_concurrent=max_concurrent(spec, cfg0))
    except Exception:   # the store's own lines (e.g. creating its tables) before the error, not after it
        logger.flush(timeout=LOGGER_SETTLE_S)
        raise
    live = LiveView(spec.trial_count() if points is None else len(points) * spec.num_samples, logger.resolve,
                    show=verbose == 1)
    with Interrupts() as interrupts, _tune_output(verbose):
        from .guard import StorageGuard
        run = _Session(spec, logger, live, interrupts, cfg0, verbose, StorageGuard(spec.root))
        if resume:
            grids = _resume(run, retried, (INTERRUPTED, *retry), started)
        else:
            tuner, shared = _new_tuner(spec, _trainable(spec_state(spec), cfg0), run.callbacks(), points, verbose,
                                       stop=run.guard, reuse=_one_process(cfg0))
            grids = [_fit(run, tuner, shared)]
    _compact(spec)
    summary, errors = summarise(spec, _tune_errors(spec, grids)), sum(1 for g in grids for r in g if r.error)
    return {"summary": summary, "paths": paths(spec), "errors": errors, "failed": _failed(summary, errors),
            "mlflow_error": logger.failed, "mlflow_experiment": logger.store.experiment_id,
            "interrupted": interrupted_counts(spec, run.interrupted) if interrupts.count else None}


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


def _tune_errors(spec: SweepSpec, grids: list) -> dict:
    """{config hash: why} of the trials Tune failed: what the summary says of a point left with no row."""
    out = {}
    for result in (r for g in grids for r in g if r.error):
        first = (str(result.error).strip().splitlines() or [""])[-1][:200]
        out[from_dict(spec.trial_raw(result.config)).hash] = f"its trial failed before it wrote a row ({first})"
    return out


def _trainable(state: dict, cfg0):
    from ray import tune

    from .trainable import trial, tune_resources
    return tune.with_resources(tune.with_parameters(trial, spec_state=state), tune_resources(cfg0))


def max_concurrent(spec: SweepSpec, cfg0) -> Optional[int]:
    """The sweep's ``max_concurrent``; for trials of several workers with none set, the trials whose
    worker groups the cluster holds now (at least 1). Such a trial's own process reserves a sliver
    of a CPU (trainable.tune_resources), so Tune would otherwise start every trial at once, each
    waiting for its workers. An autoscaling cluster grows only to what the running trials ask for:
    set ``max_concurrent`` there to what it may grow to."""
    r = cfg0.resources
    if spec.max_concurrent is not None or r.workers == 1:
        return spec.max_concurrent
    import ray

    from .trainable import trial_cpus
    have = ray.cluster_resources()
    fits = [have.get("CPU", 0.0) / trial_cpus(cfg0)] + ([have.get("GPU", 0.0) / (r.gpus * r.workers)] if r.gpus else [])
    return max(1, int(min(fits) + 1e-9))


def _resume(run: _Session, retried: list, again: tuple, started: float) -> list:
    """--resume: Tune's saved state restored and run where it reads whole; then the trials it did not
    account for (``_account``). Returns the Tuners' result grids."""
    from ray import tune

    from .trainable import forget_progress, spec_state
    spec, logger, root = run.spec, run.logger, run.spec.root
    forget_progress(root, retried)   # a retried trial runs afresh
    have = rows(root)
    state = spec_state(spec, rerun={r["trial_id"] for r in reruns(have, again, started)}, resumed=True)
    # a trial of these configs may go on as another: its MLflow run is found at its first result
    logger.defer = {r["config_hash"] for r in have}
    grids = []
    if tune.Tuner.can_restore(str(root / TUNE_DIR)) and restorable(root / TUNE_DIR):
        state["orphans"] = forgotten(root)
        logger.defer |= set(state["orphans"])
        try:
            tuner = restored_tuner(str(root / TUNE_DIR), _trainable(state, run.cfg0), run.callbacks(),
                                   verbose=_tune_verbose(run.verbose), stop=run.guard)
            grids.append(_fit(run, tuner, _shared_work_grid(spec, None)))
        except StorageError:   # the storage's, not Tune's state's: the sweep stops on it
            raise
        except Exception as e:   # Tune's own state broke it (not a trial: their errors are in the grid)
            print(f"cts-ray: Tune could not resume its saved state ({type(e).__name__}: {str(e)[:200]}); running "
                  "the trials without a row afresh", file=sys.stderr)
    elif (root / TUNE_DIR).exists():
        print(f"cts-ray: Tune's saved state in {root / TUNE_DIR} is missing or damaged; running the trials without "
              "a row afresh", file=sys.stderr)
    if not run.interrupts.count:   # interrupted: the next --resume accounts for the rest
        grids += _account(run, state, again, started)
    logger.settle(rows(root))
    if spec.searcher == "optuna":
        try:
            settle_study(spec, optuna_storage(spec))
        except Exception as e:   # bookkeeping of the study only: the trials and their rows stand
            print(f"cts-ray: settling the Optuna study failed ({type(e).__name__}: {e})", file=sys.stderr)
    return grids


def _account(run: _Session, state: dict, again: tuple, started: float) -> list:
    """After what Tune restored has run: every point of the recorded grid (× num_samples) without
    a row runs now, as do the rows this resume runs again (``again``) that are still old, under
    their own ids. Each in a new Tune experiment (the old one kept as tune.N), as --extend does."""
    spec, root = run.spec, run.spec.root
    have = rows(root)
    redo = reruns(have, again, started)
    todo = missing(spec, have)
    points = points_of(spec, redo) + [p for p in todo if p is not None]
    sampled = sum(1 for p in todo if p is None)   # a random or Optuna sweep's trials still to sample
    state = {**state, "orphans": claimable(root, redo),
             "rerun": state["rerun"] | {r["trial_id"] for r in redo}}
    run.logger.defer |= set(state["orphans"])
    grids = []
    for batch, repeats in ([(points, 1)] if points else []) + ([(None, sampled)] if sampled else []):
        if run.interrupts.count:
            break
        set_aside(root)
        seed = spec.seed + sum(1 for _ in root.glob(f"{TUNE_DIR}.*"))   # new samples, not the first run's again
        tuner, shared = _new_tuner(spec, _trainable(state, run.cfg0), run.callbacks(), batch, run.verbose,
                                   repeats=repeats, searcher_seed=seed, stop=run.guard, reuse=_one_process(run.cfg0))
        grids.append(_fit(run, tuner, shared))
    return grids


def _quiet_tune() -> None:
    # trials checkpoint every retraining epoch by design; Tune's warning about it is noise here
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's own loggers but its TensorBoard one, which fsyncs on the driver after every result (about
    # a third of the driver's time per trivial trial); MLflow has the metrics. result.json stays
    # (write_stopped, Tune's analysis read it).
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # a failed trial is one line in the summary (its row's error), not Tune's traceback on the console
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    # the errors of trials Tune stopped and never asked for (a storage fault's): the summary has them
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")


def _mlflow_logger(spec: SweepSpec):
    from .mlflow_log import MLflowLogger
    return MLflowLogger(tracking_uri(spec), spec.mlflow["experiment"], spec.name,
                        {"searcher": spec.searcher, "source": spec.source},
                        resolve=lambda params: from_dict(spec.trial_raw(params)))


def _new_tuner(spec: SweepSpec, trainable, callbacks: list, points: Optional[list], verbose: int,
               repeats: Optional[int] = None, searcher_seed: Optional[int] = None, stop=None, reuse: bool = True):
    """(the Tuner of a new sweep, of the trials --extend adds, or of those a resume still needs;
    its shared-work searcher or None). ``repeats``: Tune's num_samples instead of the spec's (a
    resume's points, each listed once per missing repeat: 1); ``searcher_seed``: instead of the spec's;
    ``stop``: the StorageGuard; ``reuse``: Tune's reuse_actors (``_one_process``)."""
    from ray import tune
    run_config = tune.RunConfig(name=TUNE_DIR, storage_path=str(spec.root),
                                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                                callbacks=callbacks, stop=stop, verbose=_tune_verbose(verbose))
    samples = spec.num_samples if repeats is None else repeats
    space, search_alg = param_space(spec, points), _searcher(spec, searcher_seed, grid=points is not None)
    shared = _shared_work_grid(spec, points, samples)
    if shared is not None:   # trials share dense runs or LTR rounds: none may wait for another
        space, search_alg, samples = {}, shared, len(shared.todo)
    from ray.tune.search import ConcurrencyLimiter, Searcher
    # the grid's generator and Optuna's limiter hold the limit already (Tune would warn that it
    # ignores max_concurrent_trials); Tune puts a plain Searcher (the shared-work grid) in a limiter
    limit = spec.max_concurrent if isinstance(search_alg, Searcher) and \
        not isinstance(search_alg, ConcurrencyLimiter) else None
    tuner = tune.Tuner(trainable, param_space=space,
                       tune_config=tune.TuneConfig(search_alg=search_alg, scheduler=_scheduler(spec),
                                                   num_samples=samples, max_concurrent_trials=limit,
                                                   # a worker keeps torch & data loaded between trials; a
                                                   # trial of Ray Train workers must take them with it
                                                   # when it ends (adapters.fit_relaying_reports)
                                                   reuse_actors=reuse),
                       run_config=run_config)
    return tuner, shared


def _first_config(spec: SweepSpec):
    """The first trial's Config: its resources are every trial's (spec.py refuses sweeping workers)."""
    return from_dict(spec.trial_raw(spec.grid_points()[0] if spec.grid else {}))


def _one_process(cfg0) -> bool:
    """Whether the sweep's trials each run in their own process (``resources.workers``: 1)."""
    return cfg0.resources.workers == 1


def _fit(run: _Session, tuner, shared=None):
    """``tuner.fit()``, with the pending trials a shared-work searcher (``shared``) needs; what Tune
    reported is in MLflow before the summary (or the error) is shown. Then the rows of the trials an
    interrupt caught (``interrupted``) and of those a scheduler stopped, from Tune's result files
    (before a resume may set its experiment aside). A storage fault raises its one-line StorageError
    instead, whatever Tune raised or returned on it (the trials its stop left without a row are a
    resume's to run)."""
    from .trainable import write_stopped
    begun, guard = int(time.time()), run.guard
    try:
        with _pending_trials(run.cfg0) if shared is not None else contextlib.nullcontext():
            grid = tuner.fit()
    except Exception as e:   # e.g. Tune's own EOFError reading a trial's error file the full disk cut short
        fault = guard.fault or storage.classify(e, guard.root) or storage.probe(guard.root)
        if fault is None:
            raise
        raise fault from None
    finally:
        run.logger.flush()
        guard.teardown()
    if guard.fault is not None:
        raise guard.fault
    if run.interrupts.count:
        run.interrupted |= record_interrupted(run.spec, run.live)
    for result in grid:   # no error and no final report: a scheduler stopped it, in this fit (a restored
        # trial's stop, e.g. a storage fault's, is not a scheduler's; its row, if any, was written then)
        if result.error is None and result.metrics and result.metrics.get("phase") != "final" \
                and result.metrics.get("trial_id") not in run.interrupted \
                and result.metrics.get("timestamp", begun) >= begun:
            write_stopped(run.spec.root, run.spec, result, next(iter(run.spec.scheduler or {"the scheduler": 0})))
    return grid


def _compact(spec: SweepSpec) -> None:
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
