"""The one place that reads result tables for analysis: finished trials of one or more sweeps.

A trial is identified by its config hash; the same config found in several sweeps is counted
once (the latest). Trials are grouped into *variants*: the config without its seed, target
density and sanity check, so seeds of one setting pool together and settings never mix.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd

from ..config import Config, flatten, from_dict, set_in, stable_hash
from ..errors import AnalysisError, ConfigError
from ..methods import METHODS, effective
from ..records import AXIS_KEYS, COMPARED
from ..sweep import tables
from ..wording import count
from .stats import value_text

# the hyperparameter axes an insensitivity study looks at (columns of the trials table)
AXES = ("temperature", "mask_lr", "search_length", "objective", "controller", "search_point")
METRICS = COMPARED   # the metrics tickets are compared by (records.py)


def _non_identity_keys() -> set:
    cfg = Config()
    return {f"{s.name}.{f.name}" for s in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, s.name))
            for f in dataclasses.fields(getattr(cfg, s.name)) if not f.metadata.get("identity", True)}


# what does not make two trials different settings: where they ran, and the swept seed/density/check
_NON_IDENTITY = _non_identity_keys()
_NOT_VARIANT = _NON_IDENTITY | {"seed", "search.density", "search.sanity"}


@dataclass
class Results:
    trials: pd.DataFrame                 # finished trials used, one row per distinct config;
                                         # `_flat` holds each config as {dotted key: value}
    sweeps: list = field(default_factory=list)     # (folder, sweep.json contents or {})
    skipped: dict = field(default_factory=dict)    # reason -> count
    metric: str = "test_accuracy"

    def describe(self) -> str:
        names = ", ".join(Path(f).name for f, _ in self.sweeps)
        skipped = "; ".join(f"{why} ({n})" for why, n in self.skipped.items() if n)
        return (f"{count(len(self.trials), 'finished trial')} from {count(len(self.sweeps), 'sweep')} ({names})"
                + (f"; not used: {skipped}" if skipped else ""))


def method_key(method: str) -> tuple:
    """Tables list methods in the registry's order."""
    order = list(METHODS)
    return (order.index(method) if method in order else len(order), method)


def sweep_folders(paths) -> list[Path]:
    """Each path is a sweep folder (holding tables/) or a folder of sweep folders."""
    out = []
    for p in (Path(x).expanduser().resolve() for x in paths):
        if not p.exists():
            raise AnalysisError(f"results: {p} does not exist; give a sweep folder such as results/sweeps/quickstart")
        if not p.is_dir():
            raise AnalysisError(f"results: {p} is not a folder; give a sweep folder such as results/sweeps/quickstart")
        found = [p] if (p / "tables" / "trials").is_dir() else \
            sorted(q for q in p.iterdir() if (q / "tables" / "trials").is_dir())
        if not found:
            raise AnalysisError(f"results: {p} holds no trials table (expected {p}/tables/trials/method=*/*.parquet)")
        out += [f for f in found if f not in out]
    return out


def load(paths, *, metric: str = "test_accuracy", allow_incomplete: bool = False,
         where: Optional[dict] = None) -> Results:
    """Finished trials of the sweeps under ``paths``; refuses while trials are still unfinished."""
    if metric not in METRICS:
        raise AnalysisError(f"metric: {metric!r}; allowed: {', '.join(METRICS)}")
    folders = sweep_folders(paths)
    frames, sweeps, skipped = [], [], {}
    for folder in folders:
        df, meta, unfinished = _read_sweep(folder)
        if unfinished and not allow_incomplete:
            raise AnalysisError(
                f"results: {count(len(unfinished), 'trial')} of {folder.name} {'has' if len(unfinished) == 1 else 'have'} "
                f"started but not finished "
                f"(still running, or interrupted: finish with `cts-ray sweep … --resume`); "
                f"pass --allow-incomplete to analyse the finished ones")
        skipped["unfinished"] = skipped.get("unfinished", 0) + len(unfinished)
        sweeps.append((str(folder), meta))
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    for status, n in df["status"].value_counts().items():
        if status not in ("finished", "interrupted"):   # interrupted ones: counted as unfinished
            skipped[status] = skipped.get(status, 0) + int(n)
    df = df[(df["status"] == "finished") & df[metric].notna()].copy()
    before = len(df)
    # the same config in several sweeps (e.g. tau = 2/3 in a comparison and an ablation): once
    df = df.sort_values("ended_at").drop_duplicates("config_hash", keep="last")
    skipped["duplicate configs"] = before - len(df)
    df = _where(df, where or {}, skipped)
    if df.empty:
        raise AnalysisError(f"results: no finished trials with a {metric} in {', '.join(map(str, folders))}")
    df["accuracy"] = 100.0 * df[metric]          # percentage points everywhere in the analysis
    # knobs a method does not read make no setting of it
    flat = [effective(flatten(json.loads(c))) for c in df["config"]]
    df["_flat"] = flat
    # one experiment run twice (SNIP under two CTS temperatures): counted once
    df["_experiment"] = [stable_hash({k: v for k, v in f.items() if k not in _NON_IDENTITY}) for f in flat]
    before = len(df)
    df = df.drop_duplicates("_experiment", keep="last")
    skipped["repeats of one experiment (a swept knob that does not apply)"] = before - len(df)
    df["variant"] = [context(f) for f in df["_flat"]]
    df = df.sort_values(["method", "variant", "target_density", "seed"]).reset_index(drop=True)
    df["label"] = df["variant"].map(_labels(df, base_values(sweeps)))
    return Results(df, sweeps, skipped, metric)


def _read_sweep(folder: Path) -> tuple:
    """(its trials table as a DataFrame, sweep.json or {}, ids of trials started without a row or
    with an ``interrupted`` one: the driver stopped while they ran)."""
    try:
        df = tables.read(folder, "trials").to_pandas()
    except tables.SchemaError as e:
        raise AnalysisError(str(e)) from None
    except FileNotFoundError:
        df = pd.DataFrame(columns=tables.SCHEMAS["trials"].names + ["method"])
    meta = json.loads((folder / "sweep.json").read_text()) if (folder / "sweep.json").exists() else {}
    started = {p.name for p in (folder / "trials").iterdir() if p.is_dir() and not p.name.startswith(".")} \
        if (folder / "trials").is_dir() else set()
    interrupted = set(df.loc[df["status"] == "interrupted", "trial_id"])
    return df, meta, sorted((started - set(df["trial_id"])) | interrupted)


def _where(df: pd.DataFrame, where: dict, skipped: dict) -> pd.DataFrame:
    """Only the rows whose columns hold the given values (numbers compared as numbers)."""
    for key, value in where.items():
        if key not in df.columns:
            raise AnalysisError(f"where: unknown column {key!r}; allowed: {', '.join(sorted(df.columns))}")
        col = df[key]
        keep = col.astype(str) == str(value)
        if col.dtype.kind == "f":
            try:
                keep = (col - float(value)).abs() <= 1e-9 * max(1.0, abs(float(value)))
            except ValueError:
                raise AnalysisError(f"where: {key} is numeric; got {value!r}") from None
        skipped[f"filtered by {key}={value}"] = int((~keep).sum())
        df = df[keep]
    return df


def context(flat: dict, drop=()) -> str:
    """A hash of everything that makes a setting, less ``drop`` (e.g. the axis under study)."""
    return stable_hash({k: v for k, v in flat.items() if k not in _NOT_VARIANT and k not in drop}, 10)


def base_values(sweeps: list) -> dict:
    """The flattened config the sweeps' settings are named against: each sweep's base config with
    its ``set`` (sweep.json), where every sweep agrees on a key; the defaults elsewhere."""
    out = flatten(Config().to_dict())
    bases = [_base_of(meta) for _, meta in sweeps]
    bases = [b for b in bases if b is not None]
    for k in out:
        values = {json.dumps(b.get(k), default=str) for b in bases}
        if bases and len(values) == 1:
            out[k] = bases[0].get(k)
    return out


def _base_of(meta: dict) -> Optional[dict]:
    """A sweep's base config with its ``set``, flattened; None when sweep.json does not give one."""
    if not isinstance(meta.get("base"), dict):
        return None
    raw = copy.deepcopy(meta["base"])
    try:
        for key, value in (meta.get("set") or {}).items():
            set_in(raw, key.split("."), value)
        return flatten(from_dict(raw).to_dict())
    except ConfigError:   # a base or set this version no longer reads: named against the defaults
        return None


def _labels(df: pd.DataFrame, base: dict) -> dict:
    """Name each setting by its method plus its values, where they differ from ``base``, of the keys
    that vary between the settings that read them; the setting at the base is the plain row."""
    flats = df.drop_duplicates("variant").set_index("variant")["_flat"]
    keys = varying_keys(flats)
    out = {}
    for variant, f in flats.items():
        diff = [f"{k.removeprefix('search.')}={value_text(f[k])}" for k in keys if k in f and f[k] != base.get(k)]
        out[variant] = f["search.method"] + (f" ({', '.join(diff)})" if diff else "")
    return out


def varying_keys(flats) -> list[str]:
    """The config keys that make settings differ: those with ≥ 2 values among the configs
    (flattened) that read them, less the method, seed, density and sanity check."""
    return sorted({k for f in flats for k in f if k not in _NOT_VARIANT and k != "search.method"
                   and len({json.dumps(g[k], default=str) for g in flats if k in g}) > 1})


# an axis's column where the config key is one (mask_lr: the resolved search.lr)
_AXIS_OF = {key: axis for axis, key in AXIS_KEYS.items() if axis in AXES}


def check_axes(axes) -> None:
    for a in axes or ():
        if a not in AXES:
            raise AnalysisError(f"axis: {a!r}; allowed: {', '.join(AXES)}")


def swept_axes(keys: list) -> list[str]:
    """The axes (``AXES`` order) whose config keys are among ``keys``."""
    return [a for a in AXES if AXIS_KEYS[a] in keys]


def held_at(g, keys: list, drop=()) -> str:
    """What the swept keys other than ``drop`` (axes) were held at in the trials ``g``:
    'objective=kl_reverse, mask_lr=0.1', or '–' when nothing else was swept."""
    first = g.iloc[0]
    out = []
    for k in keys:
        name = _AXIS_OF.get(k, k.removeprefix("search."))
        if name in drop:
            continue
        v = first[name] if name in AXES else first["_flat"].get(k)
        out.append(f"{name}={value_text(v)}")
    return ", ".join(out) or "–"


def settings(df: pd.DataFrame) -> list:
    """Every setting's label in table order: by method, the plain (default) row first."""
    return sorted(set(df["label"]), key=lambda lb: (method_key(lb.split(" ")[0]), "(" in lb, lb))
