"""`cts-ray sweep`: start or join Ray, run a sweep file through Tune, summarise, and say where
everything went."""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional

from ..config import ConfigError, from_dict
from . import tables
from .spec import POINT, SweepSpec, changes

TUNE_DIR = "tune"


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


SHARED_WORK = True   # False: Tune's own grid order even where trials share work (bench/slots.py compares)


def _shared_work(spec: SweepSpec, points: Optional[list] = None) -> Optional[list]:
    """The grid's work (work.plan) where its trials share some, else None: when the shared-work
    searcher is used. No Ray."""
    if not SHARED_WORK or spec.searcher != "grid" or spec.sample:
        return None
    from .work import plan, shares_work
    work = plan(spec, points if points is not None else spec.grid_points() or [{}])
    return work if shares_work(work) else None


def _shared_work_grid(spec: SweepSpec, points: Optional[list]):
    """The dependency-aware grid searcher (schedule.py) where a grid's trials share work, else None."""
    work = _shared_work(spec, points)
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


def check(spec: SweepSpec, *, resume: bool = False, extend: bool = False) -> Optional[list]:
    """Refuse, before Ray starts, a run that would not do what sweep.json says: a new sweep over an
    existing one, a --resume with other settings. With ``extend``: the grid points to add."""
    root, stored_path = spec.root, spec.root / "sweep.json"
    exists = (root / TUNE_DIR).exists()
    if not (resume or extend):
        if exists:
            raise ConfigError(f"name: sweep {spec.name!r} already exists at {str(root)!r}; pass --resume to continue "
                              "it or --name to start another")
        return None
    if not exists:
        flag = "--extend" if extend else "--resume"
        raise ConfigError(f"{flag}: no sweep to continue at {str(root / TUNE_DIR)!r}; run it without {flag} first")
    stored = json.loads(stored_path.read_text()) if stored_path.exists() else {}
    diff = changes(stored, spec.record())
    if not extend:
        if diff:
            raise ConfigError(f"--resume: sweep {spec.name!r} ran with other settings ({'; '.join(diff)}); resume it "
                              "unchanged, start a new sweep with --name NEW, or add grid values with --extend")
        return None
    others = [d for d in diff if not d.startswith("grid.")]
    if others or spec.searcher != "grid" or set(stored.get("grid", {})) != set(spec.grid):
        why = "; ".join(others) or "the grid's keys or the searcher changed"
        raise ConfigError(f"--extend: only adds values to an existing grid key of a grid sweep; {why}; "
                          "start a new sweep with --name NEW")
    old = SweepSpec(name=spec.name, base=spec.base, grid=stored["grid"])
    done = {json.dumps(p, sort_keys=True) for p in old.grid_points()}
    gone = done - {json.dumps(p, sort_keys=True) for p in spec.grid_points()}
    if gone:
        raise ConfigError(f"--extend: only adds grid values; {'; '.join(diff)} drops trials that ran; "
                          "keep every value")
    points = [p for p in spec.grid_points() if json.dumps(p, sort_keys=True) not in done]
    if not points:
        raise ConfigError(f"--extend: the grid adds no trials to sweep {spec.name!r}; add values to a grid key")
    rows = len(tables.read(root, "trials", ["trial_id"])) if (root / "tables" / "trials").is_dir() else 0
    if rows < len(done) * spec.num_samples:
        raise ConfigError(f"--extend: sweep {spec.name!r} has unfinished trials ({rows} of "
                          f"{len(done) * spec.num_samples} done); finish them first with --resume")
    return points


def run_sweep(spec: SweepSpec, *, address: Optional[str] = None, resume: bool = False, extend: bool = False,
              verbose: int = 1) -> dict:
    """Run, resume or extend a sweep; returns {"summary": rows, "paths": {...}, "counts": {...}}."""
    import ray
    from ray import tune

    from .mlflow_log import MLflowLogger
    from .trainable import spec_state, trial, write_stopped

    # trials checkpoint every retraining epoch by design; Tune's warning about it is noise here
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's own loggers but its TensorBoard one, which fsyncs on the driver after every result (about
    # a third of the driver's time per trivial trial); MLflow has the metrics. result.json stays
    # (write_stopped, Tune's analysis read it).
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    root = spec.root
    tune_path = root / TUNE_DIR
    points = check(spec, resume=resume, extend=extend)
    resume = resume and not extend
    if resume and not tune.Tuner.can_restore(str(tune_path)):
        raise ConfigError(f"--resume: no sweep to resume at {str(tune_path)!r}; run it without --resume first")
    root.mkdir(parents=True, exist_ok=True)
    record = spec.record()
    if extend:   # the finished experiment is kept aside; a new one runs only the added trials
        stored = json.loads((root / "sweep.json").read_text())
        record["extended"] = stored.get("extended", []) + [{"grid": stored["grid"], "added": len(points)}]
        n = 1 + sum(1 for p in root.glob(f"{TUNE_DIR}.*"))
        tune_path.rename(root / f"{TUNE_DIR}.{n}")
    elif resume and (root / "sweep.json").exists():
        record["extended"] = json.loads((root / "sweep.json").read_text()).get("extended", [])
    (root / "sweep.json").write_text(json.dumps(record, indent=1))

    logger = MLflowLogger(tracking_uri(spec), spec.mlflow["experiment"], spec.name,
                          {"searcher": spec.searcher, "source": spec.source},
                          resolve=lambda params: from_dict(spec.trial_raw(params)))
    logger.start()   # overlaps ray.init
    if not ray.is_initialized():
        _connect(address, verbose)
    cfg0 = from_dict(spec.trial_raw(spec.grid_points()[0] if spec.grid else {}))
    resources = {"cpu": cfg0.resources.cpus, "gpu": cfg0.resources.gpus}
    state = spec_state(spec)
    if resume:
        try:
            state["orphans"] = orphans(root)
        except Exception as e:   # e.g. a Tune whose snapshot reads otherwise: resuming still works
            print(f"cts-ray: finding trials Tune's state forgot failed ({type(e).__name__}: {e}); trials that "
                  "ended after its last snapshot may run again", file=sys.stderr)
            state["orphans"] = {}
        logger.defer = set(state["orphans"])
    trainable = tune.with_resources(tune.with_parameters(trial, spec_state=state), resources)
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    callbacks = [logger, JsonLoggerCallback(), CSVLoggerCallback()]
    run_config = tune.RunConfig(name=TUNE_DIR, storage_path=str(root),
                                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                                callbacks=callbacks, verbose=verbose)
    shared = None
    if resume:
        shared = _shared_work_grid(spec, None)   # what the restored searcher is (the spec is unchanged)
        tuner = tune.Tuner.restore(str(tune_path), trainable, resume_unfinished=True, resume_errored=True)
        tuner._local_tuner.get_run_config().callbacks = callbacks   # restore drops callbacks (ECOSYSTEM.md)
    else:
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
    try:
        with _pending_trials(cfg0) if shared is not None else contextlib.nullcontext():
            grid = tuner.fit()
    finally:
        logger.flush()   # what Tune reported is in MLflow before the summary (or the error) is shown
    for result in grid:   # no error and no final report: a scheduler stopped it
        if result.error is None and result.metrics and result.metrics.get("phase") != "final":
            write_stopped(root, spec, result, next(iter(spec.scheduler or {"the scheduler": 0})))
    try:   # no trial writes now: one file per method and table instead of one per trial
        tables.compact(root)
    except Exception as e:   # the per-trial files are still whole and read as before
        print(f"cts-ray: compacting the tables failed ({type(e).__name__}: {e}); they stay one file per trial",
              file=sys.stderr)
    return {"summary": summarise(spec), "paths": paths(spec), "errors": sum(1 for r in grid if r.error),
            "mlflow_error": logger.failed, "mlflow_experiment": logger.store.experiment_id}


def orphans(root) -> dict:
    """Trials of the sweep at ``root`` that the Tune state about to be restored does not know:
    created after its last snapshot (Tune takes one every 10 s or more), they finished, failed or
    saved progress before the driver died. Tune creates their points again under new trial ids;
    such a trial adopts one of these (trainable.adopt) and goes on as it, so no point runs twice
    or gets two rows. Returns {config hash: [{trial_id, status, steps, final numbers}]}."""
    from ..records import REPORTED
    known = set()
    for d in [root / TUNE_DIR, *sorted(root.glob(f"{TUNE_DIR}.*"))]:   # --extend keeps older ones aside
        known |= tune_trial_ids(d)
    for claim in (root / "adopted").glob("*"):   # claimed by a trial Tune forgot as well: void
        if claim.read_text() not in known:
            claim.unlink()
    skip = known | {c.name for c in (root / "adopted").glob("*")}
    out = defaultdict(list)
    rows = [r for r in _rows(root, "trials") if r["trial_id"] not in skip]
    if rows:
        steps = defaultdict(int)   # a finished trial's records, so its final report's step is the one it had
        for r in _rows(root, "epochs", ["trial_id"]):
            steps[r["trial_id"]] += 1
        for r in rows:
            out[r["config_hash"]].append({"trial_id": r["trial_id"], "steps": steps[r["trial_id"]],
                                          **{k: r[k] for k in REPORTED}})
    with_rows = {r["trial_id"] for r in rows}
    for p in sorted((root / "progress").glob("*.json")):   # started, no row yet
        if p.stem not in skip and p.stem not in with_rows:
            out[json.loads(p.read_text())["config_hash"]].append({"trial_id": p.stem, "status": None})
    return dict(out)


def tune_trial_ids(path) -> set:
    """The trial ids in a Tune experiment folder's newest state snapshot, the one Tuner.restore
    loads (read directly: ray.tune.ExperimentAnalysis would also parse every trial's results)."""
    snapshots = sorted(Path(path).glob("experiment_state-*.json"))   # named by time: the last is newest
    if not snapshots:
        return set()
    return {json.loads(trial)["trial_id"] for trial, _ in json.loads(snapshots[-1].read_text())["trial_data"]}


def _rows(root, table: str, columns=None) -> list:
    try:
        return tables.read(root, table, columns).to_pylist()
    except FileNotFoundError:
        return []


def _connect(address: Optional[str], verbose: int) -> None:
    import ray
    try:
        ray.init(address=address, log_to_driver=verbose > 1, include_dashboard=False,
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


STATUSES = ("finished", "stopped", "diverged", "error")


def summarise(spec: SweepSpec) -> dict:
    """One row per setting: the swept values other than the seed (a knob that does not apply to a
    method is '–' for it), with trial counts per status, the accuracy of its finished trials, their
    mean effective density (kept weights on an input→output path) and how many have a collapsed layer.
    Random and Optuna sweeps (every trial its own setting) also get their best trials."""
    from ..config import flatten, stable_hash
    from ..methods import applies, effective
    try:
        t = tables.read(spec.root, "trials").to_pylist()
    except FileNotFoundError:
        return {"keys": [], "rows": [], "best": None, "reasons": []}
    keys = [k for k in {**spec.grid, **spec.sample} if k not in ("seed", "search.method", "search.density")]
    groups = defaultdict(list)
    for r in t:
        flat = flatten(json.loads(r["config"]))
        r["values"] = {k: flat.get(k) if applies(r["method"], k) else None for k in keys}
        r["experiment"] = stable_hash(effective(flat))
        groups[(r["method"], r["target_density"], json.dumps([r["values"][k] for k in keys]))].append(r)
    rows = []
    for (method, density, _), g in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1], kv[0][2])):
        # the same experiment twice (a knob that does not apply, swept) counts once
        done = {r["experiment"]: r for r in g if r["status"] == "finished" and r["test_accuracy"] is not None}
        accs = [r["test_accuracy"] for r in done.values()]
        rows.append({"method": method, "density": density, "values": g[0]["values"],
                     "counts": {st: sum(r["status"] == st for r in g) for st in STATUSES},
                     "seeds": sorted({r["seed"] for r in g if r["status"] == "finished"}), "n": len(accs),
                     "repeats": sum(r["status"] == "finished" for r in g) - len(done),
                     "mean": statistics.mean(accs) if accs else None,
                     "std": statistics.stdev(accs) if len(accs) > 1 else None,
                     "effective": statistics.mean(eff) if (eff := [r["effective_density"] for r in done.values()
                                                                    if r.get("effective_density") is not None]) else None,
                     "collapsed": sum(1 for r in done.values() if r.get("collapsed"))})
    best = None
    if spec.searcher != "grid":
        metric, mode = (spec.metric, spec.mode) if isinstance(spec.metric, str) else (spec.metric[0], spec.mode[0])
        done = [r for r in t if r["status"] == "finished" and r[metric] is not None]
        best = {"metric": metric, "mode": mode, "trials": sorted(done, key=lambda r: r[metric],
                                                                 reverse=mode == "max")[:5]}
    reasons = [f"{r['status']}: trial {r['trial_id']} (seed {r['seed']}): {r['error']}"
               for r in sorted(t, key=lambda r: r["trial_id"]) if r["status"] != "finished"]
    return {"keys": keys, "rows": rows, "best": best, "reasons": reasons}


def _value(v) -> str:
    return "–" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def format_summary(summary: dict) -> str:
    keys = summary["keys"]
    short = [k.removeprefix("search.") for k in keys]
    head = ["method", "density", *short, "finished", "stopped", "diverged", "failed", "seeds", "effective",
            "test accuracy (mean ± std of finished trials)"]
    table = [head]
    for r in summary["rows"]:
        acc = "-" if r["mean"] is None else f"{100 * r['mean']:.2f}" + \
            (f" ± {100 * r['std']:.2f} %" if r["std"] is not None else " %  (one trial: no std)")
        c = r["counts"]
        table.append([r["method"], _value(r["density"]), *(_value(r["values"][k]) for k in keys),
                      str(c["finished"]), str(c["stopped"]), str(c["diverged"]), str(c["error"]),
                      ",".join(map(str, r["seeds"])) or "-",
                      "-" if r["effective"] is None else f"{r['effective']:.4g}", acc])
    widths = [max(len(row[i]) for row in table) for i in range(len(head) - 1)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(row[:-1], widths)) + "  " + row[-1] for row in table]
    collapsed = [r for r in summary["rows"] if r["collapsed"]]
    if collapsed:
        lines += ["", "collapsed (a prunable layer with no weight on an input→output path): " + "; ".join(
            f"{r['method']} at density {_value(r['density'])}: {r['collapsed']} ticket(s)" for r in collapsed)]
    repeats = [r for r in summary["rows"] if r["repeats"]]
    if repeats:
        lines += ["", "counted once: " + "; ".join(
            f"{r['method']} at density {_value(r['density'])}: {r['repeats']} trial(s) repeat an identical experiment "
            f"(a swept knob that does not apply to {r['method']})" for r in repeats)]
    if summary["best"]:
        b = summary["best"]
        lines += ["", f"best trials by {b['metric']} ({b['mode']}):"]
        for r in b["trials"]:
            values = ", ".join(f"{k.removeprefix('search.')}={_value(r['values'][k])}" for k in keys)
            lines.append(f"  {r['trial_id']}  {100 * r[b['metric']] if 'accuracy' in b['metric'] else r[b['metric']]:.4g}"
                         f"  {r['method']} density {_value(r['target_density'])} seed {r['seed']}"
                         + (f"  {values}" if values else ""))
    if summary["reasons"]:
        lines += ["", "not finished:"] + [f"  {why}" for why in summary["reasons"]]
    return "\n".join(lines)


LIST_AT_MOST = 40   # a dry run lists the trials of sweeps up to this size, else their count and axes


def preview(spec: SweepSpec) -> str:
    """What ``cts-ray sweep FILE --dry-run`` prints: the trials, the dense runs and LTR rounds they
    share, and the compute in epochs. Builds configs only: no Ray, no files."""
    from ..cache import DenseCache, dense_until
    from ..methods import METHODS, rounds_for
    from .spec import _sample_probes
    points = spec.grid_points() if spec.grid else [{}]
    probes = [{}]
    for key, dist in spec.sample.items():   # random/optuna: the edges of each distribution stand in
        probes = [{**p, key: v} for p in probes for v in _sample_probes(dist)][:64]
    per_sample = [{**pt, **pr} for pt in points for pr in probes]
    configs = [from_dict(spec.trial_raw(v)) for v in per_sample]
    n = spec.trial_count()
    axes = ", ".join([f"{k} × {len(v)}" for k, v in spec.grid.items()] +
                     [f"{k} ~ {next(iter(d))}{next(iter(d.values()))}" for k, d in spec.sample.items()])
    lines = [f"sweep {spec.name!r}: dry run — nothing is started or written",
             f"{n} trials ({axes or 'no swept keys'}), searcher {spec.searcher}"
             + (f", {spec.num_samples} sample(s) per grid point" if spec.searcher == "grid" and spec.num_samples > 1
                else ""),
             f"folder {spec.root}" + (" (exists: continue it with --resume or --extend)" if (spec.root / TUNE_DIR).exists()
                                      else "")]
    if spec.searcher == "grid" and n <= LIST_AT_MOST:
        lines += ["trials:"] + [f"  {i + 1:>3}  " + (" ".join(f"{k}={v}" for k, v in p.items()) or "(the base config)")
                                for i, p in enumerate(points * spec.num_samples)]
    cache = DenseCache(spec.root.parent / "_cache" / "dense")   # key() only: nothing is created
    dense, chains, own = {}, {}, []
    for cfg in configs:
        dense.setdefault(cache.key(cfg), (dense_until(cfg), []))[1].append(cfg)
        method = METHODS[cfg.search.method]
        if cfg.search.method == "ltr":
            chain = (cache.key(cfg), cfg.search.ltr_fraction, cfg.search.ltr_output_fraction)
            rounds = rounds_for(cfg.search.density, cfg.search.ltr_fraction)
            old = chains.get(chain, (0, 0, 0))
            chains[chain] = (max(old[0], rounds), cfg.training.epochs - cfg.search_epoch, old[2] + 1)
        else:
            own.append(method.epochs(cfg) + (cfg.training.epochs - cfg.search_epoch if cfg.retrain else 0))
    scale = n / len(configs)   # grid repeats, or the trials a searcher draws per probe
    lines.append(f"dense runs: {len(dense)} shared by {n} trials (cache keys "
                 + ", ".join(f"{k}: {round(len(v[1]) * scale)} trial(s), {v[0]} epochs" for k, v in list(dense.items())[:6])
                 + (" …" if len(dense) > 6 else "") + ")")
    if chains:
        lines.append("LTR levels: " + "; ".join(f"{r} rounds shared by {c} trial(s)" for r, _, c in chains.values()))
    if _shared_work(spec) is not None:
        lines.append("order: a trial starts once its dense run is cached (or to train it) and, for LTR, after the "
                     "shallower trials of its chain; LTR chains first — no trial holds a slot to wait")
    shared = sum(e for e, _ in dense.values()) + sum(r * e for r, e, _ in chains.values()) + scale * sum(own)
    alone = sum(dense_until(c) + (METHODS[c.search.method].epochs(c) - c.training.epochs if c.search.method == "ltr"
                                  else 0) for c in configs) * scale + scale * sum(own)
    lines.append(f"compute: about {shared:,.0f} epochs ({alone:,.0f} without the shared dense runs and LTR rounds); "
                 "1 epoch = one pass over the trial's training set (dense training, a CTS search epoch and a "
                 "retraining epoch count 1 each)"
                 + ("; sampled keys are estimated at their ranges' edges" if spec.sample else ""))
    return "\n".join(lines)
