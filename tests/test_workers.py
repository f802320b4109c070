"""``resources.workers`` (issue 26 points 1 and 4): a sweep trial of N data-parallel workers runs
through Ray Train inside Tune and is still one trial with one record — one row, each epoch once,
one MLflow run — and the one-worker result; a killed worker restarts the group, which goes on from
the trial's last saved epoch. Bad resource settings are refused in one line before any work."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cts_ray import config as C
from cts_ray import pipeline
from cts_ray.errors import EXIT_BAD_INPUT
from cts_ray.masking import Mask
from cts_ray.sweep import tables

from conftest import BIN, REPO, _sweep_file

TWO = {"resources.workers": 2, "resources.cpus": 0.5}


@pytest.mark.parametrize("command, sets, expected", [
    ("run", {"resources.gpus": 2},
     "resources.gpus: 2 GPUs for one process would leave all but one idle; set resources.workers: 2 with "
     "resources.gpus: 1 (each worker's GPUs)"),
    ("sweep", {"resources.workers": 2, "training.batch_size": 63},
     "training.batch_size: 63 does not divide among resources.workers: 2; expected a multiple of 2, e.g. 62"),
    ("run", {"resources.workers": 0}, "resources.workers: 0 is out of range; expected an integer 1..64"),
    ("sweep", {"resources.workers": 65}, "resources.workers: 65 is out of range; expected an integer 1..64"),
    ("sweep", {"resources.workers": 2, "resources.gpus": 0.5},
     "resources.gpus: 0.5 with resources.workers: 2; each data-parallel worker needs a GPU of its own: expected 0 "
     "(CPU, gloo) or 1"),
    ("run", {"resources.workers": 2}, "resources.workers: 2 workers run as a sweep trial (Ray Train starts them); "
     "cts-ray run is one process: use cts-ray sweep, or resources.workers: 1"),
])
def test_bad_resources_are_refused_in_one_line(tmp_path, command, sets, expected):
    if command == "run":
        args = ["run", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")], "--out", tmp_path / "run"]
    else:
        args = ["sweep", _sweep_file(tmp_path, "bad", {"base": str(REPO / "configs" / "digits.yaml"), "set": sets}),
                "--dry-run"]
    p = subprocess.run([str(BIN / "cts-ray"), *map(str, args)], capture_output=True, text=True, cwd=tmp_path,
                       timeout=120)
    assert p.returncode == EXIT_BAD_INPUT and p.stderr.strip() == f"cts-ray: error: {expected}", p.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweeps" / "bad").exists()


def test_workers_are_hash_neutral_and_not_swept(tmp_path):
    one = C.load(None, [])
    assert C.load(None, ["resources.workers=4", "resources.cpus=0.5"]).hash == one.hash
    f = _sweep_file(tmp_path, "swept", {"base": str(REPO / "configs" / "digits.yaml"),
                                        "grid": {"resources.workers": [1, 2]}})
    p = subprocess.run([str(BIN / "cts-ray"), "sweep", str(f), "--dry-run"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert p.returncode == EXIT_BAD_INPUT and "grid.resources.workers: every trial of a sweep runs with the same " \
        "workers" in p.stderr
    f = _sweep_file(tmp_path, "shown", {"base": str(REPO / "configs" / "digits.yaml"), "set": TWO})
    p = subprocess.run([str(BIN / "cts-ray"), "sweep", str(f), "--dry-run"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert "resources: each trial 2 data-parallel workers (Ray Train, gloo) of 0.5 CPU each" in p.stdout, p.stdout


def _epoch_keys(root: Path) -> list:
    return [(r["phase"], r["round"], r["epoch"]) for r in tables.read(root, "epochs").to_pylist()]


def _mlflow_trial_runs(tmp_path: Path, sweep: str) -> list:
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path / 'sweeps' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cts-ray")
    runs = client.search_runs([exp.experiment_id], f"tags.`cts.sweep` = '{sweep}'")
    return [r for r in runs if r.data.tags.get("cts.role") == "trial"]


def _train_workers(trial_id: str) -> list[int]:
    """The pids of the Ray Train workers of the trial ``trial_id`` (Train runs them in a working
    folder named after its run, which the trial names after itself)."""
    pids = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (d / "cmdline").read_bytes().decode(errors="replace")
            cwd = os.readlink(d / "cwd")
        except OSError:
            continue
        if "RayTrainWorker" in cmd and trial_id in cwd:
            pids.append(int(d.name))
    return sorted(pids)


def _wait_for(what, timeout: float, poll: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = what()
        if got:
            return got
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s")


def _same_as_one_worker(row: dict, out: Path) -> None:
    """The trial's result is that of its config run in one process (the engine is exact up to float
    order on an MLP): the same mask up to CTS's logits at the margin (the issue's overlap ≥ 0.99),
    the same accuracy within 1 %; ``resources.workers`` is not in the hash."""
    cfg = C.from_dict({**json.loads(row["config"]), "resources": {}})
    assert cfg.resources.workers == 1 and cfg.hash == row["config_hash"]
    one = pipeline.run(cfg, out, progress=False)
    a, b = Mask.load(Path(row["mask_path"])).flat(), Mask.load(out / "mask.pt").flat()
    assert (a & b).sum() / b.sum() >= 0.99
    assert row["achieved_density"] == pytest.approx(one["achieved_density"], abs=1e-3)
    assert row["test_accuracy"] == pytest.approx(one["test_accuracy"], abs=0.01)


def test_a_two_worker_trial_is_one_trial_with_the_one_worker_result_through_a_killed_worker(
        ray_cluster, tmp_path, one_thread):
    """One sweep (each costs tens of seconds of start-up here): a worker is killed mid-trial, Ray
    Train restarts the group, which goes on from the last saved epoch to the one-worker result."""
    # dense only to the search point (epoch 1), then 4 search epochs and 7 of retraining
    small = {"training.epochs": 8, "training.milestones": [6], "training.dense_baseline": False,
             "search.density": 0.2}
    f = _sweep_file(tmp_path, "two", {"base": str(REPO / "configs" / "digits.yaml"), "set": {**small, **TWO}})
    root = tmp_path / "sweeps" / "two"
    sweep = subprocess.Popen([str(BIN / "cts-ray"), "sweep", str(f), "--address", ray_cluster, "--quiet"],
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the first search epoch saved: the dense epoch is reported, the search under way
        saved = _wait_for(lambda: list((root / "progress").glob("*.pt")), timeout=150)
        trial_id = saved[0].stem
        workers = _wait_for(lambda: _train_workers(trial_id), timeout=10)
        assert len(workers) == 2
        os.kill(workers[-1], signal.SIGKILL)
        out, err = sweep.communicate(timeout=240)
    finally:
        sweep.kill()
    assert sweep.returncode == 0, out[-3000:] + err[-3000:]
    [row] = tables.read(root, "trials").to_pylist()
    assert row["status"] == "finished" and row["trial_id"] == trial_id, row["error"]
    keys = _epoch_keys(root)
    assert len(keys) == len(set(keys)) == 1 + 4 + 7   # every epoch once: none lost, none twice
    assert len(_mlflow_trial_runs(tmp_path, "two")) == 1
    # a new group went on from the saved epoch: it reported that epoch again, never the dense one
    results = [json.loads(line) for line in next((root / "tune").glob("*/result.json")).read_text().splitlines()]
    steps = [r["step"] for r in results]
    again = {s for s in steps if steps.count(s) > 1}
    assert again and min(again) > 1, steps
    _wait_for(lambda: not _train_workers(trial_id), timeout=20)   # the groups are gone with the trial
    _same_as_one_worker(row, tmp_path / "one")
