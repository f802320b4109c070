"""Sweeps through the real `cts-ray sweep` command on a real two-node Ray cluster (two raylets on
this machine), with real MLflow stores and real Parquet tables."""
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from cts_ray.errors import EXIT_TRIALS_FAILED
from cts_ray.sweep import spec as spec_mod, tables

from conftest import BIN, REPO, _free_port, _run, _sweep_file

SMALL = {"training.epochs": 4, "training.milestones": [3], "resources.cpus": 1}


def test_quickstart_sweep_end_to_end(ray_cluster, tmp_path):
    """The README's quickstart sweep, scaled down: Parquet tables, MLflow parent/child runs, cache."""
    f = tmp_path / "quick.yaml"
    raw = yaml.safe_load((REPO / "tune_configs" / "quickstart.yaml").read_text())
    raw.update(name="quick", storage=str(tmp_path / "sweeps"), base=str(REPO / "configs" / "digits.yaml"))
    raw["set"] = {**raw["set"], **SMALL}
    raw["grid"] = {"search.method": ["cts", "random"], "search.density": [0.1, 0.02], "seed": [0, 1]}
    f.write_text(yaml.safe_dump(raw))
    p = _run([f, "--address", ray_cluster, "--quiet"], tmp_path)
    root = tmp_path / "sweeps" / "quick"
    assert "cts" in p.stdout and "trials table" in p.stdout

    trials = tables.read(root, "trials").to_pylist()
    assert len(trials) == 8 and {t["status"] for t in trials} == {"finished"}
    assert {(t["method"], t["target_density"], t["seed"]) for t in trials} == \
        {(m, d, s) for m in ("cts", "random") for d in (0.1, 0.02) for s in (0, 1)}
    for t in trials:
        cfg = json.loads(t["config"])
        assert cfg["search"]["method"] == t["method"] and cfg["seed"] == t["seed"]
        assert t["config_hash"] and t["mask_sha256"] and t["code_version"] and Path(t["mask_path"]).exists()
        assert json.loads(t["library_versions"])["torch"].startswith("2.14.1")
        assert abs(t["achieved_density"] - t["target_density"]) < 0.002
        assert 0 < t["effective_kept"] <= t["kept_weights"] and t["collapsed"] == 0
        assert t["effective_density"] == t["effective_kept"] / t["prunable_weights"]
    # schema: every documented column, in the documented types
    for name in tables.TABLES:
        table = tables.read(root, name)
        assert table.schema.names == tables.SCHEMAS[name].names + ["method"]
        assert set(table.column("schema_version").to_pylist()) == {tables.SCHEMA_VERSION}
    epochs = tables.read(root, "epochs").to_pylist()
    by_trial = {}
    for r in epochs:
        by_trial.setdefault(r["trial_id"], []).append(r)
    for tid, rows in by_trial.items():
        phases = [r["phase"] for r in rows]
        assert phases.count("retrain") == 3 and phases.count("dense") == 4, (tid, phases)
    layers = tables.read(root, "layers").to_pylist()
    assert len(layers) == 8 * 3
    assert all(r["effective_kept"] <= r["kept"] and 0 < r["alive_units"] <= r["units"] for r in layers)
    for t in trials:   # the layers add up to the trial's effective count
        assert sum(r["effective_kept"] for r in layers if r["trial_id"] == t["trial_id"]) == t["effective_kept"]
    assert any(line.startswith("method") and "effective" in line for line in p.stdout.splitlines())
    # the finished sweep's tables are compacted: one file per method, which plain pyarrow/pandas read too
    files = sorted((root / "tables" / "trials").rglob("*.parquet"))
    assert [f.parent.name for f in files] == ["method=cts", "method=random"]
    assert all(f.name.startswith(tables.COMPACTED) and len(pq.read_table(f)) == 4 for f in files)

    # shared dense runs: 2 seeds -> 2 dense trainings for 8 trials
    cache = tmp_path / "sweeps" / "_cache" / "dense"
    assert len(list(cache.glob("*/dense.pt"))) == 2
    assert sum(not t["dense_cache_hit"] for t in trials) == 2
    # ... and no trial held a slot waiting for its seed's: each reader started once the run was cached
    made = {json.loads(p.read_text())["dense_identity"]["seed"]: json.loads(p.read_text())["time"]
            for p in cache.glob("*/dense.made_by.json")}
    for t in trials:
        if t["dense_cache_hit"]:
            assert t["started_at"] >= made[t["seed"]] - 0.5, t   # (made_by.json is written just after dense.pt)

    # MLflow: one parent, one child per trial, params = the resolved config, metrics with steps
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path / 'sweeps' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cts-ray")
    runs = client.search_runs([exp.experiment_id], "tags.`cts.sweep` = 'quick'")
    parents = [r for r in runs if r.data.tags.get("cts.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("cts.role") == "trial"]
    assert len(parents) == 1 and len(children) == 8
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    child = children[0]
    assert child.data.params["search.method"] in ("cts", "random")
    assert child.info.status == "FINISHED" and "test_accuracy" in child.data.metrics
    rows = {t["trial_id"]: t for t in trials}
    for c in children:
        t = rows[c.data.tags["cts.trial_id"]]
        assert c.data.metrics["effective_density"] == pytest.approx(t["effective_density"])
        assert c.data.metrics["collapsed"] == t["collapsed"]
    history = client.get_metric_history(child.info.run_id, "retrain/test_accuracy")
    assert [m.step for m in history] == [1, 2, 3]   # the retraining epochs, counted within the phase
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert [d.dataset.name for d in child.inputs.dataset_inputs] == ["digits"]
    assert not any(k.startswith("system/") for k in child.data.metrics)   # system metrics: off by default
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"mask.pt", "layers.json"} <= artifacts


def test_fractional_gpus_pack_four_trials_on_one_gpu(ray_cluster, tmp_path):
    f = _sweep_file(tmp_path, "frac", {"base": str(REPO / "configs" / "digits.yaml"),
                                       # trials long enough (~5-10 s) that worker start-up
                                       # stagger cannot hide their overlap
                                       "set": {**SMALL, "resources.gpus": 0.25, "resources.cpus": 0.25,
                                               "training.epochs": 40, "training.milestones": [30]},
                                       "grid": {"seed": [0, 1, 2, 3]}, "searcher": "grid"})
    _run([f, "--address", ray_cluster, "--quiet"], tmp_path)
    trials = tables.read(tmp_path / "sweeps" / "frac", "trials").to_pylist()
    assert len(trials) == 4
    # all four ran on the one node with a GPU, at the same time
    assert len({t["node_id"] for t in trials}) == 1
    latest_start = max(t["started_at"] for t in trials)
    earliest_end = min(t["ended_at"] for t in trials)
    assert latest_start < earliest_end, "the four 0.25-GPU trials did not overlap"


def test_two_node_cluster_places_trials_on_both_nodes(ray_cluster, tmp_path):
    f = _sweep_file(tmp_path, "nodes", {"base": str(REPO / "configs" / "digits.yaml"),
                                        "set": {**SMALL, "resources.cpus": 1, "training.epochs": 6},
                                        "grid": {"seed": [0, 1, 2, 3]}})
    _run([f, "--address", ray_cluster, "--quiet"], tmp_path)
    trials = tables.read(tmp_path / "sweeps" / "nodes", "trials").to_pylist()
    nodes = {t["node_id"] for t in trials}
    assert len(nodes) == 2, nodes
    epochs = tables.read(tmp_path / "sweeps" / "nodes", "epochs").to_pylist()
    assert {r["node_id"] for r in epochs} == nodes


def test_optuna_sweep_is_seeded_and_its_study_reopens(ray_cluster, tmp_path):
    body = {"base": str(REPO / "configs" / "digits.yaml"), "set": {**SMALL, "resources.cpus": 1},
            "sample": {"search.temperature": {"loguniform": [0.2, 2.0]}, "search.length": {"choice": [0.25, 0.5]}},
            "searcher": "optuna", "num_samples": 4, "seed": 7, "max_concurrent": 2}
    f = _sweep_file(tmp_path, "opt", body)
    _run([f, "--address", ray_cluster, "--quiet"], tmp_path)
    import optuna
    study = optuna.load_study(study_name="opt", storage=f"sqlite:///{tmp_path / 'sweeps' / 'opt' / 'optuna.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 4 and all(0 <= t.value <= 1 for t in done)
    temps = sorted(t.params["search.temperature"] for t in done)
    trials = tables.read(tmp_path / "sweeps" / "opt", "trials").to_pylist()
    assert sorted(t["temperature"] for t in trials) == pytest.approx(temps)
    # the same seed proposes the same first configurations (TPE starts with seeded random draws)
    f2 = _sweep_file(tmp_path, "opt2", {**body, "num_samples": 2, "max_concurrent": 1})
    _run([f2, "--address", ray_cluster, "--quiet"], tmp_path)
    again = optuna.load_study(study_name="opt2", storage=f"sqlite:///{tmp_path / 'sweeps' / 'opt2' / 'optuna.db'}")
    first = [t.params["search.temperature"] for t in sorted(study.trials, key=lambda t: t.number)[:1]]
    assert [t.params["search.temperature"] for t in again.trials[:1]] == pytest.approx(first)


def test_mlflow_server_receives_a_sweeps_runs(ray_cluster, tmp_path):
    port = _free_port()
    server = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        f = _sweep_file(tmp_path, "served", {"base": str(REPO / "configs" / "digits.yaml"),
                                             "set": {**SMALL, "resources.cpus": 1},
                                             "grid": {"seed": [0, 1]}})
        _run([f, "--address", ray_cluster, "--quiet"], tmp_path, env={"MLFLOW_TRACKING_URI": url})
        exps = json.load(urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=cts-ray"))
        body = json.dumps({"experiment_ids": [exps["experiment"]["experiment_id"]], "max_results": 100}).encode()
        req = urllib.request.Request(f"{url}/api/2.0/mlflow/runs/search", data=body,
                                     headers={"Content-Type": "application/json"})
        runs = json.load(urllib.request.urlopen(req))["runs"]
        roles = sorted(next(t["value"] for t in r["data"]["tags"] if t["key"] == "cts.role") for r in runs)
        assert roles == ["parent", "trial", "trial"]
        assert not (tmp_path / "sweeps" / "mlflow.db").exists()   # the server was used, not the default store
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_bad_sweep_files_are_refused_before_ray_starts(tmp_path):
    base = {"base": str(REPO / "configs" / "digits.yaml")}
    cases = [
        ({**base, "grid": {"search.density": []}}, "grid.search.density: empty list"),
        ({**base, "grid": {"search.density": [0.1, 2.0]}}, "search.density: 2.0 is out of range"),
        ({**base, "grid": {"search.method": ["cts", "nope"]}}, "search.method: 'nope' is not allowed"),
        ({**base, "searcher": "hyperband"}, "searcher: 'hyperband' is not allowed"),
        ({**base, "sample": {"search.temperature": {"loguniform": [0, 1]}}, "searcher": "optuna"}, "must be > 0"),
        ({**base, "set": {"resources.gpus": -0.25}}, "resources.gpus"),
        ({**base, "bogus": 1}, "bogus: unknown sweep key"),
        ({**base, "grid": {"search.method": ["gates"]}, "set": {"training.retrain": True}}, "contradicts"),
    ]
    for i, (body, message) in enumerate(cases):
        f = _sweep_file(tmp_path, f"bad{i}", body)
        p = subprocess.run([str(BIN / "cts-ray"), "sweep", str(f)], capture_output=True, text=True, cwd=tmp_path)
        assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, (body, p.stderr)
    assert not (tmp_path / "sweeps").exists()


def test_ltr_trials_of_one_seed_share_their_rounds(ray_cluster, tmp_path):
    """Two LTR trials (2 and 4 rounds) of one seed: rounds 1-2 are trained once, not twice."""
    f = _sweep_file(tmp_path, "ltr", {"base": str(REPO / "configs" / "digits.yaml"),
                                      "set": {**SMALL, "resources.cpus": 1, "search.method": "ltr"},
                                      "grid": {"search.density": [0.64, 0.41]}, "max_concurrent": 2})
    _run([f, "--address", ray_cluster, "--quiet"], tmp_path)
    rounds = sorted(p.name for p in (tmp_path / "sweeps" / "_cache" / "dense").glob("*-ltr-*/round*.pt"))
    assert rounds == ["round001.pt", "round002.pt", "round003.pt", "round004.pt"]
    trials = {t["target_density"]: t for t in tables.read(tmp_path / "sweeps" / "ltr", "trials").to_pylist()}
    short, long = json.loads(trials[0.64]["levels"]), json.loads(trials[0.41]["levels"])
    assert [lv["round"] for lv in long] == [1, 2, 3, 4] and long[:2] == short
    assert all(0 < lv["effective_density"] <= lv["density"] and lv["collapsed_layers"] == [] for lv in long)
    assert trials[0.41]["ticket_seconds"] > trials[0.64]["ticket_seconds"]   # shared rounds still counted
    # two slots, yet the deeper trial did not hold one waiting for rounds 1-2: it started after them
    assert trials[0.41]["started_at"] >= trials[0.64]["ended_at"]


def test_killed_driver_then_resume_finishes_only_unfinished_trials(ray_cluster, tmp_path):
    f = _sweep_file(tmp_path, "resumed", {"base": str(REPO / "configs" / "digits.yaml"),
                                          "set": {**SMALL, "resources.cpus": 1, "training.epochs": 30,
                                                  "training.milestones": [20]},
                                          # two densities a seed: trials share dense runs, so the
                                          # shared-work searcher (whose trial ids are random) runs them
                                          "grid": {"seed": [0, 1, 2], "search.density": [0.05, 0.1]},
                                          "max_concurrent": 2})
    root = tmp_path / "sweeps" / "resumed"
    # Tune snapshots its state at its first step and then not for an hour: every trial it starts
    # later is one the resumed sweep's Tune state does not know (as happens, in the 10 s or more
    # between real snapshots, to trials that start and end in between)
    driver = subprocess.Popen([str(BIN / "cts-ray"), "sweep", str(f), "--address", ray_cluster, "--quiet"],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True, env={**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "3600"})
    deadline = time.time() + 240
    while time.time() < deadline:
        done = list((root / "tables" / "trials").rglob("*.parquet")) if (root / "tables").exists() else []
        if len(done) >= 3:
            break
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    killed_at = time.time()
    before = {t["trial_id"]: t for t in tables.read(root, "trials").to_pylist()}
    assert 3 <= len(before) < 6, "the kill came too late to test resuming"
    running = {p.stem for p in (root / "progress").glob("*.pt")}   # saved an epoch, not finished
    from ray.tune import ExperimentAnalysis
    from cts_ray.sweep.resume import orphans, tune_trial_ids
    assert tune_trial_ids(root / "tune") == {t.trial_id for t in ExperimentAnalysis(str(root / "tune")).trials}
    forgotten = [o for os_ in orphans(root).values() for o in os_]
    assert any(o["status"] == "finished" for o in forgotten), "no finished trial unknown to Tune's state"
    _run([f, "--address", ray_cluster, "--quiet", "--resume"], tmp_path)
    after = {t["trial_id"]: t for t in tables.read(root, "trials").to_pylist()}
    assert len(after) == 6 and {t["status"] for t in after.values()} == {"finished"}
    assert sorted((t["seed"], t["target_density"]) for t in after.values()) == \
        [(s, d) for s in (0, 1, 2) for d in (0.05, 0.1)]
    for tid, row in before.items():     # finished before the kill: not run again
        assert after[tid]["started_at"] == row["started_at"] and after[tid]["ended_at"] == row["ended_at"]
    rerun = [t for t in after.values() if t["ended_at"] > killed_at]
    assert len(rerun) == 6 - len(before)   # only the unfinished ones ran after the kill
    for tid in running:   # those running went on from their last saved epoch, under their own id
        assert after[tid]["started_at"] < killed_at < after[tid]["ended_at"], tid
    assert not list((root / "progress").iterdir()) and not list((root / "trials").glob(".*partial*"))
    assert {p.name for p in (root / "trials").iterdir()} == set(after)
    # the same trials as an uninterrupted sweep: one per grid point, by config
    from cts_ray.config import from_dict
    spec = spec_mod.load(f)
    assert sorted(t["config_hash"] for t in after.values()) == \
        sorted(from_dict(spec.trial_raw(p)).hash for p in spec.grid_points())
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path / 'sweeps' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cts-ray")
    runs = client.search_runs([exp.experiment_id], "tags.`cts.sweep` = 'resumed'")
    assert sorted(r.data.tags["cts.role"] for r in runs) == ["parent"] + ["trial"] * 6   # no duplicates
    trial_runs = [r for r in runs if r.data.tags["cts.role"] == "trial"]
    assert {r.data.tags["cts.trial_id"] for r in trial_runs} == set(after)   # one each, by the rows' ids
    assert {r.info.status for r in trial_runs} == {"FINISHED"}
    for r in trial_runs:
        assert r.data.metrics["test_accuracy"] == pytest.approx(after[r.data.tags["cts.trial_id"]]["test_accuracy"])
    # each trial's epochs appear once
    epochs = tables.read(root, "epochs").to_pylist()
    keys = [(r["trial_id"], r["phase"], r["epoch"]) for r in epochs]
    assert len(keys) == len(set(keys))


def test_relative_data_root_is_resolved_on_the_driver(ray_cluster, tmp_path, mnist_root):
    """Trials run in other folders (and on other nodes): a relative data.root means the driver's."""
    f = _sweep_file(tmp_path, "mnist", {"base": str(REPO / "configs" / "mnist_lenet300.yaml"),
                                        "set": {"data.root": os.path.relpath(mnist_root, tmp_path),
                                                "data.subset": 600, "training.epochs": 2,
                                                "resources.cpus": 1, "search.method": "magnitude",
                                                "search.density": 0.5},
                                        "grid": {"seed": [0]}})
    _run([f, "--address", ray_cluster, "--quiet"], tmp_path)
    [row] = tables.read(tmp_path / "sweeps" / "mnist", "trials").to_pylist()
    assert row["status"] == "finished" and row["dataset"] == "mnist" and row["test_accuracy"] > 0.5


def test_diverging_trial_stops_with_its_reason_and_others_finish(ray_cluster, tmp_path):
    f = _sweep_file(tmp_path, "diverge", {"base": str(REPO / "configs" / "digits.yaml"),
                                          "set": {**SMALL, "resources.cpus": 1, "training.momentum": 0},
                                          "grid": {"training.lr": [0.1, 1.0e30]}})
    p = _run([f, "--address", ray_cluster, "--quiet"], tmp_path, code=EXIT_TRIALS_FAILED)
    rows = {t["config_hash"]: t for t in tables.read(tmp_path / "sweeps" / "diverge", "trials").to_pylist()}
    by_lr = {json.loads(t["config"])["training"]["lr"]: t for t in rows.values()}
    assert by_lr[0.1]["status"] == "finished"
    error = by_lr[1e30]["error"].lower()
    assert by_lr[1e30]["status"] == "diverged" and ("became nan" in error or "became inf" in error), error
    # the summary the command prints names the trial and the reason
    assert f"diverged: trial {by_lr[1e30]['trial_id']} (seed 0): {by_lr[1e30]['error']}" in p.stdout
    # it stopped at once (in its first epoch), well before the healthy trial's full run ended
    bad, good = by_lr[1e30], by_lr[0.1]
    assert "epoch 1 " in bad["error"]
    epochs = tables.read(tmp_path / "sweeps" / "diverge", "epochs").to_pylist()
    ran = {t["trial_id"]: sum(r["trial_id"] == t["trial_id"] for r in epochs) for t in (bad, good)}
    assert ran[bad["trial_id"]] <= 1 < ran[good["trial_id"]], ran   # (epochs, not wall: robust to a busy machine)
    # exit 3 and a last line with the count and the command that retries: first run and --resume alike
    retry = f"retry them with: cts-ray sweep {f} --resume --retry-failed --address {ray_cluster}"
    for p in (p, _run([f, "--address", ray_cluster, "--quiet", "--resume"], tmp_path, code=EXIT_TRIALS_FAILED)):
        last = p.stdout.strip().splitlines()[-1]
        assert last.startswith("one trial of this sweep failed or diverged") and last.endswith(retry), last


def _trial_pids(root) -> dict:
    """Tune's per-trial result.json lines carry the worker's pid and what the trial reported."""
    out = {}
    for f in (root / "tune").glob("trial_*/result.json"):
        for line in f.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue   # a line being written
            out.setdefault(r["trial_id"], []).append(r)
    return out


def test_killed_trial_workers_are_retried_from_their_checkpoints(ray_cluster, tmp_path):
    """SIGKILL the process running one trial mid-search and the other's mid-retraining: Tune retries
    each from its last checkpoint (search state or retraining state); every trial ends up exactly
    once in Parquet and MLflow, and no epoch row is duplicated."""
    n_epochs = 300   # long enough (digits epochs take ~25 ms) that both trials are still running when caught
    f = _sweep_file(tmp_path, "killed", {"base": str(REPO / "configs" / "digits.yaml"),
                                         "set": {**SMALL, "resources.cpus": 1, "training.epochs": n_epochs,
                                                 "training.milestones": [200], "search.length": 1.0,
                                                 "training.dense_baseline": False},   # dense only to the search point
                                         "grid": {"seed": [0, 1]}, "max_failures": 2})
    root = tmp_path / "sweeps" / "killed"
    driver = subprocess.Popen([str(BIN / "cts-ray"), "sweep", str(f), "--address", ray_cluster, "--quiet"],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victims, deadline = {}, time.time() + 240   # phase -> (trial id, pid, records of that phase so far)
    while len(victims) < 2 and time.time() < deadline:
        for tid, results in (_trial_pids(root).items() if (root / "tune").exists() else []):
            if tid in {v[0] for v in victims.values()}:
                continue
            search = [r for r in results if r.get("phase") == "search"]
            retrain = [r for r in results if r.get("phase") == "retrain"]
            for phase, done in (("search", search if 5 <= len(search) and not retrain else []),
                                ("retrain", retrain if len(retrain) >= 5 else [])):
                if phase not in victims and done:   # mid-phase, with checkpoints behind it
                    try:
                        os.kill(done[-1]["pid"], signal.SIGKILL)
                    except ProcessLookupError:   # its worker is already gone (the trial ended): not a victim
                        continue
                    victims[phase] = (tid, done[-1]["pid"], len(done))
                    break
        time.sleep(0.02)
    assert len(victims) == 2, f"the trials were not caught mid-search and mid-retraining: {victims}"
    out, _ = driver.communicate(timeout=300)
    assert driver.returncode == 0, out[-3000:]

    for phase, (tid, pid, count) in victims.items():
        results = _trial_pids(root)[tid]
        assert len({r["pid"] for r in results}) == 2, f"the {phase} victim was not retried in a new worker"
        # the retry restored the checkpoint: no dense training again, and the phase went on from there
        after = [r for r in results if r["pid"] != pid]
        assert not any(r.get("phase") == "dense" for r in after)
        if phase == "retrain":
            assert not any(r.get("phase") == "search" for r in after)
        assert [r["epoch"] for r in after if r.get("phase") == phase][0] >= count

    trials = tables.read(root, "trials").to_pylist()
    assert sorted(t["seed"] for t in trials) == [0, 1] and {t["status"] for t in trials} == {"finished"}
    epochs = tables.read(root, "epochs").to_pylist()
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path / 'sweeps' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cts-ray")
    runs = client.search_runs([exp.experiment_id], "tags.`cts.sweep` = 'killed'")
    assert sorted(r.data.tags["cts.role"] for r in runs) == ["parent", "trial", "trial"]
    for tid, _, _ in victims.values():
        mine = [(r["phase"], r["epoch"]) for r in epochs if r["trial_id"] == tid]
        assert len(mine) == len(set(mine))
        assert sorted(e for p, e in mine if p == "search") == list(range(1, n_epochs + 1))
        assert sorted(e for p, e in mine if p == "retrain") == list(range(2, n_epochs + 1))
        child = next(r for r in runs if r.data.tags.get("cts.trial_id") == tid)
        for metric, n in (("search/objective", n_epochs), ("retrain/test_accuracy", n_epochs - 1)):
            steps = [m.step for m in client.get_metric_history(child.info.run_id, metric)]
            assert len(steps) == len(set(steps)) == n, metric
        assert child.info.status == "FINISHED"


def test_mlflow_server_down_loses_no_parquet_results(ray_cluster, tmp_path):
    f = _sweep_file(tmp_path, "nomlflow", {"base": str(REPO / "configs" / "digits.yaml"), "set": SMALL,
                                           "grid": {"seed": [0, 1]},
                                           "mlflow": {"tracking_uri": f"http://127.0.0.1:{_free_port()}",
                                                      "experiment": "cts-ray"}})
    p = subprocess.run([str(BIN / "cts-ray"), "sweep", str(f), "--address", ray_cluster, "--quiet"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300,
                       env={**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                            "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "MLflow logging failed: parent run:" in p.stderr and "Parquet tables are unaffected" in p.stderr
    trials = tables.read(tmp_path / "sweeps" / "nomlflow", "trials").to_pylist()
    assert sorted(t["seed"] for t in trials) == [0, 1] and {t["status"] for t in trials} == {"finished"}
    epochs = tables.read(tmp_path / "sweeps" / "nomlflow", "epochs").to_pylist()
    for seed in (0, 1):   # every epoch of every phase is there: 4 dense, 2 search, 3 retraining
        phases = [r["phase"] for r in epochs if r["seed"] == seed]
        assert (phases.count("dense"), phases.count("search"), phases.count("retrain")) == (4, 2, 3), phases


def _claim(args):
    from cts_ray.sweep.trainable import adopt
    root, tune_id, forgotten = args
    return tune_id, adopt(Path(root), "h", tune_id, forgotten)[0]


def test_each_forgotten_trial_is_adopted_once_and_a_void_claim_frees_it(tmp_path):
    """trainable.adopt, from several processes at once; resume.orphans on the next resume."""
    from concurrent.futures import ProcessPoolExecutor

    from cts_ray.sweep.resume import orphans
    from cts_ray.sweep.trainable import adopt
    root = tmp_path / "s"
    root.mkdir()
    forgotten = {"h": [{"trial_id": f"o{i}", "status": None} for i in range(4)]}
    with ProcessPoolExecutor(4) as pool:
        got = dict(pool.map(_claim, [(str(root), f"t{i}", forgotten) for i in range(8)]))
    adopted = sorted(v for v in got.values() if v.startswith("o"))
    assert adopted == ["o0", "o1", "o2", "o3"]                     # each once
    assert sum(k == v for k, v in got.items()) == 4                # the other four run as themselves
    holder = {v: k for k, v in got.items() if v.startswith("o")}
    assert adopt(root, "h", holder["o2"], forgotten)[0] == "o2"    # a retried trial: its own claim again
    assert adopt(root, "other", "t9", forgotten) == ("t9", None)   # another point adopts nothing
    # the next resume's Tune state knows the holders of o0 and o1 only: o2 and o3 are free again
    (root / "tune").mkdir()
    state = {"trial_data": [[json.dumps({"trial_id": holder[o]}), "{}"] for o in ("o0", "o1")]}
    (root / "tune" / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps(state))
    (root / "progress").mkdir()
    for i in range(4):
        (root / "progress" / f"o{i}.json").write_text(json.dumps({"config_hash": "h"}))
    assert orphans(root) == {"h": [{"trial_id": "o2", "status": None}, {"trial_id": "o3", "status": None}]}
    assert sorted(p.name for p in (root / "adopted").iterdir()) == ["o0", "o1"]
