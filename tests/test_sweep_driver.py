"""The sweep driver tells the truth: exit codes, Ctrl-C and SIGTERM recorded as `interrupted` with
the command that resumes, one driver per sweep (a lease), summaries readable at any size, and a
calm live view. Real `cts-ray sweep` processes and signals on the two-raylet test cluster. (Exit
code 3 for failed trials: test_sweep.py's diverging-trial test.)"""
import io
import json
import os
import signal
import subprocess
import time

import pytest

from cts_ray.errors import EXIT_BUSY, EXIT_INTERRUPTED
from cts_ray.sweep import tables

from conftest import BIN, REPO, _run, _sweep_file

DIGITS = str(REPO / "configs" / "digits.yaml")
TINY = {"training.epochs": 2, "training.milestones": [1], "resources.cpus": 1}
LONG = {"training.epochs": 15, "training.milestones": [12], "resources.cpus": 1}   # long enough to interrupt


def _start(args, tmp_path, **kw) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "cts-ray"), "sweep", *map(str, args)], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, **kw)


def _wait_for(predicate, timeout=240, what="the sweep") -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _started(root, n: int, since: float = 0.0):
    """Whether ``n`` trials saved progress (ran an epoch; not ended) since ``since``."""
    def saved() -> bool:
        files = list((root / "progress").glob("*.pt")) if (root / "progress").is_dir() else []
        return sum(p.stat().st_mtime > since for p in files if p.exists()) >= n
    return saved


def _rows(root) -> list:
    return tables.read(root, "trials").to_pylist()


def _interrupt(f, root, tmp_path, address, sig, *extra) -> tuple:
    """Start a driver, send ``sig`` once a trial is mid-way; (its output, the rows then)."""
    t0 = time.time()
    driver = _start([f, "--address", address, *extra], tmp_path)
    _wait_for(_started(root, 1, t0), what="a trial to save an epoch")
    os.kill(driver.pid, sig)
    out, err = driver.communicate(timeout=120)
    assert driver.returncode == EXIT_INTERRUPTED, out[-3000:] + err[-3000:]
    return out, err, {r["trial_id"]: r for r in _rows(root)}


def test_ctrl_c_and_sigterm_record_interrupted_trials_and_print_the_command_that_resumes(ray_cluster, tmp_path):
    f = _sweep_file(tmp_path, "stopme", {"base": DIGITS, "set": LONG, "grid": {"seed": [0, 1]},
                                         "max_concurrent": 1})
    root = tmp_path / "sweeps" / "stopme"
    out, err, rows = _interrupt(f, root, tmp_path, ray_cluster, signal.SIGINT, "--set", "num_samples=1")
    interrupted = {t for t, r in rows.items() if r["status"] == "interrupted"}
    assert len(interrupted) == 1 and "stopped" not in {r["status"] for r in rows.values()}
    assert all(r["error"].startswith("interrupted at ") for t, r in rows.items() if t in interrupted)
    lines = out.strip().splitlines()
    assert lines[-2] == f"interrupted: one trial was running (recorded as interrupted), {2 - len(rows)} had not " \
                        "started", lines[-2]
    assert lines[-1] == f"resume with: cts-ray sweep {f} --resume --set num_samples=1 --address {ray_cluster}"
    assert "Tuner.restore" not in out + err and "Traceback" not in err and "Stop signal" not in err
    assert "max_concurrent_trials" not in err   # no Tune warning that it ignores the limit the grid holds
    assert any(" failed  interrupted  seeds " in line for line in lines)   # the summary's own column
    assert sum(line.startswith("  interrupted: trial ") for line in lines) == 1
    # SIGTERM (as `kill`, a batch system) does the same, on the resumed sweep
    out, err, rows = _interrupt(f, root, tmp_path, ray_cluster, signal.SIGTERM, "--resume", "--set", "num_samples=1")
    assert "interrupted" in {r["status"] for r in rows.values()} and "Tuner.restore" not in out + err
    assert out.strip().splitlines()[-1].startswith(f"resume with: cts-ray sweep {f} --resume")
    # and a resume finishes them: their interrupted rows replaced, one row per trial
    p = _run([f, "--address", ray_cluster, "--resume", "--set", "num_samples=1"], tmp_path)
    after = _rows(root)
    assert len(after) == 2 and {r["status"] for r in after} == {"finished"}, after
    assert interrupted <= {r["trial_id"] for r in after} and "interrupted" not in p.stdout
    # the live view in a pipe: a line per trial as it ends, progress lines, no carriage returns
    assert "\r" not in p.stdout and "ended · " in p.stdout
    assert any(line.startswith("finished ") and " seed " in line and line.endswith(" %") for line in p.stdout.splitlines())


def test_one_driver_per_sweep_and_a_killed_drivers_lease_is_taken_over(ray_cluster, tmp_path):
    f = _sweep_file(tmp_path, "twice", {"base": DIGITS, "set": LONG, "grid": {"seed": [0, 1]},
                                        "max_concurrent": 1})
    root = tmp_path / "sweeps" / "twice"
    a, b = (_start([f, "--address", ray_cluster, "--quiet"], tmp_path) for _ in range(2))
    loser = None
    deadline = time.time() + 120
    while loser is None and time.time() < deadline:
        loser = next((d for d in (a, b) if d.poll() is not None), None)
        time.sleep(0.1)
    assert loser is not None, "neither driver refused"
    out, err = loser.communicate()
    assert loser.returncode == EXIT_BUSY and out.strip() == "" and err.count("\n") == 1, out + err
    winner = b if loser is a else a
    assert err.startswith(f"cts-ray: sweep folder {root} is in use by a running driver (host ")
    assert f"pid {winner.pid}, since " in err
    # a --resume while the first runs is refused the same way, touching nothing
    _wait_for(lambda: (root / "sweep.json").exists(), what="the sweep's record")
    record = (root / "sweep.json").read_text()
    p = subprocess.run([str(BIN / "cts-ray"), "sweep", str(f), "--address", ray_cluster, "--resume"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == EXIT_BUSY and "is in use by a running driver" in p.stderr and (root / "sweep.json").read_text() == record
    # the winner killed outright: its lease stays, names a dead pid, and a --resume takes it over
    _wait_for(_started(root, 1), what="a trial to save an epoch")
    os.killpg(winner.pid, signal.SIGKILL)
    winner.wait()
    [lease] = root.glob("driver.lease.*")
    assert json.loads(lease.read_text())["pid"] == winner.pid
    _run([f, "--address", ray_cluster, "--quiet", "--resume"], tmp_path)
    rows = _rows(root)
    assert sorted(r["seed"] for r in rows) == [0, 1] and {r["status"] for r in rows} == {"finished"}
    assert not list(root.glob("driver.lease.*"))   # given back at the end


def test_summary_formatter_stays_readable_at_5000_seeds_and_names_duplicates(tmp_path):
    from cts_ray.sweep.summary import format_summary, value_runs
    assert value_runs(list(range(5000))) == "0–4999 (5,000)"
    assert value_runs([0, 1]) == "0,1" and value_runs([3]) == "3" and value_runs([]) == "-"
    assert value_runs([0, 1, 2, 5, 7, 8, 9]) == "0–2,5,7–9 (7)"
    assert value_runs(list(range(0, 40, 2))) == "0,2,4,6,8,10,12,14,… (+12 more) (20)"
    row = {"method": "cts", "density": 0.1, "values": {}, "n": 4998, "repeats": 0, "mean": 0.9, "std": 0.01,
           "effective": 0.09, "collapsed": 0, "seeds": list(range(4998)) + [7000],
           "counts": {"finished": 4999, "stopped": 0, "diverged": 0, "error": 0, "interrupted": 1},
           "duplicates": [(3, 2)]}
    reasons = [f"interrupted: trial t{i} (seed {i}): interrupted at retrain epoch 2" for i in range(40)]
    text = format_summary({"keys": [], "rows": [row], "best": None, "reasons": reasons + ["failed: " + "x" * 500]})
    lines = text.splitlines()
    assert max(map(len, lines)) <= 200, max(lines, key=len)
    assert lines[0].split()[:9] == ["method", "density", "finished", "stopped", "diverged", "failed", "interrupted",
                                    "seeds", "effective"]
    assert "0–4997,7000 (4,999)" in lines[1] and "4,999" in lines[1]
    assert "cts at density 0.1 seed 3: ran 2 times" in text and "does not apply" not in text
    assert "… and 29 more (the trials table's status and error columns have every one)" in text


def test_two_rows_of_one_grid_point_read_as_ran_twice_not_as_a_knob(tmp_path):
    """A point that two drivers both ran (before the lease) is a duplicate, named as one."""
    from cts_ray.config import from_dict
    from cts_ray.sweep.spec import SweepSpec
    from cts_ray.sweep.summary import format_summary, summarise
    from cts_ray.sweep.trainable import write_trial_row
    from cts_ray.records import Trial
    spec = SweepSpec(name="dup", base={}, storage=str(tmp_path), grid={"search.method": ["snip"], "seed": [0, 1, 2]})
    for tid, seed, status in (("a1", 0, "finished"), ("a2", 0, "finished"), ("b1", 1, "finished"),
                              ("c1", 2, "interrupted")):
        cfg = from_dict(spec.trial_raw({"search.method": "snip", "seed": seed}))
        common = {"sweep": "dup", "trial_id": tid, "config_hash": cfg.hash, **tables.axes(cfg)}
        write_trial_row(spec.root, cfg, common, Trial(status=status, started_at=0.0, dense_cache_hit=False),
                        {"test_accuracy": 0.5} if status == "finished" else None)
    text = format_summary(summarise(spec))
    assert "snip at density 0.05 seed 0: ran 2 times" in text and "does not apply" not in text, text
    # an interrupted trial is unfinished to the analysis, as one with no row is
    from cts_ray.analysis import load as load_mod
    from cts_ray.errors import AnalysisError
    with pytest.raises(AnalysisError, match="one trial of dup has started but not finished"):
        load_mod.load([spec.root])
    skipped = load_mod.load([spec.root], allow_incomplete=True).skipped
    assert skipped["unfinished"] == 1 and "interrupted" not in skipped


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_the_live_view_prints_a_line_per_ended_trial_and_redraws_only_on_a_terminal(tmp_path):
    from ray.tune.experiment import Trial
    from cts_ray.config import from_dict
    from cts_ray.sweep.live import LiveView
    from cts_ray.sweep.spec import SweepSpec
    spec = SweepSpec(name="view", base={}, storage=str(tmp_path), grid={"seed": [0, 1, 2]})
    for tty in (False, True):
        trials = [Trial("trial", config={"seed": s}, stub=True, trial_id=f"v_0000{s}") for s in range(2)]
        out = _Stream(tty)
        view = LiveView(3, lambda params: from_dict(spec.trial_raw(params)), stream=out)
        trials[0].set_status(Trial.RUNNING)
        view.on_step_end(1, trials)
        trials[0].update_last_result({"phase": "final", "status": "finished", "test_accuracy": 0.91234})
        trials[0].set_status(Trial.TERMINATED)
        view.on_trial_complete(2, trials, trials[0])
        trials[1].set_status(Trial.RUNNING)
        view.on_step_end(3, trials)
        view.on_trial_error(4, trials, trials[1])
        view.on_experiment_end(trials)
        text = out.getvalue()
        ended = [line.split("\x1b[K")[-1] for line in text.split("\n") if "seed" in line]
        assert [line.split() for line in ended] == [
            ["finished", "v_00000", "cts", "density", "0.05", "seed", "0", "test", "accuracy", "91.23", "%"],
            ["failed", "v_00001", "cts", "density", "0.05", "seed", "1"]], text
        assert text.rstrip("\n").split("\n")[-1].endswith("[2/3 ended · 0 running · 1 pending · 1 failed]  elapsed 0:00")
        if tty:   # redrawn in place
            assert text.startswith("\r\x1b[K[0/3 ended · 1 running · 2 pending · 0 failed]")
        else:     # a log: no carriage returns; progress at the start, then at most every 30 s, and at the end
            assert "\r" not in text and len(text.splitlines()) == 4, text
