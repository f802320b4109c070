"""`cts-ray sweep`: start or join Ray, run a sweep file through Tune, summarise, and say where
everything went."""
from __future__ import annotations

import json
import os
import statistics
from collections import defaultdict
from typing import Optional

from ..config import ConfigError, from_dict
from . import tables
from .spec import SweepSpec

TUNE_DIR = "tune"


def _domain(dist: dict):
    from ray import tune
    kind, args = next(iter(dist.items()))
    return {"uniform": lambda: tune.uniform(*args), "loguniform": lambda: tune.loguniform(*args),
            "randint": lambda: tune.randint(*args), "choice": lambda: tune.choice(args)}[kind]()


def param_space(spec: SweepSpec) -> dict:
    from ray import tune
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


def optuna_storage(spec: SweepSpec) -> str:
    return f"sqlite:///{spec.root / 'optuna.db'}"


def _scheduler(spec: SweepSpec):
    if not spec.scheduler:
        return None
    from ray.tune.schedulers import ASHAScheduler
    opts = spec.scheduler["asha"]
    return ASHAScheduler(metric=spec.metric, mode=spec.mode, time_attr="training_iteration",
                         grace_period=opts.get("grace_period", 1), reduction_factor=opts.get("reduction_factor", 2),
                         max_t=opts.get("max_t", 10_000))


def tracking_uri(spec: SweepSpec) -> str:
    from .mlflow_log import default_tracking_uri
    return spec.mlflow["tracking_uri"] or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(spec.root)


def run_sweep(spec: SweepSpec, *, address: Optional[str] = None, resume: bool = False, verbose: int = 1) -> dict:
    """Run (or resume) a sweep; returns {"summary": rows, "paths": {...}, "counts": {...}}."""
    import ray
    from ray import tune

    from .mlflow_log import MLflowLogger
    from .trainable import spec_state, trial

    # trials checkpoint every retraining epoch by design; Tune's warning about it is noise here
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    root = spec.root
    tune_path = root / TUNE_DIR
    if resume:
        if not tune.Tuner.can_restore(str(tune_path)):
            raise ConfigError(f"--resume: no sweep to resume at {str(tune_path)!r}; run it without --resume first")
    elif tune_path.exists():
        raise ConfigError(f"name: sweep {spec.name!r} already exists at {str(root)!r}; pass --resume to continue "
                          "it or --name to start another")
    root.mkdir(parents=True, exist_ok=True)
    (root / "sweep.json").write_text(json.dumps({"name": spec.name, "source": spec.source, "base": spec.base,
                                                 "set": spec.set, "grid": spec.grid, "sample": spec.sample,
                                                 "searcher": spec.searcher}, indent=1, default=str))

    logger = MLflowLogger(tracking_uri(spec), spec.mlflow["experiment"], spec.name,
                          {"searcher": spec.searcher, "source": spec.source},
                          resolve=lambda params: from_dict(spec.trial_raw(params)))
    logger.start()   # overlaps ray.init
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=verbose > 1, include_dashboard=False,
                 **({} if address else {"configure_logging": False}))
    cfg0 = from_dict(spec.trial_raw(spec.grid_points()[0] if spec.grid else {}))
    resources = {"cpu": cfg0.resources.cpus, "gpu": cfg0.resources.gpus}
    trainable = tune.with_resources(tune.with_parameters(trial, spec_state=spec_state(spec)), resources)
    run_config = tune.RunConfig(name=TUNE_DIR, storage_path=str(root),
                                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                                # two kept: Tune's state snapshot may lag one checkpoint behind,
                                # and a killed driver must find the one it names (resume)
                                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                callbacks=[logger], verbose=verbose)
    if resume:
        tuner = tune.Tuner.restore(str(tune_path), trainable, resume_unfinished=True, resume_errored=True)
        tuner._local_tuner.get_run_config().callbacks = [logger]   # restore drops callbacks (ECOSYSTEM.md)
    else:
        tuner = tune.Tuner(trainable, param_space=param_space(spec),
                           tune_config=tune.TuneConfig(search_alg=_searcher(spec), scheduler=_scheduler(spec),
                                                       num_samples=spec.num_samples,
                                                       max_concurrent_trials=spec.max_concurrent,
                                                       # a worker keeps torch & data loaded between trials
                                                       reuse_actors=True),
                           run_config=run_config)
    try:
        grid = tuner.fit()
    finally:
        logger.flush()   # what Tune reported is in MLflow before the summary (or the error) is shown
    return {"summary": summarise(root), "paths": paths(spec), "errors": sum(1 for r in grid if r.error),
            "mlflow_error": logger.failed, "mlflow_experiment": logger.store.experiment_id}


def paths(spec: SweepSpec) -> dict:
    root = spec.root
    out = {"sweep folder": root, "trials table": root / "tables" / "trials",
           "epochs table": root / "tables" / "epochs", "layers table": root / "tables" / "layers",
           "run folders": root / "trials", "tune state": root / TUNE_DIR,
           "mlflow": tracking_uri(spec)}
    if spec.searcher == "optuna":
        out["optuna study"] = f"{optuna_storage(spec)} (study {spec.name!r})"
    return out


def summarise(root) -> list[dict]:
    """method × density: accuracy mean ± std over seeds (finished trials), with counts."""
    try:
        t = tables.read(root, "trials").to_pylist()
    except FileNotFoundError:
        return []
    groups = defaultdict(list)
    status = defaultdict(lambda: defaultdict(int))
    reasons = defaultdict(list)
    for r in t:
        key = (r["method"], r["target_density"])
        status[key][r["status"]] += 1
        if r["status"] != "finished":
            reasons[key].append(f"{r['status']}: trial {r['trial_id']} (seed {r['seed']}): {r['error']}")
        if r["status"] == "finished" and r["test_accuracy"] is not None:
            groups[key].append(r["test_accuracy"])
    rows = []
    for key in sorted(status, key=lambda k: (k[0], -k[1])):
        accs = groups.get(key, [])
        rows.append({"method": key[0], "density": key[1], "trials": sum(status[key].values()),
                     "finished": len(accs), "mean": statistics.mean(accs) if accs else None,
                     "std": statistics.stdev(accs) if len(accs) > 1 else (0.0 if accs else None),
                     "other": {k: v for k, v in status[key].items() if k != "finished"},
                     "reasons": reasons.get(key, [])})
    return rows


def format_summary(rows: list[dict]) -> str:
    lines = [f"{'method':<12} {'density':>9} {'trials':>6}  {'test accuracy (mean ± std over seeds)':<38}"]
    for r in rows:
        acc = "-" if r["mean"] is None else f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f} %"
        other = ", ".join(f"{v} {k}" for k, v in r["other"].items())
        lines.append(f"{r['method']:<12} {r['density']:>9.4g} {r['trials']:>6}  {acc:<38}{other}")
    reasons = [why for r in rows for why in r.get("reasons", [])]
    if reasons:
        lines += ["", "not finished:"] + [f"  {why}" for why in reasons]
    return "\n".join(lines)
