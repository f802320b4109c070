"""A resume accounts for every grid point, whatever state Tune left (issue 24 point 2), and
--retry-failed runs failed and diverged trials again in place of their old rows and MLflow runs
(issue 23 point 3). Real `cts-ray sweep` processes on the two-raylet test cluster, real Parquet,
real MLflow sqlite; the faults are real files damaged on disk."""
import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from cts_ray.sweep import spec as spec_mod, tables
from cts_ray.sweep.resume import check, missing

from conftest import BIN, REPO, _damage_dense_run, _run, _sweep_file

DIGITS = str(REPO / "configs" / "digits.yaml")
# killed after its first row: one trial finished, one running (saved progress), one not started
SEEDS = {"base": DIGITS, "set": {"training.epochs": 5, "training.milestones": [4], "resources.cpus": 1},
         "grid": {"search.density": [0.1], "seed": [0, 1, 2]}, "max_concurrent": 2}


def _sweep(args, cwd):
    return subprocess.run([str(BIN / "cts-ray"), "sweep", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def _mlflow_trial_runs(storage: Path, sweep: str) -> list:
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cts-ray")
    runs = client.search_runs([exp.experiment_id], f"tags.`cts.sweep` = '{sweep}'")
    assert sum(r.data.tags["cts.role"] == "parent" for r in runs) == 1
    return [r for r in runs if r.data.tags["cts.role"] == "trial"]


def _by_seed(root: Path, table: str) -> dict:
    seed = {t["trial_id"]: t["seed"] for t in tables.read(root, "trials").to_pylist()}
    return Counter(seed[r["trial_id"]] for r in tables.read(root, table, ["trial_id"]).to_pylist())


@pytest.fixture(scope="module")
def unbroken(ray_cluster, tmp_path_factory):
    """The sweep run once without a fault: what a damaged one must end up with."""
    tmp = tmp_path_factory.mktemp("unbroken")
    _run([_sweep_file(tmp, "whole", SEEDS), "--address", ray_cluster, "--quiet"], tmp)
    root = tmp / "sweeps" / "whole"
    acc = {t["seed"]: t["test_accuracy"] for t in tables.read(root, "trials").to_pylist()}
    return {"accuracy": acc, "epochs": _by_seed(root, "epochs"), "layers": _by_seed(root, "layers")}


def _kill_mid_sweep(f: Path, root: Path, address: str, cwd: Path) -> None:
    driver = subprocess.Popen([str(BIN / "cts-ray"), "sweep", str(f), "--address", address, "--quiet"],
                              cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list((root / "tables").rglob("*.parquet")):
        time.sleep(0.1)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()


def _damage(state_dir: Path, how: str, forget=()) -> None:
    """Truncate Tune's newest experiment state file, or delete from it the trials ``forget``
    (default: the first trial in it that saved progress and has no row: it was running)."""
    newest = sorted(state_dir.glob("experiment_state-*.json"))[-1]
    if how == "truncate":
        newest.write_bytes(newest.read_bytes()[:len(newest.read_bytes()) // 2])
        return
    state = json.loads(newest.read_text())
    ids = [json.loads(t)["trial_id"] for t, _ in state["trial_data"]]
    root = state_dir.parent
    rows = set(tables.read(root, "trials")["trial_id"].to_pylist())
    running = {p.stem for p in (root / "progress").glob("*.json")} - rows
    forget = set(forget) or {next((i for i in ids if i in running), ids[0])}
    state["trial_data"] = [d for d, i in zip(state["trial_data"], ids) if i not in forget]
    newest.write_text(json.dumps(state))


def test_a_resume_after_a_truncated_tune_state_has_every_grid_point_once(unbroken, ray_cluster, tmp_path):
    """(Trials Tune's state forgets: the retry test below deletes one from it, and test_sweep's
    killed driver resumes past its last snapshot.)"""
    f = _sweep_file(tmp_path, "broken", SEEDS)
    root = tmp_path / "sweeps" / "broken"
    _kill_mid_sweep(f, root, ray_cluster, tmp_path)
    before = {t["trial_id"]: t for t in tables.read(root, "trials").to_pylist()}
    assert 1 <= len(before) < 3, "the kill came too late to test resuming"
    _damage(root / "tune", "truncate")

    p = _run([f, "--address", ray_cluster, "--quiet", "--resume"], tmp_path)
    after = tables.read(root, "trials").to_pylist()
    assert sorted(t["seed"] for t in after) == [0, 1, 2] and {t["status"] for t in after} == {"finished"}
    assert "not run" not in p.stdout and (root / "tune.1").is_dir()   # what Tune lost ran in a new experiment
    for t in after:   # the same numbers as the sweep that never broke
        assert t["test_accuracy"] == pytest.approx(unbroken["accuracy"][t["seed"]], abs=1e-9), t["seed"]
    for tid, row in before.items():   # finished before the kill: kept, not run again
        assert {t["trial_id"]: t["ended_at"] for t in after}[tid] == row["ended_at"]
    for table in ("epochs", "layers"):
        assert _by_seed(root, table) == unbroken[table], table
    epochs = tables.read(root, "epochs").to_pylist()
    keys = [(r["trial_id"], r["phase"], r["round"], r["epoch"]) for r in epochs]
    assert len(keys) == len(set(keys))
    assert ds.dataset(root / "tables" / "trials", format="parquet").count_rows() == 3   # compacted: once each
    runs = _mlflow_trial_runs(tmp_path / "sweeps", "broken")
    assert sorted(r.data.tags["cts.trial_id"] for r in runs) == sorted(t["trial_id"] for t in after)
    acc = {t["trial_id"]: t["test_accuracy"] for t in after}
    for r in runs:
        assert r.info.status == "FINISHED"
        assert r.data.metrics["test_accuracy"] == pytest.approx(acc[r.data.tags["cts.trial_id"]])
    assert not list((root / "progress").glob("*"))


def test_an_optuna_sweep_resumed_from_a_truncated_state_reaches_its_trials_and_tells_the_study_once(
        ray_cluster, tmp_path):
    f = _sweep_file(tmp_path, "opt", {**SEEDS, "grid": {}, "searcher": "optuna", "num_samples": 3, "seed": 3,
                                      "sample": {"search.temperature": {"loguniform": [0.2, 2.0]}}})
    root = tmp_path / "sweeps" / "opt"
    _kill_mid_sweep(f, root, ray_cluster, tmp_path)
    assert 1 <= len(tables.read(root, "trials")) < 3, "the kill came too late to test resuming"
    _damage(root / "tune", "truncate")
    _run([f, "--address", ray_cluster, "--quiet", "--resume"], tmp_path)
    trials = tables.read(root, "trials").to_pylist()
    assert len(trials) == 3 and {t["status"] for t in trials} == {"finished"}
    import optuna
    study = optuna.load_study(study_name="opt", storage=f"sqlite:///{root / 'optuna.db'}")
    states = Counter(t.state for t in study.trials)
    assert states[optuna.trial.TrialState.RUNNING] == 0 and states[optuna.trial.TrialState.COMPLETE] == 3
    done = sorted(t.params["search.temperature"] for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    assert sorted(t["temperature"] for t in trials) == pytest.approx(done)


def test_retry_failed_runs_failed_and_diverged_trials_again_in_place(ray_cluster, tmp_path):
    f = _sweep_file(tmp_path, "retry", {"base": DIGITS, "max_failures": 0,
                                        "set": {"training.epochs": 3, "training.milestones": [2],
                                                "resources.cpus": 1, "training.momentum": 0},
                                        "grid": {"training.lr": [0.1, 1.0e30]}})
    root, storage = tmp_path / "sweeps" / "retry", tmp_path / "sweeps"
    p = _sweep([f, "--retry-failed"], tmp_path)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "add --resume" in p.stderr, p.stderr
    damaged = _damage_dense_run(f, {"training.lr": 0.1})   # the cached dense run of lr 0.1 does not load
    p = _sweep([f, "--address", ray_cluster, "--quiet"], tmp_path)
    assert p.returncode != 0
    first = {t["status"]: t for t in tables.read(root, "trials").to_pylist()}
    assert sorted(first) == ["diverged", "error"]
    runs = {r.data.tags["cts.trial_id"]: r for r in _mlflow_trial_runs(storage, "retry")}
    assert sorted(runs) == sorted(t["trial_id"] for t in first.values())
    failed = runs[first["error"]["trial_id"]]   # searchable by its row's status, as a finished run is
    assert failed.info.status == "FAILED" and failed.data.tags["cts.status"] == "error"

    damaged.unlink()   # the cause fixed; and Tune's state forgot the diverged trial
    _damage(root / "tune", "forget", [first["diverged"]["trial_id"]])
    p = _sweep([f, "--address", ray_cluster, "--quiet", "--resume", "--retry-failed"], tmp_path)
    again = {t["trial_id"]: t for t in tables.read(root, "trials").to_pylist()}
    assert set(again) == {t["trial_id"] for t in first.values()}   # one row each: replaced, not doubled
    assert again[first["error"]["trial_id"]]["status"] == "finished"
    diverged = again[first["diverged"]["trial_id"]]
    assert diverged["status"] == "diverged" and diverged["ended_at"] > first["diverged"]["ended_at"]
    assert ds.dataset(root / "tables" / "trials", format="parquet").count_rows() == 2
    epochs = tables.read(root, "epochs").to_pylist()
    keys = [(r["trial_id"], r["phase"], r["round"], r["epoch"]) for r in epochs]
    assert len(keys) == len(set(keys))
    runs = _mlflow_trial_runs(storage, "retry")
    assert sorted(r.data.tags["cts.trial_id"] for r in runs) == sorted(again)   # one run each
    for r in runs:
        row = again[r.data.tags["cts.trial_id"]]
        assert r.data.tags["cts.status"] == row["status"] and r.info.status == "FINISHED"
        if row["status"] == "finished":
            assert r.data.metrics["test_accuracy"] == pytest.approx(row["test_accuracy"])


def test_a_resume_takes_the_grid_an_interrupted_extend_recorded(tmp_path):
    """No Ray: the recorded grid is the truth, and what lacks a row is what a resume runs."""
    body = {"base": DIGITS, "grid": {"search.density": [0.1], "seed": [0, 1]}}
    f = _sweep_file(tmp_path, "grown", body)
    root = tmp_path / "sweeps" / "grown"
    (root / "tune").mkdir(parents=True)
    grown = spec_mod.load(f, ["grid.seed=[0,1,2]"])
    record = {**grown.record(), "extended": [{"grid": {"search.density": [0.1], "seed": [0, 1]}, "added": 1}]}
    (root / "sweep.json").write_text(json.dumps(record))
    spec = spec_mod.load(f)
    assert check(spec, resume=True) is None and spec.grid["seed"] == [0, 1, 2]
    with pytest.raises(Exception, match=r"grid.seed: \[0, 1, 2\] -> \[0, 3\]"):
        check(spec_mod.load(f, ["grid.seed=[0,3]"]), resume=True)
    from cts_ray.config import from_dict
    cfgs = {s: from_dict(spec.trial_raw({"search.density": 0.1, "seed": s})) for s in (0, 1, 2)}
    have = [{"trial_id": f"t{s}", "config_hash": cfgs[s].hash, "config": json.dumps(cfgs[s].to_dict())} for s in (0, 1)]
    assert missing(spec, have) == [{"search.density": 0.1, "seed": 2}]
    spec.num_samples = 2
    assert missing(spec, have) == [{"search.density": 0.1, "seed": s} for s in (0, 1, 2, 2)]
    # a row hashed by an older cts-ray counts for its point by its swept values; one whose values
    # read otherwise, by its config hash
    older = {"trial_id": "t2", "config_hash": "older", "config": json.dumps(cfgs[2].to_dict())}
    assert missing(spec, have + [older]) == [{"search.density": 0.1, "seed": s} for s in (0, 1, 2)]
    other = {**have[1], "trial_id": "t1b", "config": json.dumps({**cfgs[1].to_dict(), "seed": "1"})}
    assert missing(spec, have + [older, other]) == [{"search.density": 0.1, "seed": s} for s in (0, 2)]
    # the summary lists what has no row, by point, with the reason
    from cts_ray.sweep.summary import format_summary, summarise
    spec.num_samples = 1
    text = format_summary(summarise(spec, {have[0]["config_hash"]: "its trial failed before it wrote a row (X)"}))
    assert "not run (3 trials with no row):" in text
    assert "  density=0.1, seed=0: its trial failed before it wrote a row (X); --resume runs it" in text
    assert "  density=0.1, seed=2: not started; --resume runs it" in text
