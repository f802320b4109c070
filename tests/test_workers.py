"""``resources.workers`` (issue 26 points 1 and 4): a sweep trial of N data-parallel workers runs
through Ray Train inside Tune and is still one trial with one record — one row, each epoch once,
one MLflow run — and the one-worker result, under ASHA, the shared dense cache, Ctrl-C and
--resume; a trial whose workers fail is a failed trial. (A lost worker's group restart from the
last saved epoch: test_cluster_launch's node-loss test.) Bad resource settings are refused in one
line before any work."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cts_ray import config as C
from cts_ray import pipeline
from cts_ray.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED
from cts_ray.masking import Mask
from cts_ray.sweep import tables

from conftest import BIN, REPO, _damage_dense_run, _running, _sweep_file

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


def _train_controllers(address: str) -> list[int]:
    """The pids of the Ray Train controllers on the cluster at ``address`` (a controller runs in no
    trial's folder: it is found as a worker process of one of that cluster's raylets)."""
    procs = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (d / "cmdline").read_bytes().decode(errors="replace")
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        procs[int(d.name)] = (ppid, cmd)
    port = address.rsplit(":", 1)[1]   # the raylets name the head by its node IP, not as given
    raylets = {pid for pid, (_, cmd) in procs.items()
               if "/raylet" in cmd and any(a.startswith("--gcs-address=") and a.endswith(f":{port}")
                                           for a in cmd.split("\0"))}
    return sorted(pid for pid, (ppid, cmd) in procs.items() if ppid in raylets and "TrainController" in cmd)


def test_two_worker_trials_under_asha_through_an_interrupt_and_resume_are_one_worker_trials(
        ray_cluster, tmp_path, one_thread):
    """Two trials of 2 workers sharing one seed's dense run, in grid order: the better ticket
    first, interrupted (SIGINT) once it saved a search epoch; --resume continues it from that
    epoch, then ASHA stops the worse one at its first rung (as test_sweep_honesty's one-worker
    sweep), its Train controller and workers going with it. Each trial: one row, each epoch once,
    one MLflow run; the good one's result that of its config in one process."""
    # dense only to the search point (epoch 1, shared), 3 search epochs, retraining epochs 2-6;
    # ASHA's first rung: ticket iteration 4, the first retraining epoch
    small = {"training.epochs": 6, "training.milestones": [5], "training.dense_baseline": False}
    f = _sweep_file(tmp_path, "asha2", {"base": str(REPO / "configs" / "digits.yaml"), "set": {**small, **TWO},
                                        "grid": {"search.density": [0.1, 0.005]}, "max_concurrent": 1,
                                        "scheduler": {"asha": {"grace_period": 4}}})
    root = tmp_path / "sweeps" / "asha2"
    cmd = [str(BIN / "cts-ray"), "sweep", str(f), "--address", ray_cluster, "--quiet"]
    driver = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:   # Ctrl-C once the good trial saved its first search epoch
        [saved] = _wait_for(lambda: list((root / "progress").glob("*.pt")), timeout=150, poll=0.1)
        good_id = saved.stem
        assert len(_train_workers(good_id)) == 2
        os.kill(driver.pid, signal.SIGINT)
        out, err = driver.communicate(timeout=120)
    finally:
        driver.kill()
    assert driver.returncode == EXIT_INTERRUPTED, out[-3000:] + err[-3000:]
    [row] = tables.read(root, "trials").to_pylist()
    assert row["trial_id"] == good_id and row["status"] == "interrupted" and row["last_phase"] in ("search", "retrain")
    _wait_for(lambda: not _train_workers(good_id), timeout=20)   # its group went with the driver

    resume = subprocess.Popen([*cmd, "--resume"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    seen: set = set()   # the Train controllers and workers of the trial ASHA stops
    try:
        while resume.poll() is None:
            bad = [p for p in (root / "progress").glob("*.pt") if p.stem != good_id]
            if bad:
                seen |= {*_train_workers(bad[0].stem), *_train_controllers(ray_cluster)}
            time.sleep(0.2)
        out, err = resume.communicate(timeout=10)
    finally:
        resume.kill()
    assert resume.returncode == 0, out[-3000:] + err[-3000:]
    rows = {r["target_density"]: r for r in tables.read(root, "trials").to_pylist()}
    good, bad = rows[0.1], rows[0.005]
    assert good["trial_id"] == good_id and good["status"] == "finished", good["error"]
    assert bad["status"] == "stopped" and bad["error"] == "stopped by asha at retrain epoch 2, ticket iteration 4"
    assert bad["dense_cache_hit"] and not good["dense_cache_hit"]   # the dense run trained once
    assert 0 < bad["test_accuracy"] < good["test_accuracy"]
    epochs = [(r["trial_id"], r["phase"], r["epoch"]) for r in tables.read(root, "epochs").to_pylist()]
    assert len(epochs) == len(set(epochs))   # every epoch once: none lost, none twice
    assert [p for t, p, _ in epochs if t == good_id] == ["dense"] + ["search"] * 3 + ["retrain"] * 5
    assert [p for t, p, _ in epochs if t == bad["trial_id"]] == ["dense"] + ["search"] * 3 + ["retrain"]
    # the good trial went on from its saved epoch (not the dense one), and Tune and MLflow have each
    # of its epochs once: none lost across the interrupt (rank 0 is never further ahead of Tune)
    [log] = (root / "tune").glob(f"*{good_id}*/result.json")
    results = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [r["step"] for r in results]
    resumed = next(i for i, r in enumerate(results) if i and r["iterations_since_restore"] == 1)
    assert 1 < steps[resumed] <= steps[resumed - 1] + 1 and sorted(set(steps)) == list(range(1, steps[-1] + 1)), steps
    runs = {r.data.tags["cts.trial_id"]: r for r in _mlflow_trial_runs(tmp_path, "asha2")}
    assert sorted(runs) == sorted([good_id, bad["trial_id"]])
    assert runs[good_id].info.status == "FINISHED"
    assert runs[bad["trial_id"]].info.status == "KILLED" and runs[bad["trial_id"]].data.tags["cts.status"] == "stopped"
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path / 'sweeps' / 'mlflow.db'}")
    history = {k: [m.step for m in client.get_metric_history(runs[good_id].info.run_id, k)]
               for k in ("search/objective", "retrain/test_accuracy")}
    assert history == {"search/objective": [1, 2, 3], "retrain/test_accuracy": [1, 2, 3, 4, 5]}, history
    # the stopped trial's controller and workers were found while it ran, and are gone
    assert len(seen) >= 3, seen
    _wait_for(lambda: not any(map(_running, seen)), timeout=20)
    _same_as_one_worker(good, tmp_path / "one")



def test_a_two_worker_trial_whose_workers_fail_ends_as_a_failed_trial(ray_cluster, tmp_path, one_thread):
    """Both ranks fail (the trial's cached dense run does not load): Ray Train's fit fails, and the
    trial fails in Tune as a one-process trial would — an error row naming the cause, a FAILED MLflow
    run, Tune's error, the sweep's exit code — not a finished trial with no result."""
    from cts_ray.errors import EXIT_TRIALS_FAILED
    small = {"training.epochs": 2, "training.milestones": [], "training.dense_baseline": False}
    f = _sweep_file(tmp_path, "fail2", {"base": str(REPO / "configs" / "digits.yaml"), "set": {**small, **TWO},
                                        "max_failures": 0})
    _damage_dense_run(f, {})
    p = subprocess.run([str(BIN / "cts-ray"), "sweep", str(f), "--address", ray_cluster, "--quiet"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert p.returncode == EXIT_TRIALS_FAILED, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    root = tmp_path / "sweeps" / "fail2"
    [row] = tables.read(root, "trials").to_pylist()
    assert row["status"] == "error" and "UnpicklingError" in row["error"], row["error"]
    [run] = _mlflow_trial_runs(tmp_path, "fail2")
    assert run.info.status == "FAILED" and run.data.tags["cts.status"] == "error"
    [trial_dir] = [d for d in (root / "tune").iterdir() if d.is_dir() and row["trial_id"] in d.name]
    assert (trial_dir / "error.txt").exists()   # Tune's own record of the failure
    _wait_for(lambda: not _train_workers(row["trial_id"]), timeout=20)
