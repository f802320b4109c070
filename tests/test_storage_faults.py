"""Storage faults for real (issue 24 points 1 and 3): a small tmpfs this test mounts (as root) holds
the sweep's storage and its MLflow sqlite store; filling it up, making it read-only or taking it
away ends the work in one StorageError line, and leaves every file already written whole."""
import errno
import json
import os
import re
import sqlite3
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from cts_ray import storage
from cts_ray.errors import EXIT_STORAGE, StorageError
from cts_ray.sweep import tables

from conftest import BIN, REPO, _sweep_file

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs: needs root")


@pytest.fixture
def disk(tmp_path):
    """A 64 MB tmpfs at tmp_path/disk, unmounted afterwards."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt: Path) -> Path:
    """Write a ballast file until the disk is full (as another process on a shared disk would)."""
    ballast = mnt / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 1 << 9):   # down to the last pages
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return ballast


def test_a_full_disk_keeps_the_previous_version_and_says_so_in_one_line(disk):
    table = disk / "t.parquet"
    with storage.atomic(table) as f:
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"x": [1, 2, 3]}), f)
    storage.write_text(disk / "sweep.json", '{"grid": 1}')
    storage.save_torch({"w": torch.ones(3)}, disk / "p.pt")
    ballast = _fill(disk)
    big = {"w": torch.randn(50_000)}
    for write in (lambda: storage.save_torch(big, disk / "p.pt"), lambda: torch.save(big, disk / "q.pt"),
                  lambda: storage.write_text(disk / "sweep.json", "x" * 300_000)):
        with pytest.raises(Exception) as e:
            write()
        fault = storage.classify(e.value, disk)
        assert isinstance(fault, StorageError) and str(fault).startswith(f"storage full: {disk} (") and \
            str(fault).endswith(" MB free)"), fault
    assert json.loads((disk / "sweep.json").read_text()) == {"grid": 1}
    assert torch.load(disk / "p.pt")["w"].tolist() == [1.0, 1.0, 1.0]
    assert pq.read_table(table).num_rows == 3
    assert not [p.name for p in disk.iterdir() if ".tmp-" in p.name]   # no half file eats the space left
    ballast.unlink()


def test_read_only_and_vanished_storage_are_named(disk):
    storage.write_text(disk / "a.txt", "a")
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    try:
        with pytest.raises(OSError) as e:
            storage.write_text(disk / "a.txt", "b")
        assert str(storage.classify(e.value, disk)) == f"storage read-only: {disk}"
        assert str(storage.probe(disk)) == f"storage read-only: {disk}"
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
    gone = disk / "sweeps" / "x"
    with pytest.raises(OSError) as e:
        storage.write_text(gone / "sweep.json", "{}")
    assert str(storage.classify(e.value, gone)) == f"storage gone: {gone}"
    assert storage.classify(FileNotFoundError(errno.ENOENT, "no such file"), disk) is None   # a file, not the disk


def test_mlflow_on_a_full_disk_stops_logging_and_keeps_its_database(disk):
    from cts_ray.config import load
    from cts_ray.sweep.mlflow_log import Tracking
    store = Tracking(f"sqlite:///{disk / 'mlflow.db'}", "full")
    store.open(unsynced=True)
    cfg = load(None, [])
    run_id = store.create_run(cfg, "r", {})
    ballast = _fill(disk)
    for step in range(1, 200):   # enough metrics to need new pages
        store.log_result(run_id, {"phase": "dense", "epoch": step, "test_accuracy": 0.5, "train_loss": 1.0}, step)
        if store.failed:
            break
    assert store.failed and ("full" in store.failed or "No space" in store.failed), store.failed
    ballast.unlink()
    with sqlite3.connect(disk / "mlflow.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    from mlflow.tracking import MlflowClient
    assert MlflowClient(f"sqlite:///{disk / 'mlflow.db'}").get_run(run_id).info.run_id == run_id


GRID = {"search.method": ["cts", "snip", "random"], "seed": [0, 1, 2, 3]}
TINY = {"training.epochs": 2, "training.milestones": [1], "resources.cpus": 1}


def _mlflow_trials(db: Path, sweep: str) -> list:
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("cts-ray").experiment_id], f"tags.`cts.sweep` = '{sweep}'")
    return [r for r in runs if r.data.tags.get("cts.role") == "trial"]


def _fill_mid_sweep(cmd: list, cwd: Path, root: Path, disk: Path):
    """Run the driver; fill the disk once two trials have rows. Returns (driver, its stdout, stderr)."""
    driver = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ballast, deadline = None, time.time() + 300
    while driver.poll() is None and time.time() < deadline:
        if ballast is None and len(list((root / "tables" / "trials").glob("method=*/*.parquet"))) >= 2:
            ballast = _fill(disk)
        time.sleep(0.1)
    out, err = driver.communicate(timeout=120)
    assert ballast is not None, "the sweep ended before two trials had rows"
    return driver, out, err, ballast


def test_a_sweep_on_a_disk_that_fills_stops_in_one_line_and_resumes_to_every_point_once(ray_cluster, disk, tmp_path):
    body = {"base": str(REPO / "configs" / "digits.yaml"), "set": TINY, "grid": GRID, "max_failures": 1}
    f = _sweep_file(tmp_path, "fill", body)
    f.write_text(f.read_text().replace(str(tmp_path / "sweeps"), str(disk / "sweeps")))
    root = disk / "sweeps" / "fill"
    cmd = [str(BIN / "cts-ray"), "sweep", str(f), "--address", ray_cluster, "--quiet"]
    driver, out, err, ballast = _fill_mid_sweep(cmd, tmp_path, root, disk)
    assert driver.returncode == EXIT_STORAGE, out[-3000:] + err[-3000:]
    lines = err.strip().splitlines()
    # no traceback: only our one-line messages (MLflow's stop on the full sqlite file among them) and INFO logs
    assert "Traceback" not in err and not [x for x in lines if not x.startswith("cts-ray: ") and not re.search(r"\sINFO\s", x)], err
    assert sum(line.startswith(f"cts-ray: storage full: {root} (") for line in lines) == 1, err
    assert lines[-1].startswith("cts-ray: the sweep stopped; free space there, then run: ") and \
        lines[-1].endswith(f"cts-ray sweep {f} --resume --retry-failed --address {ray_cluster}"), lines[-1]
    # nothing written is damaged: tables, sweep.json, the MLflow store
    before = tables.read(root, "trials").to_pylist()
    assert 2 <= len(before) < 12
    assert json.loads((root / "sweep.json").read_text())["grid"] == GRID
    with sqlite3.connect(disk / "sweeps" / "mlflow.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    print(f"\nstderr of the full disk's sweep:\n{err}rows before the resume: {len(before)}")

    # space freed, the sweep resumed with its failed trials: every grid point once, everywhere
    ballast.unlink()
    p = subprocess.run(cmd + ["--resume", "--retry-failed"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    trials = tables.read(root, "trials").to_pylist()
    want = sorted((m, s) for m in GRID["search.method"] for s in GRID["seed"])
    assert _points(trials) == want and {t["status"] for t in trials} == {"finished"}, trials
    ids = {t["trial_id"] for t in trials}
    for table in ("epochs", "layers"):
        assert {r["trial_id"] for r in tables.read(root, table, ["trial_id"]).to_pylist()} == ids
    epochs = tables.read(root, "epochs", ["trial_id", "phase", "round", "epoch"]).to_pylist()
    assert len({tuple(r.values()) for r in epochs}) == len(epochs)   # no epoch twice
    runs = _mlflow_trials(disk / "sweeps" / "mlflow.db", "fill")
    assert sorted(r.data.tags["cts.trial_id"] for r in runs) == sorted(ids), \
        [(r.data.tags["cts.trial_id"], r.info.status, r.data.tags.get("cts.status"), r.data.metrics.get("step"))
         for r in runs]
    print(f"rows after the resume: {len(trials)}; the resume's output:\n{p.stdout[-2500:]}{p.stderr[-1500:]}")

    # the same accuracies as a sweep that never hit the fault
    ref = _sweep_file(tmp_path, "unbroken", body)
    subprocess.run([str(BIN / "cts-ray"), "sweep", str(ref), "--address", ray_cluster, "--quiet"], cwd=tmp_path,
                   check=True, capture_output=True, timeout=600)
    acc = lambda rows: {(r["method"], r["seed"]): r["test_accuracy"] for r in rows}
    assert acc(trials) == acc(tables.read(tmp_path / "sweeps" / "unbroken", "trials").to_pylist())


def _points(rows) -> list:
    return sorted((r["method"], r["seed"]) for r in rows)


def test_a_single_run_on_a_full_disk_is_one_line(disk, tmp_path):
    ballast = _fill(disk)
    p = subprocess.run([str(BIN / "cts-ray"), "run", "--quiet", "--set", "training.epochs=1", "--set",
                        "training.milestones=[]", "--out", str(disk / "runs" / "r")], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
    assert p.returncode == EXIT_STORAGE, p.stderr[-3000:]
    assert p.stderr.strip().splitlines() == [f"cts-ray: storage full: {disk / 'runs'} (0.0 MB free)"], p.stderr
    assert not list((disk / "runs").iterdir())   # no half run folder left
    ballast.unlink()
