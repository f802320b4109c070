"""What a run produces, each defined once: an epoch, a ticket layer, a finished run's summary, and
a sweep trial's row. Everything that stores, logs, reports or analyses results derives from these
fields and their metadata, so a new metric is one added field:

- the Parquet schemas (``sweep/tables.py``): column names and types come from the fields' types;
- the MLflow metrics (``sweep/mlflow_log.py``): ``Epoch`` fields with ``mlflow`` are logged per
  epoch as ``<phase>/<name>``; ``Summary`` fields with ``final`` at the end of a run;
- what a trial reports to Tune (``sweep/trainable.py``): the ``tune`` fields with every result
  (the metrics a sweep may optimise or schedule on, ``sweep/spec.py``), the ``final`` ones at the end;
- ``summary.json`` (``pipeline.py``) is ``Summary``; the analysis compares ``compared`` fields.

Plain dataclasses, no torch, Ray or pyarrow: reading a definition costs nothing.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Optional


def _f(default=None, *, column=True, mlflow=False, final=False, tune=False, compared=False, source=None,
       name=None, to_column=None, key=None, unit=None, doc=""):
    """A result field.

    ``column``: a column of its table (``False``: in summary.json only); ``to_column``: how the
    value becomes the column's (``"json"``: JSON text; ``len``: a count); ``name``: the column's
    name where it differs from the field's. ``mlflow``: an epoch metric logged per phase.
    ``final``: reported to Tune and logged to MLflow when the run ends. ``tune``: reported to Tune
    with every result (what ``metric`` in a sweep file and its schedulers may name). ``compared``:
    a metric the analysis compares tickets by. ``source``: the key a pipeline record holds it
    under. ``key``: the config key an axis comes from. ``unit``: what one of its numbers is
    (``"fraction"``: 0 to 1, never a percentage; ``"s"``: seconds), the Parquet field's metadata."""
    meta = dict(column=column, mlflow=mlflow, final=final, tune=tune, compared=compared, source=source,
                name=name, to_column=to_column, key=key, unit=unit, doc=doc)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------- every row of every table

@dataclass
class Keys:
    sweep: Optional[str] = _f()
    trial_id: Optional[str] = _f()
    config_hash: Optional[str] = _f()


@dataclass
class Axes:
    """The swept axes of a trial, from its resolved config; null where the knob does not apply to
    the trial's method (SNIP has no temperature)."""
    objective: Optional[str] = _f(key="search.objective")
    controller: Optional[str] = _f(key="search.controller")
    sanity: Optional[str] = _f(key="search.sanity")
    target_density: Optional[float] = _f(key="search.density", unit="fraction")
    temperature: Optional[float] = _f(key="search.temperature")
    seed: Optional[int] = _f(key="seed")
    dataset: Optional[str] = _f(key="data.name")
    model: Optional[str] = _f(key="model.name")
    search_point: Optional[str] = _f(key="search.point")
    search_length: Optional[float] = _f(key="search.length")
    mask_lr: Optional[float] = _f(key="search.lr")   # resolved: search.lr, or training.lr when null


AXIS_KEYS = {f.name: f.metadata["key"] for f in dataclasses.fields(Axes)}


# ---------------------------------------------------------------- one epoch of any phase

@dataclass
class Epoch:
    """One epoch of dense training, search or retraining (or a final evaluation): a row of the
    epochs table and the MLflow metrics ``<phase>/<name>`` stepped by the epoch within its phase."""
    phase: Optional[str] = _f()
    epoch: Optional[int] = _f(mlflow=True)
    round: Optional[int] = _f(doc="LTR's pruning round")
    cached: Optional[bool] = _f(doc="read from the sweep's dense cache")
    lr: Optional[float] = _f(mlflow=True)
    train_loss: Optional[float] = _f(mlflow=True)
    train_accuracy: Optional[float] = _f(mlflow=True, unit="fraction")
    test_loss: Optional[float] = _f(mlflow=True)
    test_accuracy: Optional[float] = _f(mlflow=True, unit="fraction")
    search_objective: Optional[float] = _f(mlflow=True, source="objective")
    expected_density: Optional[float] = _f(mlflow=True, unit="fraction")
    hard_density: Optional[float] = _f(mlflow=True, unit="fraction")
    lambda_: Optional[float] = _f(mlflow=True, name="lambda", source="lambda")
    topk_changed: Optional[float] = _f(mlflow=True)
    seconds: Optional[float] = _f(mlflow=True, unit="s")

    @classmethod
    def from_record(cls, record: dict) -> "Epoch":
        """A pipeline record (train.py, the methods); other keys it holds are left out."""
        return cls(**{f.name: record.get(source(f)) for f in dataclasses.fields(cls)})

    @classmethod
    def from_row(cls, row: dict) -> "Epoch":
        return cls(**{f.name: row.get(column_name(f)) for f in dataclasses.fields(cls)})

    def row(self) -> dict:
        """Its row of the epochs table (less keys and axes)."""
        return {column_name(f): getattr(self, f.name) for f in dataclasses.fields(self)}

    def metrics(self) -> dict:
        """Its MLflow metrics, ``<phase>/<name>``: the numbers it has."""
        out = {}
        for f in fields_where(Epoch, "mlflow"):
            v = getattr(self, f.name)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{self.phase}/{source(f)}"] = float(v)
        return out


# ---------------------------------------------------------------- one prunable layer of a ticket

@dataclass
class Layer:
    layer: Optional[str] = _f()
    numel: Optional[int] = _f()
    kept: Optional[int] = _f()
    density: Optional[float] = _f(unit="fraction")
    units: Optional[int] = _f(doc="output units or channels")
    effective_kept: Optional[int] = _f(doc="kept weights on an input-to-output path")
    alive_units: Optional[int] = _f(doc="units with an effective incoming weight")

    @classmethod
    def from_record(cls, record: dict) -> "Layer":
        """A row of ``Anatomy.report()`` (layers.json)."""
        return cls(**{f.name: record.get(f.name) for f in dataclasses.fields(cls)})

    def row(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- a finished run (summary.json)

@dataclass
class Summary:
    """A finished run, as ``summary.json`` holds it and ``pipeline.run`` returns it (as a dict)."""
    method: str = _f(column=False)
    objective: Optional[str] = _f(column=False)     # null where the method does not read the knob
    controller: Optional[str] = _f(column=False)
    temperature: Optional[float] = _f(column=False)
    sanity: str = _f(column=False)
    strong_ticket: bool = _f()
    retrained: bool = _f(column=False)
    strong_init: Optional[str] = _f(column=False, doc="the frozen weights' init, resolved (strong tickets)")
    seed: int = _f(column=False)
    config_hash: str = _f(column=False)
    dataset: str = _f(column=False)
    model: str = _f(column=False)
    data: dict = _f({}, column=False, doc="the data set as used and how it was normalised")
    search_point: str = _f(column=False)
    search_epoch: int = _f(column=False)
    target_density: float = _f(column=False)
    achieved_density: float = _f(final=True, tune=True, unit="fraction")
    kept_weights: int = _f()
    prunable_weights: int = _f()
    layer_densities: dict = _f({}, column=False)
    effective_density: float = _f(final=True, unit="fraction", doc="kept weights on an input-to-output path / prunable")
    effective_kept: int = _f(final=True)
    collapsed_layers: list = _f([], final=True, name="collapsed", to_column=len,
                                doc="layers with no weight on a path (the column counts them)")
    layer_alive_units: dict = _f({}, column=False)
    compact_params: Optional[int] = _f(final=True, doc="parameters of the compact ticket (compact.py); null: "
                                                       "a family compaction does not handle")
    compact_flops: Optional[int] = _f(final=True, doc="multiply-adds per example of the compact ticket")
    compact_flops_fraction: Optional[float] = _f(final=True, unit="fraction", doc="compact FLOPs / the dense network's")
    test_accuracy: float = _f(final=True, tune=True, compared=True, unit="fraction", doc="the last retraining epoch")
    # max over retraining epochs of the test accuracy: a curve's peak, not a result selected on data
    peak_test_accuracy: float = _f(final=True, tune=True, compared=True, unit="fraction")
    dense_test_accuracy: Optional[float] = _f(final=True, unit="fraction")
    pretrain_seconds: float = _f(unit="s")
    dense_seconds: float = _f(column=False)
    search_seconds: float = _f(unit="s")
    retrain_seconds: float = _f(unit="s")
    ticket_seconds: float = _f(final=True, tune=True, unit="s", doc="SPEC §1: time to a retrained ticket")
    epochs_equivalent: float = _f()
    mask_sha256: str = _f()
    final_search_metrics: Optional[dict] = _f(column=False)
    levels: Optional[list] = _f(to_column="json", doc="LTR: one dict per pruning level")
    code_version: str = _f(column=False)
    library_versions: dict = _f({}, column=False)
    device: str = _f(column=False)
    device_name: str = _f(column=False)
    threads: int = _f(column=False)
    config: dict = _f({}, column=False)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)



def final_metrics(summary: dict) -> dict:
    """What a run reports to Tune, and MLflow logs, when it ends: ``Summary``'s ``final`` fields
    (``summary`` as ``Summary.to_dict()`` gives it), less the missing ones."""
    return {column_name(f): to_column(f, summary[f.name]) for f in fields_where(Summary, "final")
            if summary.get(f.name) is not None}


# ---------------------------------------------------------------- a sweep trial (trials table)

@dataclass
class Trial:
    """A sweep trial's own facts; its row of the trials table is these, then the ``Summary``
    columns of a trial that finished (null otherwise)."""
    status: Optional[str] = _f(doc="finished, stopped, diverged, error (shown as failed) or interrupted")
    error: Optional[str] = _f()
    last_phase: Optional[str] = _f()
    last_epoch: Optional[int] = _f()
    dense_cache_hit: Optional[bool] = _f()
    mask_path: Optional[str] = _f()
    run_dir: Optional[str] = _f()
    node_id: Optional[str] = _f()
    worker_node_ids: Optional[list] = _f(to_column="json", doc="the Ray node of each worker (resources.workers), "
                                         "in rank order: of the worker group that wrote the row")
    hostname: Optional[str] = _f()
    started_at: Optional[float] = _f(unit="s since 1970-01-01 UTC")
    ended_at: Optional[float] = _f(unit="s since 1970-01-01 UTC")
    code_version: Optional[str] = _f()
    library_versions: Optional[dict] = _f(to_column="json")
    config: Optional[dict] = _f(to_column="json")

    def row(self, summary: Optional[dict]) -> dict:
        """The trials-table row (less keys and axes): ``summary`` a ``Summary`` as a dict, or
        the partial one of a stopped trial, or None."""
        own = {column_name(f): to_column(f, getattr(self, f.name)) for f in dataclasses.fields(Trial)}
        s = summary or {}
        return {**own, **{column_name(f): to_column(f, s[f.name]) for f in fields_where(Summary, "column")
                          if f.name in s}}


# statuses of a trial that ended; a rerun would only repeat them
FINAL_STATUSES = ("finished", "diverged")
# what a trial reports of a row that already ended (its own, or an adopted one's: resume.orphans)
REPORTED = ("status", "node_id", "run_dir", *(f.name for f in dataclasses.fields(Summary) if f.metadata["tune"]))


# ---------------------------------------------------------------- derivations

def fields_where(cls, flag: str) -> list:
    return [f for f in dataclasses.fields(cls) if f.metadata.get(flag)]


def column_name(f) -> str:
    return f.metadata.get("name") or f.name


def source(f) -> str:
    return f.metadata.get("source") or f.name


def to_column(f, value):
    how = f.metadata.get("to_column")
    if value is None or how is None:
        return value
    if how == "json":
        return json.dumps(value, sort_keys=True)
    return how(value)


def column_type(cls, f) -> type:
    """The Python type a field's column holds: its annotation less Optional, after ``to_column``."""
    how = f.metadata.get("to_column")
    if how == "json":
        return str
    if how is len:
        return int
    tp = typing.get_type_hints(cls)[f.name]
    if typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def units(*classes) -> dict[str, str]:
    """{column name: unit} of the columns the classes' fields make that have one."""
    return {column_name(f): f.metadata["unit"] for cls in classes for f in dataclasses.fields(cls)
            if f.metadata.get("column", True) and f.metadata.get("unit")}


def columns(*classes) -> list[tuple[str, type]]:
    """(column name, Python type) of each column the classes' fields make, in order."""
    return [(column_name(f), column_type(cls, f)) for cls in classes for f in dataclasses.fields(cls)
            if f.metadata.get("column", True)]


TUNE_METRICS = tuple(f.name for f in fields_where(Summary, "tune"))          # sweep `metric:` choices
FINAL_METRICS = tuple(column_name(f) for f in fields_where(Summary, "final"))  # MLflow, at the end
PHASE_METRICS = tuple(source(f) for f in fields_where(Epoch, "mlflow"))       # MLflow, <phase>/<name>
COMPARED = tuple(f.name for f in fields_where(Summary, "compared"))           # analysis `--metric`
