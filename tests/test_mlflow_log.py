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
