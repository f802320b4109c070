"""Result tables under concurrent writers, readers racing writers, crashed writers and foreign
schema versions: no row lost, no half file seen, nothing misread."""
import multiprocessing as mp

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cts_ray.sweep import tables

WRITERS, TRIALS_EACH, EPOCH_ROWS = 6, 15, 4000


def _common(i):
    return {"sweep": "race", "trial_id": f"t{i:04d}", "config_hash": f"h{i:04d}", "seed": i,
            "target_density": 0.1}


def _write_many(root, first, n, barrier):
    barrier.wait()   # all writers start together
    for i in range(first, first + n):
        tables.write(root, "trials", "cts", f"t{i:04d}", [{"status": "finished", "test_accuracy": i / 1000}],
                     _common(i))


def _rewrite(root, times, barrier):
    barrier.wait()
    for k in range(times):
        tables.write(root, "epochs", "cts", "t0000", [{"phase": "retrain", "epoch": e, "lr": float(k)}
                                                     for e in range(EPOCH_ROWS)], _common(0))


def test_concurrent_writers_lose_no_rows(tmp_path):
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(WRITERS)
    procs = [ctx.Process(target=_write_many, args=(tmp_path, w * TRIALS_EACH, TRIALS_EACH, barrier))
             for w in range(WRITERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    rows = tables.read(tmp_path, "trials").to_pylist()
    assert sorted(r["trial_id"] for r in rows) == [f"t{i:04d}" for i in range(WRITERS * TRIALS_EACH)]
    assert all(r["test_accuracy"] == int(r["trial_id"][1:]) / 1000 for r in rows)
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]


def test_a_reader_racing_a_writer_never_sees_half_a_file(tmp_path):
    tables.write(tmp_path, "epochs", "cts", "t0000", [{"phase": "retrain", "epoch": e} for e in range(EPOCH_ROWS)],
                 _common(0))
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    writer = ctx.Process(target=_rewrite, args=(tmp_path, 60, barrier))
    writer.start()
    barrier.wait()
    reads = 0
    while writer.is_alive() or reads < 5:
        t = tables.read(tmp_path, "epochs", ["epoch", "lr"])
        assert t.num_rows == EPOCH_ROWS and len(set(t.column("lr").to_pylist())) == 1   # one whole version
        reads += 1
    writer.join()
    assert writer.exitcode == 0 and reads >= 5


def test_a_crashed_writers_leftover_is_ignored(tmp_path):
    tables.write(tmp_path, "trials", "cts", "t0001", [{"status": "finished"}], _common(1))
    folder = tmp_path / "tables" / "trials" / "method=cts"
    (folder / ".t0002.parquet.tmp-999").write_bytes(b"PAR1 half a file")   # killed mid-write
    assert [r["trial_id"] for r in tables.read(tmp_path, "trials").to_pylist()] == ["t0001"]


@pytest.mark.parametrize("version", [0, tables.SCHEMA_VERSION + 1])
def test_other_schema_versions_are_refused_not_misread(tmp_path, version):
    path = tables.write(tmp_path, "trials", "cts", "t0001", [{"status": "finished"}], _common(1))
    t = pq.read_table(path)
    pq.write_table(t.set_column(0, "schema_version", pa.array([version], pa.int32())), path)
    with pytest.raises(tables.SchemaError, match=rf"schema_version \[{version}\]; this cts-ray reads version "
                                                 rf"{tables.SCHEMA_VERSION}"):
        tables.read(tmp_path, "trials")


def test_a_file_missing_columns_is_refused(tmp_path):
    """A table written by something else (columns renamed or missing) is an error, not nulls."""
    folder = tmp_path / "tables" / "trials" / "method=cts"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"trial_id": ["x"], "acc": [0.5]}), folder / "x.parquet")
    with pytest.raises(tables.SchemaError, match="schema_version"):
        tables.read(tmp_path, "trials")


# ---- compaction: per-trial files merged into one file per table partition when a sweep ends
def _sweep_tables(root, n=24):
    """n trials over two methods, each with its rows in the three tables (per-trial files)."""
    for i in range(n):
        method = ("cts", "snip")[i % 2]
        tables.write(root, "trials", method, f"t{i:04d}", [{"status": "finished", "test_accuracy": i / 100,
                                                             "kept_weights": i}], _common(i))
        tables.write(root, "epochs", method, f"t{i:04d}", [{"phase": "retrain", "epoch": e, "lr": i + e / 10}
                                                            for e in range(5)], _common(i))
        tables.write(root, "layers", method, f"t{i:04d}", [{"layer": f"l{k}", "kept": i * k} for k in range(3)],
                     _common(i))
    return {t: tables.read(root, t) for t in tables.TABLES}


def _files(root, table):
    return sorted(p.relative_to(root / "tables" / table).as_posix()
                  for p in (root / "tables" / table).rglob("*") if p.is_file())


def test_compaction_keeps_every_row_once_with_identical_values(tmp_path):
    before = _sweep_tables(tmp_path)
    assert tables.compact(tmp_path) == {"trials": 24, "epochs": 24, "layers": 24}
    for t in tables.TABLES:
        files = _files(tmp_path, t)
        assert len(files) == 2 and all(f.split("/")[1].startswith(tables.COMPACTED) for f in files), files
        assert tables.read(tmp_path, t).equals(before[t]), t   # same rows, values and order
    # a plain pyarrow read of a finished sweep's folder is exact too
    plain = pq.read_table(tmp_path / "tables" / "epochs", partitioning="hive")
    assert plain.num_rows == before["epochs"].num_rows
    assert tables.compact(tmp_path) == {"trials": 0, "epochs": 0, "layers": 0}   # nothing left to merge


def test_a_trial_written_after_compaction_wins_and_is_merged_by_the_next(tmp_path):
    _sweep_tables(tmp_path)
    tables.compact(tmp_path)
    # a --resume reruns t0003 and --extend adds t0100: per-trial files beside the compacted ones
    tables.write(tmp_path, "trials", "snip", "t0003", [{"status": "error", "error": "again"}], _common(3))
    tables.write(tmp_path, "trials", "cts", "t0100", [{"status": "finished"}], _common(100))
    tables.write(tmp_path, "epochs", "snip", "t0003", [{"phase": "dense", "epoch": 1}], _common(3))
    mixed = {t: tables.read(tmp_path, t) for t in tables.TABLES}
    rows = {r["trial_id"]: r for r in mixed["trials"].to_pylist()}
    assert len(rows) == 25 == mixed["trials"].num_rows
    assert rows["t0003"]["status"] == "error" and rows["t0003"]["test_accuracy"] is None   # the new row, whole
    assert [r["epoch"] for r in mixed["epochs"].to_pylist() if r["trial_id"] == "t0003"] == [1]
    assert mixed["epochs"].num_rows == 23 * 5 + 1
    tables.compact(tmp_path)
    for t in tables.TABLES:
        assert tables.read(tmp_path, t).equals(mixed[t]), t
        assert all(f.split("/")[1].startswith(tables.COMPACTED) for f in _files(tmp_path, t))


def test_every_state_a_crashed_compaction_can_leave_reads_the_same(tmp_path):
    """Compaction writes the new file, then removes the old compacted file, then the per-trial
    files: a crash between any two steps (or halfway through the removals) loses and doubles nothing."""
    import shutil
    _sweep_tables(tmp_path, 10)
    tables.compact(tmp_path)
    old = next((tmp_path / "tables" / "trials" / "method=cts").glob(f"{tables.COMPACTED}*"))
    for i in range(10, 16):   # more trials of a resumed sweep, then its compaction
        tables.write(tmp_path, "trials", ("cts", "snip")[i % 2], f"t{i:04d}", [{"status": "finished"}], _common(i))
    expected = tables.read(tmp_path, "trials")
    folder = tmp_path / "tables" / "trials" / "method=cts"
    saved = tmp_path / "saved"
    shutil.copytree(folder, saved)
    tables.compact(tmp_path)
    assert tables.read(tmp_path, "trials").equals(expected)
    own = sorted(p.name for p in saved.iterdir() if not p.name.startswith(tables.COMPACTED))
    states = [[old.name, *own], own, own[:1], [old.name, *own[1:]]]   # what was not yet removed
    for left in states:
        for name in left:
            shutil.copy2(saved / name, folder / name)
        assert tables.read(tmp_path, "trials").equals(expected), left
        for name in left:
            (folder / name).unlink()
    (folder / ".compacted-1-2.parquet.tmp").write_bytes(b"PAR1 half")   # killed while writing
    assert tables.read(tmp_path, "trials").equals(expected)


def _compact_repeatedly(root, times, barrier):
    barrier.wait()
    for k in range(times):
        for i in range(0, 40, 7):   # some trials written again (same rows), then everything merged
            tables.write(root, "trials", "cts", f"t{i:04d}", [{"status": "finished", "test_accuracy": i / 1000}],
                         _common(i))
        tables.compact(root)


def test_a_reader_racing_compactions_sees_every_row_exactly_once(tmp_path):
    for i in range(40):
        tables.write(tmp_path, "trials", "cts", f"t{i:04d}", [{"status": "finished", "test_accuracy": i / 1000}],
                     _common(i))
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    worker = ctx.Process(target=_compact_repeatedly, args=(tmp_path, 25, barrier))
    worker.start()
    barrier.wait()
    reads = 0
    while worker.is_alive() or reads < 5:
        rows = tables.read(tmp_path, "trials", ["trial_id", "test_accuracy"]).to_pylist()
        assert [r["trial_id"] for r in rows] == [f"t{i:04d}" for i in range(40)]
        assert all(r["test_accuracy"] == int(r["trial_id"][1:]) / 1000 for r in rows)
        reads += 1
    worker.join()
    assert worker.exitcode == 0 and reads >= 5


def test_a_compacted_file_of_another_schema_version_is_refused_and_left_alone(tmp_path):
    tables.write(tmp_path, "trials", "cts", "t0001", [{"status": "finished"}], _common(1))
    tables.compact(tmp_path)
    [path] = (tmp_path / "tables" / "trials" / "method=cts").glob(f"{tables.COMPACTED}*")
    t = pq.read_table(path)
    pq.write_table(t.set_column(0, "schema_version", pa.array([tables.SCHEMA_VERSION + 1], pa.int32())), path)
    tables.write(tmp_path, "trials", "cts", "t0002", [{"status": "finished"}], _common(2))
    tables.compact(tmp_path)   # does not rewrite rows it cannot vouch for
    assert path.exists() and (tmp_path / "tables" / "trials" / "method=cts" / "t0002.parquet").exists()
    with pytest.raises(tables.SchemaError, match="schema_version"):
        tables.read(tmp_path, "trials")
