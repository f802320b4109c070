"""The results schema: three hive-partitioned Parquet datasets per sweep, one file per trial.

    <sweep>/tables/trials/method=<m>/<trial_id>.parquet   one row per trial (final numbers, status)
    <sweep>/tables/epochs/method=<m>/<trial_id>.parquet   one row per epoch of every phase
    <sweep>/tables/layers/method=<m>/<trial_id>.parquet   one row per prunable layer of the ticket

Each file is written under a temporary name and renamed, so no reader ever sees half a file, and
it is named by trial id, so a retried or resumed trial replaces its own rows instead of adding
more. Every row carries ``schema_version``; readers refuse versions they do not know. Columns
added later are nullable and read as null from older files, so they need no new version.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
TABLES = ("trials", "epochs", "layers")

_KEYS = [("sweep", pa.string()), ("trial_id", pa.string()), ("config_hash", pa.string())]
_AXES = [("objective", pa.string()), ("controller", pa.string()), ("sanity", pa.string()),
         ("target_density", pa.float64()), ("temperature", pa.float64()), ("seed", pa.int64()),
         ("dataset", pa.string()), ("model", pa.string()), ("search_point", pa.string()),
         ("search_length", pa.float64()), ("mask_lr", pa.float64())]

SCHEMAS = {
    "trials": pa.schema([("schema_version", pa.int32()), *_KEYS, *_AXES,
                         ("status", pa.string()), ("error", pa.string()),
                         ("last_phase", pa.string()), ("last_epoch", pa.int64()), ("strong_ticket", pa.bool_()),
                         ("achieved_density", pa.float64()), ("kept_weights", pa.int64()),
                         ("prunable_weights", pa.int64()),
                         ("test_accuracy", pa.float64()), ("peak_test_accuracy", pa.float64()),
                         ("dense_test_accuracy", pa.float64()),
                         ("pretrain_seconds", pa.float64()), ("search_seconds", pa.float64()),
                         ("retrain_seconds", pa.float64()), ("ticket_seconds", pa.float64()),
                         ("epochs_equivalent", pa.float64()), ("dense_cache_hit", pa.bool_()),
                         ("mask_sha256", pa.string()), ("mask_path", pa.string()), ("run_dir", pa.string()),
                         ("node_id", pa.string()), ("hostname", pa.string()),
                         ("started_at", pa.float64()), ("ended_at", pa.float64()),
                         ("code_version", pa.string()), ("library_versions", pa.string()),
                         ("levels", pa.string()), ("config", pa.string()),
                         # ticket anatomy (anatomy.py); null in tables written before it existed
                         ("effective_density", pa.float64()), ("effective_kept", pa.int64()),
                         ("collapsed", pa.int64())]),
    "epochs": pa.schema([("schema_version", pa.int32()), *_KEYS, *_AXES, ("node_id", pa.string()),
                         ("phase", pa.string()), ("epoch", pa.int64()), ("round", pa.int64()),
                         ("cached", pa.bool_()), ("lr", pa.float64()),
                         ("train_loss", pa.float64()), ("train_accuracy", pa.float64()),
                         ("test_loss", pa.float64()), ("test_accuracy", pa.float64()),
                         ("search_objective", pa.float64()), ("expected_density", pa.float64()),
                         ("hard_density", pa.float64()), ("lambda", pa.float64()),
                         ("topk_changed", pa.float64()), ("seconds", pa.float64())]),
    "layers": pa.schema([("schema_version", pa.int32()), *_KEYS, *_AXES,
                         ("layer", pa.string()), ("numel", pa.int64()), ("kept", pa.int64()),
                         ("density", pa.float64()),
                         ("units", pa.int64()), ("effective_kept", pa.int64()), ("alive_units", pa.int64())]),
}
# columns renamed since version 1 (old name -> new): files written before are read under the new name
RENAMED = {"trials": {"best_test_accuracy": "peak_test_accuracy"}}
# every table is partitioned by method; the column comes back from the folder names
PARTITIONING = ds.partitioning(pa.schema([("method", pa.string())]), flavor="hive")


# each axis column and the config key it comes from
AXIS_KEYS = {"objective": "search.objective", "controller": "search.controller", "sanity": "search.sanity",
             "target_density": "search.density", "temperature": "search.temperature", "seed": "seed",
             "dataset": "data.name", "model": "model.name", "search_point": "search.point",
             "search_length": "search.length", "mask_lr": "search.lr"}


def axes(cfg) -> dict:
    """The swept axes of a trial, from its resolved Config; null where the knob does not apply to
    the trial's method (SNIP has no temperature)."""
    from ..methods import applies
    out = {}
    for column, key in AXIS_KEYS.items():
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        out[column] = node
    out["mask_lr"] = cfg.mask_lr   # resolved: search.lr, or training.lr when that is null
    for column, key in AXIS_KEYS.items():
        if not applies(cfg.search.method, key):
            out[column] = None
    return out


def epoch_row(record: dict) -> dict:
    row = {k: record.get(k) for k in ("phase", "epoch", "round", "cached", "lr", "train_loss", "train_accuracy",
                                      "test_loss", "test_accuracy", "expected_density", "hard_density",
                                      "lambda", "topk_changed", "seconds")}
    row["search_objective"] = record.get("objective")
    return row


def write(root, table: str, method: str, trial_id: str, rows: list[dict], common: dict) -> Path:
    """Write one trial's rows of ``table`` atomically; returns the file's path."""
    schema = SCHEMAS[table]
    full = [{**{n: None for n in schema.names}, **common, **r, "schema_version": SCHEMA_VERSION} for r in rows]
    data = pa.Table.from_pylist([{n: row[n] for n in schema.names} for row in full], schema=schema)
    folder = Path(root) / "tables" / table / f"method={method}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{trial_id}.parquet"
    tmp = folder / f".{trial_id}.parquet.tmp-{os.getpid()}"
    pq.write_table(data, tmp)
    os.replace(tmp, path)
    return path


class SchemaError(ValueError):
    pass


def read(root, table: str, columns: Optional[list] = None) -> pa.Table:
    """One table of a sweep folder (or of a folder of sweeps) as a pyarrow Table."""
    if table not in TABLES:
        raise ValueError(f"table: {table!r}; choose one of: {', '.join(TABLES)}")
    root = Path(root)
    folders = [root / "tables" / table] if (root / "tables").is_dir() else \
        sorted(p / "tables" / table for p in root.iterdir() if (p / "tables" / table).is_dir())
    if not folders or not any(f.rglob("*.parquet") for f in folders):
        raise FileNotFoundError(f"{root}: no {table} table (expected tables/{table}/method=*/*.parquet)")
    schema = SCHEMAS[table].append(pa.field("method", pa.string()))
    renamed = RENAMED.get(table, {})
    for old in renamed:
        schema = schema.append(pa.field(old, SCHEMAS[table].field(renamed[old]).type))
    # hidden names (the .tmp files of writers in progress) are ignored by pyarrow's discovery
    parts = [ds.dataset(str(f), schema=schema, format="parquet", partitioning=PARTITIONING).to_table()
             for f in folders]
    out = pa.concat_tables(parts)
    for old, new in renamed.items():
        i = out.schema.get_field_index(new)
        out = out.set_column(i, new, pc.coalesce(out.column(new), out.column(old))).drop_columns([old])
    versions = set(out.column("schema_version").to_pylist())
    if versions - {SCHEMA_VERSION}:
        raise SchemaError(f"{root}: {table} rows have schema_version {sorted(versions - {SCHEMA_VERSION})}; "
                          f"this cts-ray reads version {SCHEMA_VERSION}")
    return out.select(columns) if columns else out


def json_text(value) -> Optional[str]:
    return None if value is None else json.dumps(value, sort_keys=True)
