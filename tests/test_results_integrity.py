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
