"""The Python API, for notebooks and scripts: what the CLI does, as functions that return values
and raise the CLI's error classes (``cts_ray.errors``: ConfigError for bad input, DivergedError for
a run whose loss became non-finite, ...) instead of printing one line and exiting.

    import cts_ray
    summary = cts_ray.run("configs/digits.yaml", overrides=["search.density=0.01"])
    result = cts_ray.run_sweep("tune_configs/quickstart.yaml", overrides={"training.epochs": 2})
    trials = cts_ray.read_table(result.folder)            # a pyarrow Table (.to_pandas() if you like)
    ticket = cts_ray.load_ticket(summary["run_dir"])      # model with the ticket's weights, mask, ...

``overrides`` are what ``--set`` takes: ``["KEY=VALUE", ...]`` (the value read as YAML) or a
mapping ``{"KEY": value}``. Configs and sweeps are a YAML path or the mapping the file would hold.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

from .errors import AnalysisError, ConfigError

Overrides = Union[list, tuple, dict, str]
Source = Union[str, os.PathLike, dict, None]


def _texts(overrides: Overrides) -> list[str]:
    """``--set`` texts from a list of them, one of them, or a {key: value} mapping."""
    if isinstance(overrides, str):
        return [overrides]
    if isinstance(overrides, dict):   # JSON is YAML: the value comes back as given
        return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    return [str(o) for o in overrides]


def load_config(config: Source = None, overrides: Overrides = ()):
    """A validated ``config.Config`` from a YAML path, a mapping (as the file would hold), a Config,
    or None (the embedded default), with ``overrides`` applied."""
    from . import config as C
    if config is None or isinstance(config, (str, os.PathLike)):
        return C.load(config, _texts(overrides))
    if isinstance(config, C.Config):
        config = config.to_dict()
    if not isinstance(config, dict):
        raise ConfigError(f"config: {type(config).__name__}; expected a YAML path, a mapping or a Config")
    raw = copy.deepcopy(config)
    C.apply_overrides(raw, _texts(overrides))
    return C.from_dict(raw)


def run(config: Source = None, overrides: Overrides = (), *, out=None, overwrite: bool = False,
        progress: bool = False) -> dict:
    """One experiment (``cts-ray run``): returns its summary (what summary.json holds) plus
    ``run_dir``, the run folder (default ``results/runs/<data>-<model>-<method>-d<density>-s<seed>-<hash>``)."""
    from . import pipeline
    from .config import one_process
    cfg = one_process(load_config(config, overrides))
    out = Path(pipeline.default_out(cfg) if out is None else out)
    summary = pipeline.run(cfg, out, overwrite=overwrite, progress=progress)
    return {**summary, "run_dir": str(out)}


@dataclass
class SweepResult:
    """What ``run_sweep`` returns: the sweep folder, the trials that failed or diverged, the summary
    table as ``cts-ray sweep`` prints it, and where MLflow logged it."""
    folder: Path
    failed: int
    summary: str
    mlflow: str

    def table(self, name: str = "trials"):
        return read_table(self.folder, name)


def run_sweep(sweep: Source, overrides: Overrides = (), *, name: Optional[str] = None, resume: bool = False,
              extend: bool = False, address: Optional[str] = None, verbose: int = 0) -> SweepResult:
    """A sweep (``cts-ray sweep``) from a sweep file or its mapping (a relative ``base`` is read from
    the current folder; ``base`` may also be the run config's mapping). ``address``: a Ray cluster
    (default: $RAY_ADDRESS, else a local Ray this process starts and keeps); ``verbose``: 0 nothing
    while it runs, 1 a progress line and a line per ended trial, 2 Tune's tables. Failed trials do
    not raise: ``result.failed`` counts them (diverged ones too, of every run of the sweep)."""
    from .sweep import runner, spec as spec_mod
    from .sweep.summary import format_summary
    if isinstance(sweep, (str, os.PathLike)):
        spec = spec_mod.load(sweep, _texts(overrides), name=name)
    else:
        spec = spec_mod.from_mapping(sweep, _texts(overrides), name)
    result = runner.run_sweep(spec, address=address, resume=resume, extend=extend, verbose=verbose)
    return SweepResult(spec.root, result["failed"], format_summary(result["summary"]), str(runner.tracking_uri(spec)))


def read_table(sweep_folder, table: str = "trials"):
    """One results table of a sweep folder (or a folder of sweeps) as a ``pyarrow.Table``: ``trials``
    (one row per trial), ``epochs`` or ``layers`` (README "Where results go")."""
    from .sweep import tables
    if table not in tables.TABLES:
        raise ConfigError(f"table: {table!r} is not allowed; choose one of: {', '.join(tables.TABLES)}")
    folder = Path(sweep_folder).expanduser()
    if not folder.is_dir():
        raise AnalysisError(f"results: {str(folder)!r} is not a folder; give a sweep folder such as "
                            "results/sweeps/quickstart")
    try:
        return tables.read(folder, table)
    except FileNotFoundError as e:
        raise AnalysisError(f"results: {e}") from None


class SavedTicket(NamedTuple):
    """A run folder's ticket: the model (rebuilt from the run's full config, with the ticket's
    weights, in eval mode), its mask (``masking.Mask``), the input shape (C, H, W) and the run's
    resolved config as a dict (with ``data_provenance``: mean, std, classes)."""
    model: Any
    mask: Any
    input_shape: tuple
    config: dict


def load_ticket(run_dir) -> SavedTicket:
    """The ticket a run (or a sweep's ``trials/<trial>``) saved, as ``cts-ray export`` reads it."""
    from .export import load_ticket as load
    return SavedTicket(*load(run_dir))
