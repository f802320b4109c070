"""The results schema: three hive-partitioned Parquet datasets per sweep, one file per trial
while it runs, compacted into one file per method when the sweep ends.

    <sweep>/tables/trials/method=<m>/<trial_id>.parquet   one row per trial (final numbers, status)
    <sweep>/tables/epochs/method=<m>/<trial_id>.parquet   one row per epoch of every phase
    <sweep>/tables/layers/method=<m>/<trial_id>.parquet   one row per prunable layer of the ticket
    <sweep>/tables/<table>/method=<m>/compacted-<time_ns>-<pid>.parquet   many trials' rows (``compact``)

Each file is written atomically (storage.atomic), so no reader ever sees half a file, and
it is named by trial id, so a retried or resumed trial replaces its own rows instead of adding
more. Every row carries ``schema_version``; readers refuse versions they do not know. Columns
added later are nullable and read as null from older files, so they need no new version.

A trial's rows come from exactly one file: its own per-trial file when there is one (a trial
written again after a compaction wins), else the newest compacted file that holds it. ``compact``
writes the new compacted file before it removes anything, so a reader (``read``) sees every row
once at every moment, a crash included; a plain ``pyarrow.dataset`` read of the folder is exact
once the sweep has finished.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from .. import records
from ..errors import AnalysisError, SchemaError
from ..methods import applies
from ..storage import atomic

SCHEMA_VERSION = 1
TABLES = ("trials", "epochs", "layers")

_TYPES = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}


def _schema_of(*parts) -> pa.Schema:
    """``parts``: record classes (records.py) and (name, Python type) pairs, in column order; a
    field with a unit (records.py) carries it as the Parquet field's metadata ``{"unit": …}``."""
    cols, units = [("schema_version", int)], {}
    for p in parts:
        cols += [p] if isinstance(p, tuple) else records.columns(p)
        units.update({} if isinstance(p, tuple) else records.units(p))
    return pa.schema([pa.field(n, pa.int32() if n == "schema_version" else _TYPES[t],
                               metadata={"unit": units[n]} if n in units else None) for n, t in cols])


# every table's columns come from the records they hold (records.py): add a field there, not here
SCHEMAS = {
    "trials": _schema_of(records.Keys, records.Axes, records.Trial, records.Summary),
    "epochs": _schema_of(records.Keys, records.Axes, ("node_id", str), records.Epoch),
    "layers": _schema_of(records.Keys, records.Axes, records.Layer),
}
# columns renamed since version 1 (old name -> new): files written before are read under the new name
RENAMED = {"trials": {"best_test_accuracy": "peak_test_accuracy"}}
# every table is partitioned by method; the column comes back from the folder names
PARTITIONING = ds.partitioning(pa.schema([("method", pa.string())]), flavor="hive")


AXIS_KEYS = records.AXIS_KEYS   # each axis column and the config key it comes from


def axes(cfg) -> dict:
    """The swept axes of a trial (``records.Axes``), from its resolved Config."""
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


def write(root, table: str, method: str, trial_id: str, rows: list[dict], common: dict) -> Path:
    """Write one trial's rows of ``table`` atomically; returns the file's path."""
    schema = SCHEMAS[table]
    full = [{**{n: None for n in schema.names}, **common, **r, "schema_version": SCHEMA_VERSION} for r in rows]
    data = pa.Table.from_pylist([{n: row[n] for n in schema.names} for row in full], schema=schema)
    folder = Path(root) / "tables" / table / f"method={method}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{trial_id}.parquet"
    with atomic(path) as f:
        pq.write_table(data, f)
    return path


READ_CHUNK = 256   # per-trial files read per pyarrow dataset: 2,000 at once held ~300 MiB more for the read
COMPACTED = "compacted-"   # a compacted file's name: compacted-<time_ns>-<pid>.parquet (no trial id has a '-')


def _listing(folder: Path) -> dict:
    """A table folder's visible files: {partition dir name: (per-trial {trial_id: path}, compacted
    paths newest first)}. Hidden names (writers' temporary files) are left out, as pyarrow does."""
    out = {}
    try:
        parts = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith((".", "_")))
    except FileNotFoundError:
        return out
    for part in parts:
        own, compacted = {}, []
        try:
            names = [e.name for e in os.scandir(folder / part)]
        except FileNotFoundError:
            continue
        for name in names:
            if name.startswith((".", "_")) or not name.endswith(".parquet"):
                continue
            if name.startswith(COMPACTED):
                compacted.append(name)
            else:
                own[name[:-len(".parquet")]] = folder / part / name
        compacted.sort(key=_generation, reverse=True)
        out[part] = (own, [folder / part / n for n in compacted])
    return out


def _generation(name: str) -> tuple:
    try:
        return (int(name[len(COMPACTED):].split("-")[0]), name)
    except ValueError:
        return (-1, name)


def _read_folder(folder: Path, schema: pa.Schema, listing: dict) -> pa.Table:
    """Every trial's rows once: from its per-trial file, else from the newest compacted file holding it."""
    parts = []
    for part, (own, compacted) in listing.items():
        files = [str(p) for _, p in sorted(own.items())]
        for i in range(0, len(files), READ_CHUNK):   # a dataset keeps every file's metadata while it lives
            parts.append(ds.dataset(files[i:i + READ_CHUNK], schema=schema, format="parquet",
                                    partitioning=PARTITIONING, partition_base_dir=str(folder)).to_table())
        seen = pa.array(sorted(own), pa.string())
        for path in compacted:
            t = ds.dataset([str(path)], schema=schema, format="parquet", partitioning=PARTITIONING,
                           partition_base_dir=str(folder)).to_table()
            ids = t.column("trial_id")
            if len(seen):
                t = t.filter(pc.invert(pc.is_in(ids, value_set=seen)))
            parts.append(t)
            seen = pa.concat_arrays([seen, pc.unique(ids).cast(pa.string())])
    if not parts:
        return schema.empty_table()
    out = pa.concat_tables(parts)
    # one order whatever the layout: by partition, then trial id, rows of a trial as written (stable)
    return out.take(pc.sort_indices(out, [("method", "ascending"), ("trial_id", "ascending")]))


def _read_consistent(folder: Path, schema: pa.Schema) -> pa.Table:
    """Read a table folder while a compaction may be replacing files: read again when a file listed
    vanished or the compacted files changed meanwhile (a listing is not one instant)."""
    for attempt in range(20):
        before = _listing(folder)
        try:
            out = _read_folder(folder, schema, before)
        except (FileNotFoundError, OSError) as e:
            if attempt < 19 and ("No such file" in str(e) or isinstance(e, FileNotFoundError)):
                time.sleep(0.01 * (attempt + 1))
                continue
            raise
        after = _listing(folder)
        stable = all(after.get(part, ({}, []))[1] == compacted and set(own) <= set(after.get(part, ({}, []))[0])
                     for part, (own, compacted) in before.items()) and \
            all(not after[part][1] for part in after if part not in before)
        if stable:
            return out
        time.sleep(0.01 * (attempt + 1))
    return out


def _schema(table: str) -> pa.Schema:
    schema = SCHEMAS[table].append(pa.field("method", pa.string()))
    renamed = RENAMED.get(table, {})
    for old in renamed:
        schema = schema.append(pa.field(old, SCHEMAS[table].field(renamed[old]).type))
    return schema


def read(root, table: str, columns: Optional[list] = None) -> pa.Table:
    """One table of a sweep folder (or of a folder of sweeps) as a pyarrow Table, rows ordered by
    method and trial id."""
    if table not in TABLES:
        raise ValueError(f"table: {table!r}; choose one of: {', '.join(TABLES)}")
    root = Path(root)
    folders = [root / "tables" / table] if (root / "tables").is_dir() else \
        sorted(p / "tables" / table for p in root.iterdir() if (p / "tables" / table).is_dir())
    if not folders or not any(own or compacted for f in folders for own, compacted in _listing(f).values()):
        raise FileNotFoundError(f"{root}: no {table} table (expected tables/{table}/method=*/*.parquet)")
    renamed, schema = RENAMED.get(table, {}), _schema(table)
    try:
        out = pa.concat_tables([_read_consistent(f, schema) for f in folders])
    except (pa.ArrowException, OSError) as e:   # a damaged file (torn copy, bad disk): one line naming it
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise AnalysisError(f"{root}: the {table} table cannot be read ({why}); expected the Parquet files "
                            "cts-ray wrote (move the damaged one away)") from None
    for old, new in renamed.items():
        i = out.schema.get_field_index(new)
        out = out.set_column(i, new, pc.coalesce(out.column(new), out.column(old))).drop_columns([old])
    versions = set(out.column("schema_version").to_pylist())
    if versions - {SCHEMA_VERSION}:
        raise SchemaError(f"{root}: {table} rows have schema_version {sorted(versions - {SCHEMA_VERSION})}; "
                          f"this cts-ray reads version {SCHEMA_VERSION}")
    return out.select(columns) if columns else out


def compact(root, tables_=TABLES) -> dict:
    """Merge each table partition's per-trial files (and older compacted files) into one compacted
    file; returns {table: files merged}. Run when no trial of the sweep is writing (``run_sweep``
    calls it after Tune returns). Order, so that a reader sees every row exactly once throughout:
    write the new compacted file (temporary name, then rename: it is the newest), then remove the
    older compacted files (every trial of theirs is in the new one, or overridden by its own file),
    then the per-trial files merged, each only if it is still the file that was read (a trial that
    wrote again meanwhile keeps its newer file, which wins). A crash anywhere leaves extra copies
    that readers pass over; the next compaction removes them."""
    root = Path(root)
    merged = {}
    for table in tables_:
        folder = root / "tables" / table
        merged[table] = 0
        schema = _schema(table)
        for part, (own, compacted) in _listing(folder).items():
            if not own and len(compacted) <= 1:
                continue
            stats = {}
            for tid, path in own.items():
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                stats[path] = (st.st_ino, st.st_mtime_ns, st.st_size)
            data = _read_folder(folder, schema, {part: ({t: p for t, p in own.items() if p in stats}, compacted)})
            versions = set(data.column("schema_version").to_pylist())
            if versions - {SCHEMA_VERSION}:
                continue   # rows this cts-ray cannot vouch for stay as they are (``read`` refuses them)
            for old, new in RENAMED.get(table, {}).items():
                i = data.schema.get_field_index(new)
                data = data.set_column(i, new, pc.coalesce(data.column(new), data.column(old)))
            data = data.select(SCHEMAS[table].names)
            name = f"{COMPACTED}{time.time_ns()}-{os.getpid()}.parquet"
            with atomic(folder / part / name) as f:
                pq.write_table(data, f)
            for path in compacted:
                path.unlink(missing_ok=True)
            for path, st in stats.items():
                try:
                    now = path.stat()
                except FileNotFoundError:
                    continue
                if (now.st_ino, now.st_mtime_ns, now.st_size) == st:
                    path.unlink(missing_ok=True)
            merged[table] += len(stats) + len(compacted)
    return merged
