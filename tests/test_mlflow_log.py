"""MLflow as its users expect it, read back from real sqlite stores: `cts-ray run --mlflow` logs one
run (params as applied, per-epoch metrics counted within each phase, artifacts beside the store,
its data set as a dataset input) into an experiment tagged for model training."""
import json
import os
import subprocess

from mlflow.tracking import MlflowClient

from conftest import BIN, REPO
from cts_ray.sweep.mlflow_log import EXPERIMENT_KIND, Tracking


def test_run_with_mlflow_logs_one_run_beside_its_store(tmp_path):
    cwd = tmp_path / "work"
    cwd.mkdir()
    p = subprocess.run([str(BIN / "cts-ray"), "run", str(REPO / "configs" / "digits.yaml"), "--set", "training.epochs=4",
                        "--set", "training.milestones=[3]", "--set", "training.lr=0.05", "--set",
                        "training.dense_baseline=false", "--out", "r1", "--quiet", "--mlflow"],
                       cwd=cwd, capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"})
    assert p.returncode == 0, p.stderr[-3000:]
    store = cwd / "results" / "mlflow.db"
    assert f"mlflow: sqlite:///{store}" in p.stdout
    client = MlflowClient(f"sqlite:///{store}")
    exp = client.get_experiment_by_name("cts-ray")
    assert exp.tags[EXPERIMENT_KIND[0]] == EXPERIMENT_KIND[1]
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "r1" and run.data.tags["cts.role"] == "run"
    # params: the values that applied (search.lr null -> the training LR; retrain null -> yes)
    assert run.data.params["search.lr"] == "0.05" and run.data.params["training.retrain"] == "True"
    assert run.data.params["search.density"] == "0.05" and run.data.params["search.method"] == "cts"
    # steps count epochs within each phase: 1 dense epoch to the search point, 2 search, 3 retraining
    steps = lambda key: [m.step for m in client.get_metric_history(run.info.run_id, key)]
    assert steps("dense/test_accuracy") == [1]
    assert steps("search/objective") == [1, 2]
    assert steps("retrain/test_accuracy") == [1, 2, 3]
    summary = json.loads((cwd / "r1" / "summary.json").read_text())
    assert run.data.metrics["test_accuracy"] == summary["test_accuracy"]
    # artifacts beside the store, nothing in ./mlruns of the folder it ran from
    assert not (cwd / "mlruns").exists()
    assert run.info.artifact_uri.startswith((cwd / "results" / "mlartifacts").as_uri())
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"mask.pt", "layers.json", "summary.json"}
    # the data set as an input: name, source, content digest, split sizes (no data)
    (ds,) = run.inputs.dataset_inputs
    assert ds.dataset.name == "digits" and ds.dataset.digest == summary["data"]["digest"]
    profile = json.loads(ds.dataset.profile)
    assert {k: profile[k] for k in ("train_examples", "test_examples")} == {"train_examples": 1437, "test_examples": 360}
    assert profile["input_shape"] == [1, 8, 8] and profile["num_classes"] == 10 and len(profile["mean"]) == 1
    assert not any(k.startswith("system/") for k in run.data.metrics)


def test_an_existing_experiment_is_tagged_for_model_training(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("cts-ray", artifact_location=(tmp_path / "art").as_uri())
    store = Tracking(uri, "cts-ray")
    exp_id = store.open()
    exp = MlflowClient(uri).get_experiment(exp_id)
    assert exp.tags[EXPERIMENT_KIND[0]] == EXPERIMENT_KIND[1] and exp.artifact_location == (tmp_path / "art").as_uri()


def test_a_backlog_of_results_is_logged_whole_in_batches_and_a_restarted_logger_continues_its_runs(tmp_path):
    """The sweep's logger (no Ray needed for its queue): 3 trials x 40 results queued faster than
    the store writes are all logged (every step, params, final tags) in a few calls per run; a new
    logger of the same sweep (a resumed driver) finds those runs with one search and adds no run."""
    import threading

    import yaml

    from cts_ray.config import from_dict
    from cts_ray.sweep.mlflow_log import MLflowLogger
    base = yaml.safe_load((REPO / "configs" / "digits.yaml").read_text())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def logger():
        lg = MLflowLogger(uri, "cts-ray", "backlog", {"searcher": "grid"},
                          resolve=lambda params: from_dict({**base, "seed": params["seed"]}))
        lg.start()
        return lg

    calls = []
    lg = logger()
    lg.flush()
    real = lg.store.client.log_batch
    lg.store.client.log_batch = lambda *a, **k: (calls.append(1), real(*a, **k))[1]   # counts, then logs
    gate = threading.Event()
    lg._later(gate.wait)   # the store is "slow": everything below queues up behind this
    for seed in range(3):
        tid = f"t{seed}"
        lg._later(lg._child, tid, {"seed": seed})
        for step in range(1, 41):
            lg._later(lg._result, tid, {"seed": seed}, {"phase": "retrain", "phase_step": step, "step": step,
                                                        "epoch": step, "test_accuracy": step / 100})
        lg._later(lg._result, tid, {"seed": seed}, {"phase": "final", "status": "finished", "step": 41,
                                                    "test_accuracy": 0.4})
        lg._later(lg._end, tid, {"seed": seed}, "FINISHED")
    lg._later(lg._end_parent, "FINISHED")
    gate.set()
    lg.flush()
    assert lg.failed is None and len(calls) <= 2 * 3 + 1
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cts-ray")
    runs = client.search_runs([exp.experiment_id], "tags.`cts.sweep` = 'backlog' and tags.`cts.role` = 'trial'")
    assert len(runs) == 3
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags["cts.status"] == "finished"
        assert run.data.params["seed"] == run.data.tags["cts.trial_id"][1:] and "search.method" in run.data.params
        history = client.get_metric_history(run.info.run_id, "retrain/test_accuracy")
        assert sorted((m.step, m.value) for m in history) == [(s, s / 100) for s in range(1, 41)]
        assert run.data.metrics["test_accuracy"] == 0.4 and run.data.metrics["step"] == 41
    # a resumed driver: its logger finds the runs, skips steps already logged, creates none
    again = logger()
    again._later(again._child, "t1", {"seed": 1})
    again._later(again._result, "t1", {"seed": 1}, {"phase": "retrain", "phase_step": 40, "step": 40, "epoch": 40,
                                                    "test_accuracy": 0.99})
    again._later(again._result, "t1", {"seed": 1}, {"phase": "retrain", "phase_step": 41, "step": 42, "epoch": 41,
                                                    "test_accuracy": 0.41})
    again._later(again._end, "t1", {"seed": 1}, "FINISHED")
    again.flush()
    runs = client.search_runs([exp.experiment_id], "tags.`cts.sweep` = 'backlog'")
    assert len(runs) == 4 and set(again.known) == {"t0", "t1", "t2"}
    (t1,) = [r for r in runs if r.data.tags.get("cts.trial_id") == "t1"]
    steps = [(m.step, m.value) for m in client.get_metric_history(t1.info.run_id, "retrain/test_accuracy")]
    assert (40, 0.99) not in steps and (41, 0.41) in steps


def test_a_local_store_is_written_without_an_fsync_per_commit_unless_asked(tmp_path, monkeypatch):
    """Tracking.unsynced: every connection MLflow opens to the sqlite file has PRAGMA synchronous=OFF,
    set through SQLAlchemy's public connect event (no handle on MLflow's engine); another file keeps
    sqlite's default, and so does the store with CTS_RAY_MLFLOW_SYNC=full."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine
    seen = []

    def record(dbapi_connection, _record):   # runs after cts-ray's listener, so sees what it set
        file = [row[2] for row in dbapi_connection.execute("PRAGMA database_list")][0]
        seen.append((os.path.realpath(file), dbapi_connection.execute("PRAGMA synchronous").fetchone()[0]))

    fast, full = tmp_path / "fast" / "mlflow.db", tmp_path / "full" / "mlflow.db"
    Tracking(f"sqlite:///{fast}", "e").unsynced()   # cts-ray's listener first
    event.listen(Engine, "connect", record)
    try:
        for db in (fast, full):
            db.parent.mkdir()
            if db == full:
                monkeypatch.setenv("CTS_RAY_MLFLOW_SYNC", "full")
            store = Tracking(f"sqlite:///{db}", "e")
            store.open(unsynced=True)   # as the sweep's logger opens it
            store.client.create_run(store.experiment_id)
    finally:
        event.remove(Engine, "connect", record)
    by_file = {f: {s for g, s in seen if g == f} for f in (os.path.realpath(fast), os.path.realpath(full))}
    assert all(by_file.values()), f"MLflow opened no SQLAlchemy connection to a sqlite store ({seen}): " \
                                  "Tracking.unsynced no longer reaches MLflow's connections"
    assert by_file[os.path.realpath(fast)] == {0} and by_file[os.path.realpath(full)] == {2}   # OFF; FULL
