"""The sweep file: one small schema, validated in full before Ray starts.

    name: quickstart                  # sweep folder and MLflow parent run
    base: ../configs/digits.yaml      # run config every trial starts from (relative to this file)
    set:                              # fixed run-config values for every trial
      training.epochs: 10
      resources.gpus: 0.25            # per-trial CPUs/GPUs come from resources.cpus / resources.gpus
    grid:                             # every combination of these lists
      search.density: [0.1, 0.01]
      seed: [0, 1, 2]
    sample:                           # distributions, for searcher random or optuna
      search.temperature: {loguniform: [0.1, 2.0]}
    searcher: grid                    # grid | random | optuna
    num_samples: 1                    # grid: repeats of the grid; random/optuna: number of trials
    metric: test_accuracy             # optuna and ASHA optimise this (a list for multi-objective optuna)
    mode: max
    seed: 0                           # seeds the searcher (trials are seeded by their own `seed`)
    scheduler: null                   # or {asha: {grace_period: 5, reduction_factor: 2}}
    max_concurrent: null              # at most this many trials at once
    max_failures: 2                   # retries of a failed trial, from its last checkpoint
    storage: results/sweeps           # sweep folders go here (shared storage on a cluster)
    mlflow: {tracking_uri: null, experiment: cts-ray}   # null: sqlite under storage, or $MLFLOW_TRACKING_URI
                                      # system_metrics: true adds each trial's CPU/memory/GPU (off by default)
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .. import config as C
from ..errors import ConfigError
from ..records import TUNE_METRICS

SEARCHERS = ("grid", "random", "optuna")
DISTRIBUTIONS = ("uniform", "loguniform", "choice", "randint")
TOP_KEYS = ("name", "base", "set", "grid", "sample", "searcher", "num_samples", "metric", "mode", "seed",
            "scheduler", "max_concurrent", "max_failures", "storage", "mlflow")
# what decides which trials a sweep runs and what they do: compared on --resume (sweep.json)
RECORD_KEYS = ("base", "set", "grid", "sample", "searcher", "num_samples", "metric", "mode", "seed", "scheduler")
TUNE_DIR = "tune"   # Tune's experiment folder in the sweep folder (--extend keeps older ones as tune.N)
POINT = "grid_point"   # a trial's values as one dict: the trials `--extend` adds (runner.py)
# what trials report and a searcher may optimise
METRICS = TUNE_METRICS   # what a trial reports with every result (records.py)


@dataclass
class SweepSpec:
    name: str
    base: dict                       # the base run config as a raw mapping
    set: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)
    sample: dict = field(default_factory=dict)
    searcher: str = "grid"
    num_samples: int = 1
    metric: Any = "test_accuracy"
    mode: Any = "max"
    seed: int = 0
    scheduler: Optional[dict] = None
    max_concurrent: Optional[int] = None
    max_failures: int = 2
    storage: str = "results/sweeps"
    mlflow: dict = field(default_factory=lambda: {"tracking_uri": None, "experiment": "cts-ray",
                                                  "system_metrics": False})
    source: Optional[str] = None
    cwd: str = field(default_factory=os.getcwd)   # relative data.root resolves here, not in a worker

    @property
    def root(self) -> Path:
        return Path(self.storage).expanduser().resolve() / self.name

    def trial_raw(self, values: dict) -> dict:
        """The raw run config of a trial: base, then `set`, then the trial's sampled values."""
        values = {**values.get(POINT, {}), **{k: v for k, v in values.items() if k != POINT}}
        raw = copy.deepcopy(self.base)
        for key, value in {**self.set, **values}.items():
            C.set_in(raw, key.split("."), copy.deepcopy(value))
        root = (raw.get("data") or {}).get("root")
        if isinstance(root, str) and not os.path.isabs(os.path.expanduser(root)):
            raw["data"]["root"] = os.path.join(self.cwd, root)   # trials run elsewhere
        return raw

    def grid_points(self) -> list[dict]:
        keys = list(self.grid)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(self.grid[k] for k in keys))]

    def record(self) -> dict:
        """What sweep.json stores: the settings that decide the trials (as JSON gives them back)."""
        out = {"name": self.name, "source": self.source, **{k: getattr(self, k) for k in RECORD_KEYS}}
        return json.loads(json.dumps(out, default=str))

    def trial_count(self) -> Optional[int]:
        if self.searcher == "grid":
            return len(self.grid_points()) * self.num_samples
        return self.num_samples


def changes(stored: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every setting that differs between two sweep records (keys an
    older sweep.json lacks are not compared)."""
    old = C.flatten({k: stored[k] for k in RECORD_KEYS if k in stored})
    now = C.flatten({k: new[k] for k in RECORD_KEYS if k in stored})
    return [f"{k}: {_text(old.get(k))} -> {_text(now.get(k))}" for k in sorted(set(old) | set(now))
            if old.get(k) != now.get(k)]


def _text(v) -> str:
    return "unset" if v is None else json.dumps(v)


def _err(msg: str):
    raise ConfigError(msg)


def load(path, overrides=(), name: Optional[str] = None) -> SweepSpec:
    """Read, apply ``--set`` overrides, and validate a sweep file (every trial config included)."""
    path = Path(path)
    return from_mapping(C.read_yaml(path, TOP_KEYS), overrides, name, path)


def from_mapping(raw: dict, overrides=(), name: Optional[str] = None, path: Optional[Path] = None) -> SweepSpec:
    """A sweep file's mapping (``path``: the file it came from, for a relative ``base``) with
    ``--set`` overrides applied, validated."""
    if not isinstance(raw, dict):
        _err(f"sweep: expected a mapping with keys {', '.join(TOP_KEYS)}; got {type(raw).__name__}")
    raw = copy.deepcopy(raw)
    for text in overrides:
        parts, value = C.parse_override(text)
        key = ".".join(parts)
        if parts[0] in ("set", "grid", "sample") and len(parts) > 1:   # e.g. grid.seed=[0,1]
            C.check_key(parts, 1)
            _mapping(raw, parts[0], key)[".".join(parts[1:])] = value
        elif parts[0] in TOP_KEYS:
            node = raw
            for i, p in enumerate(parts[:-1]):
                node = _mapping(node, p, key, ".".join(parts[:i + 1]))
            node[parts[-1]] = value
        else:   # a run-config key: fixed for every trial
            _check_run_key(parts)
            _mapping(raw, "set", key)[key] = value
    if name is not None:
        raw["name"] = name
    return validate(raw, path)


def _check_run_key(parts: list[str]) -> None:
    """A ``--set`` key that is no sweep key must be a run-config key; a typo of either gets a
    did-you-mean among the keys of its level (sweep keys and run-config top-level keys)."""
    run_top = C.top_keys()
    if parts[0] in run_top:
        C.check_key(parts)
        return
    _err(f"{'.'.join(parts)}: unknown key;{C.did_you_mean(parts, 0, list(TOP_KEYS) + run_top)} sweep keys: {', '.join(TOP_KEYS)}; or a run-config key "
         f"for every trial: {', '.join(run_top)} (SECTION.KEY; `cts-ray config --keys` lists them)")


def _mapping(node: dict, p: str, key: str, where: Optional[str] = None) -> dict:
    """``node[p]`` as a (copied) mapping that a ``--set key=...`` override may write into."""
    value = node.get(p)
    if value is not None and not isinstance(value, dict):
        _err(f"{key}: {where or p} is {value!r}, not a mapping; expected --set {where or p}=VALUE")
    node[p] = dict(value or {})
    return node[p]


def validate(raw: dict, path: Optional[Path] = None) -> SweepSpec:
    """A sweep file's mapping as a SweepSpec; every error is one line naming the key and what is allowed."""
    for k in raw:
        if k not in TOP_KEYS:
            _err(f"{k}: unknown sweep key;{C.did_you_mean([k], 0, TOP_KEYS)} allowed: {', '.join(TOP_KEYS)}")
    name, base = _name(raw, path), _base(raw, path)
    sections = _sections(raw)
    spec = SweepSpec(name=name, base=base, set=sections["set"], grid=sections["grid"], sample=sections["sample"],
                     source=str(path) if path else None)
    spec.searcher = _searcher(raw.get("searcher", "grid"), spec)
    spec.num_samples = _int("num_samples", raw.get("num_samples", 1), 1)
    spec.seed = _int("seed", raw.get("seed", 0), 0)
    spec.max_failures = _int("max_failures", raw.get("max_failures", 2), 0)
    if raw.get("max_concurrent") is not None:
        spec.max_concurrent = _int("max_concurrent", raw["max_concurrent"], 1)
    spec.metric, spec.mode = _metric(raw.get("metric", "test_accuracy"), raw.get("mode", "max"), spec.searcher)
    spec.scheduler = _scheduler(raw.get("scheduler"), spec)
    spec.storage = _storage(raw.get("storage", "results/sweeps"))
    spec.mlflow = _mlflow(raw.get("mlflow") or {})
    _check_trials(spec)
    return spec


def _name(raw: dict, path: Optional[Path]) -> str:
    name = raw.get("name") or (path.stem if path else None)
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        _err(f"name: {name!r} is not a valid sweep name; expected a plain folder name like 'quickstart'")
    return name


def _base(raw: dict, path: Optional[Path]) -> dict:
    """The base run config as a raw mapping (a path relative to the sweep file)."""
    if raw.get("base") is None:
        return {}
    if isinstance(raw["base"], dict):   # a run config given inline (the Python API)
        return copy.deepcopy(raw["base"])
    if not isinstance(raw["base"], str):
        _err(f"base: expected a path to a run config (or a mapping), got {raw['base']!r}")
    base_path = Path(raw["base"])
    if not base_path.is_absolute() and path is not None:
        base_path = path.parent / base_path
    if not base_path.is_file():
        _err(f"base: run config {str(base_path)!r} does not exist; expected a YAML run config")
    return C.read_yaml(base_path)


def _sections(raw: dict) -> dict:
    """``set``, ``grid`` and ``sample`` with string keys, each key fixed or swept, never both."""
    sections = {}
    for key in ("set", "grid", "sample"):
        value = raw.get(key) or {}
        if not isinstance(value, dict):
            _err(f"{key}: expected a mapping of config keys, got {value!r}")
        sections[key] = {str(k): v for k, v in value.items()}
    for k, values in sections["grid"].items():
        if not isinstance(values, list):
            _err(f"grid.{k}: expected a list of values, got {values!r}")
        if not values:
            _err(f"grid.{k}: empty list; expected at least one value")
    for k, dist in sections["sample"].items():
        _check_distribution(k, dist)
    overlap = (set(sections["grid"]) | set(sections["sample"])) & set(sections["set"])
    if overlap:
        _err(f"set.{sorted(overlap)[0]}: also swept in grid/sample; a key is either fixed or swept")
    for key in ("grid", "sample"):   # Tune reserves one shape of trial per sweep (runner._trainable)
        if "resources.workers" in sections[key]:
            _err(f"{key}.resources.workers: every trial of a sweep runs with the same workers; set it under set "
                 "(or sweep it in separate sweeps)")
    both = set(sections["grid"]) & set(sections["sample"])
    if both:
        _err(f"sample.{sorted(both)[0]}: also in grid; a key is either a grid or a distribution")
    return sections


def _searcher(value, spec: SweepSpec) -> str:
    searcher = _choice("searcher", value, SEARCHERS)
    if spec.sample and searcher == "grid":
        _err("searcher: 'grid' cannot draw from sample distributions; choose one of: random, optuna")
    if searcher == "optuna" and not spec.grid and not spec.sample:
        _err("searcher: 'optuna' has nothing to search (no grid or sample keys); add some, or choose one of: "
             "grid, random")
    return searcher


def _storage(storage) -> str:
    if not isinstance(storage, str) or not storage:
        _err(f"storage: {storage!r}; expected a folder path")
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", storage):   # else Path() would make a local folder 's3:'
        _err(f"storage: {storage!r} is a URI; a sweep needs a folder every node sees (a shared file system such "
             "as EFS or NFS mounted at the same path on every node, e.g. /mnt/efs/cts-ray/results)")
    C.check_folder("storage", storage)
    return storage


def _mlflow(ml) -> dict:
    keys = ("tracking_uri", "experiment", "system_metrics")
    if not isinstance(ml, dict):
        _err(f"mlflow: {ml!r}; expected a mapping with keys {', '.join(keys)}")
    unknown = [k for k in ml if k not in keys]   # the file's first, not a set's arbitrary one
    if unknown:
        raise C.unknown_key(["mlflow", unknown[0]], 1, keys, "allowed keys in mlflow")
    for k in ("tracking_uri", "experiment"):
        if ml.get(k) is not None and (not isinstance(ml[k], str) or not ml[k]):
            _err(f"mlflow.{k}: {ml[k]!r}; expected a non-empty string or null")
    if not isinstance(ml.get("system_metrics", False), bool):
        _err(f"mlflow.system_metrics: {ml['system_metrics']!r}; expected true or false")
    return {"tracking_uri": ml.get("tracking_uri"), "experiment": ml.get("experiment") or "cts-ray",
            "system_metrics": ml.get("system_metrics", False)}


def _choice(key, value, allowed):
    if value not in allowed:
        _err(f"{key}: {value!r} is not allowed;{C.did_you_mean([value], 0, allowed)} choose one of: "
             f"{', '.join(allowed)}")
    return value


def _int(key, value, minimum):
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        _err(f"{key}: {value!r}; expected an integer >= {minimum}")
    return value


def _metric(metric, mode, searcher):
    metrics = metric if isinstance(metric, list) else [metric]
    modes = mode if isinstance(mode, list) else [mode]
    for m in metrics:
        _choice("metric", m, METRICS)
    for m in modes:
        _choice("mode", m, ("max", "min"))
    if len(metrics) != len(modes):
        _err(f"mode: {mode!r} must have one entry per metric ({len(metrics)})")
    if len(metrics) > 1 and searcher != "optuna":
        _err("metric: several metrics (multi-objective) need searcher: optuna")
    return metric, mode


def _scheduler(value, spec):
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"asha"} or not isinstance(value["asha"], dict):
        _err(f"scheduler: {value!r}; expected null or {{asha: {{grace_period: N, reduction_factor: N}}}}")
    if isinstance(spec.metric, list):
        _err("scheduler: ASHA cannot early-stop a multi-objective sweep; set scheduler: null")
    opts = value["asha"]
    for k in opts:
        _choice(f"scheduler.asha.{k}", k, ("grace_period", "reduction_factor", "max_t"))
        _int(f"scheduler.asha.{k}", opts[k], 1)
    return value


def _check_distribution(key, dist):
    if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
        _err(f"sample.{key}: {dist!r}; expected one of {{uniform: [lo, hi]}}, {{loguniform: [lo, hi]}}, "
             "{randint: [lo, hi]}, {choice: [values]}")
    kind, args = next(iter(dist.items()))
    if not isinstance(args, list) or not args:
        _err(f"sample.{key}.{kind}: expected a non-empty list, got {args!r}")
    if kind != "choice":
        if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            _err(f"sample.{key}.{kind}: {args!r}; expected [low, high] numbers")
        if not args[0] < args[1]:
            _err(f"sample.{key}.{kind}: low {args[0]} must be below high {args[1]}")
        if kind == "loguniform" and args[0] <= 0:
            _err(f"sample.{key}.loguniform: low {args[0]} must be > 0")


def _sample_probes(dist) -> list:
    """Values that stand for a distribution when validating trial configs."""
    kind, args = next(iter(dist.items()))
    if kind == "choice":
        return list(args)
    if kind == "randint":
        return [args[0], args[1] - 1]
    return [args[0], args[1] if kind != "uniform" else args[1] - (args[1] - args[0]) * 1e-9]


def probes(sample: dict) -> list[dict]:
    """What stands for the ``sample`` distributions before a sweep runs (validation, --dry-run):
    the combinations of each one's edges (its choices), at most 64."""
    out = [{}]
    for key, dist in sample.items():
        out = [{**p, key: v} for p in out for v in _sample_probes(dist)][:64]
    return out


def _check_trials(spec: SweepSpec) -> None:
    """Build every grid trial's config (and the edges of every distribution) now, not in a worker."""
    points = spec.grid_points()
    if math.prod(len(v) for v in spec.grid.values()) > 100_000:
        _err("grid: more than 100000 combinations; narrow the grid")
    standins = probes(spec.sample)
    for point in points:
        for probe in standins:
            values = {**point, **probe}
            try:
                C.from_dict(spec.trial_raw(values))
            except ConfigError as e:
                where = ", ".join(f"{k}={v}" for k, v in values.items())
                raise ConfigError(f"{e} (in the trial with {where})" if where else str(e)) from None
