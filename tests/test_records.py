"""records.py is the one definition of what a run produces: the tables, MLflow names and Tune
reports are derived from it, and tables written before the columns were reordered still read."""
import dataclasses

import pyarrow as pa
import pyarrow.parquet as pq

from cts_ray import records as R
from cts_ray.sweep import spec, tables
from cts_ray.sweep.mlflow_log import Tracking


def test_tables_are_the_records_fields():
    trials = tables.SCHEMAS["trials"].names
    assert trials[0] == "schema_version"
    for cls in (R.Keys, R.Axes, R.Trial):
        assert all(R.column_name(f) in trials for f in dataclasses.fields(cls))
    summary_columns = [R.column_name(f) for f in dataclasses.fields(R.Summary) if f.metadata["column"]]
    assert summary_columns and all(c in trials for c in summary_columns)
    assert "layer_densities" not in trials and "collapsed" in trials   # summary.json only; a count
    assert tables.SCHEMAS["epochs"].names[-len(dataclasses.fields(R.Epoch)):] == [c for c, _ in R.columns(R.Epoch)]
    assert tables.SCHEMAS["epochs"].field("lambda").type == pa.float64()
    assert tables.SCHEMAS["trials"].field("levels").type == pa.string()   # JSON text


def test_units_are_in_the_parquet_schema(tmp_path):
    """Accuracies and densities are fractions (0 to 1), seconds are seconds: said on each Parquet
    field, in the file a trial writes and in what a read gives back."""
    fractions = {"trials": ["test_accuracy", "peak_test_accuracy", "dense_test_accuracy", "target_density",
                            "achieved_density", "effective_density", "compact_flops_fraction"],
                 "epochs": ["train_accuracy", "test_accuracy", "expected_density", "hard_density"],
                 "layers": ["density"]}
    for table, names in fractions.items():
        for name in names:
            assert tables.SCHEMAS[table].field(name).metadata == {b"unit": b"fraction"}, (table, name)
    assert tables.SCHEMAS["trials"].field("ticket_seconds").metadata == {b"unit": b"s"}
    assert tables.SCHEMAS["trials"].field("status").metadata is None
    path = tables.write(tmp_path, "trials", "cts", "t1", [{"status": "finished", "test_accuracy": 0.9}],
                        {"sweep": "s", "trial_id": "t1"})
    assert pq.read_schema(path).field("test_accuracy").metadata == {b"unit": b"fraction"}
    assert tables.read(tmp_path, "trials").schema.field("test_accuracy").metadata == {b"unit": b"fraction"}


def test_metrics_derive_from_the_fields():
    assert set(R.TUNE_METRICS) <= set(R.FINAL_METRICS) <= set(tables.SCHEMAS["trials"].names)
    assert spec.METRICS == R.TUNE_METRICS and set(R.COMPARED) <= set(R.TUNE_METRICS)
    assert R.REPORTED[:3] == ("status", "node_id", "run_dir")
    # an epoch record as the pipeline emits it: the rename to the column and MLflow's name
    rec = {"phase": "search", "epoch": 3, "objective": 0.5, "lambda": 2.0, "cached": False, "extra": 1}
    row = R.Epoch.from_record(rec).row()
    assert row["search_objective"] == 0.5 and row["lambda"] == 2.0 and "extra" not in row
    assert R.Epoch.from_row(row).metrics() == {"search/epoch": 3.0, "search/objective": 0.5, "search/lambda": 2.0}
    metrics = Tracking("sqlite:///unused.db", "x").result_metrics({"phase": "search", "row": __import__("json").dumps(row),
                                                                   "phase_step": 2}, 7)
    assert {m.key for m in metrics} == {"search/epoch", "search/objective", "search/lambda", "step"}
    assert {m.step for m in metrics if m.key != "step"} == {2}


def test_final_metrics_and_trial_row():
    summary = {"test_accuracy": 0.9, "peak_test_accuracy": 0.95, "achieved_density": 0.1, "ticket_seconds": 2.0,
               "dense_test_accuracy": None, "effective_density": 0.05, "effective_kept": 10,
               "collapsed_layers": ["fc1"], "levels": [{"round": 1}], "layer_densities": {"fc1": 0.1}}
    final = R.final_metrics(summary)
    assert final["collapsed"] == 1 and "dense_test_accuracy" not in final and "collapsed_layers" not in final
    row = R.Trial(status="finished", config={"seed": 0}).row(summary)
    assert row["collapsed"] == 1 and row["levels"] == '[{"round": 1}]' and row["config"] == '{"seed": 0}'
    assert "layer_densities" not in row and row["status"] == "finished"


def test_tables_in_the_old_column_order_still_read(tmp_path):
    """Files written before records.py ordered the trials columns differently: read by name."""
    common = {"sweep": "s", "trial_id": "a", "config_hash": "h"}
    tables.write(tmp_path, "trials", "cts", "a", [{"status": "finished", "test_accuracy": 0.5}], common)
    new = pq.read_table(tmp_path / "tables" / "trials" / "method=cts" / "a.parquet")
    old = new.select(list(reversed(new.schema.names))).set_column(
        new.schema.names[::-1].index("trial_id"), "trial_id", pa.array(["b"]))
    pq.write_table(old, tmp_path / "tables" / "trials" / "method=cts" / "b.parquet")
    got = tables.read(tmp_path, "trials")
    assert got.schema.names == tables.SCHEMAS["trials"].names + ["method"]
    assert sorted(got.column("trial_id").to_pylist()) == ["a", "b"]
    assert got.column("test_accuracy").to_pylist() == [0.5, 0.5]
    tables.compact(tmp_path)
    assert sorted(tables.read(tmp_path, "trials").column("trial_id").to_pylist()) == ["a", "b"]
