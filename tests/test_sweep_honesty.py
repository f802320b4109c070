"""Sweeps whose numbers say what happened: exact resumes (or a one-line refusal), grids extended
with trials that really run, schedulers that judge tickets, stopped trials that keep their rows,
summaries that never pool settings. Real `cts-ray sweep` on the two-raylet test cluster."""
import json
import subprocess

from cts_ray.sweep import tables

from conftest import BIN, REPO, _run, _sweep_file

TINY = {"training.epochs": 2, "training.milestones": [1], "resources.cpus": 1}


def _sweep(args, tmp_path):
    return subprocess.run([str(BIN / "cts-ray"), "sweep", *map(str, args)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)


def test_resume_with_other_settings_is_refused_and_extend_runs_the_new_trials(ray_cluster, tmp_path):
    f = _sweep_file(tmp_path, "grow", {"base": str(REPO / "configs" / "digits.yaml"), "set": TINY,
                                       "grid": {"search.density": [0.1], "seed": [0, 1]}})
    root = tmp_path / "sweeps" / "grow"
    _run([f, "--address", ray_cluster, "--quiet"], tmp_path)
    stored = (root / "sweep.json").read_text()

    p = _sweep([f, "--address", ray_cluster, "--quiet", "--resume", "--set", "training.epochs=3",
                "--set", "grid.seed=[0,1,2]"], tmp_path)
    assert p.returncode == 2 and p.stdout.count("\n") == 0, p.stdout
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("cts-ray: error: --resume: sweep 'grow' ran with "
                                                            "other settings"), p.stderr
    assert "grid.seed: [0, 1] -> [0, 1, 2]" in p.stderr and "set.training.epochs: 2 -> 3" in p.stderr
    assert "--name" in p.stderr and "--extend" in p.stderr
    assert (root / "sweep.json").read_text() == stored              # still what ran
    # --extend changes only the grid: the one new seed's trial runs, the others are kept
    p = _sweep([f, "--address", ray_cluster, "--quiet", "--extend", "--set", "training.epochs=3",
                "--set", "grid.seed=[0,1,2]"], tmp_path)
    assert p.returncode == 2 and "--extend: only adds values" in p.stderr and "set.training.epochs" in p.stderr
    before = {t["trial_id"]: t["ended_at"] for t in tables.read(root, "trials").to_pylist()}
    p = _run([f, "--address", ray_cluster, "--quiet", "--extend", "--set", "grid.seed=[0,1,2]"], tmp_path)
    assert "1 new trials" in p.stdout
    trials = tables.read(root, "trials").to_pylist()
    assert sorted(t["seed"] for t in trials) == [0, 1, 2] and {t["status"] for t in trials} == {"finished"}
    assert {t["trial_id"]: t["ended_at"] for t in trials if t["trial_id"] in before} == before
    meta = json.loads((root / "sweep.json").read_text())
    assert meta["grid"]["seed"] == [0, 1, 2] and meta["extended"] == [{"grid": {"search.density": [0.1],
                                                                               "seed": [0, 1]}, "added": 1}]
    # the extended sweep now resumes as it stands (nothing left to run), from the file as it was
    # before --extend too (sweep.json's grid is the truth), and refuses a grid it never had
    _run([f, "--address", ray_cluster, "--quiet", "--resume", "--set", "grid.seed=[0,1,2]"], tmp_path)
    _run([f, "--address", ray_cluster, "--quiet", "--resume"], tmp_path)
    assert len(tables.read(root, "trials")) == 3
    p = _sweep([f, "--address", ray_cluster, "--quiet", "--resume", "--set", "grid.seed=[0,2]"], tmp_path)
    assert p.returncode == 2 and "grid.seed: [0, 1, 2] -> [0, 2]" in p.stderr


def test_asha_judges_tickets_not_the_shared_dense_run_and_a_stopped_trial_keeps_its_rows(ray_cluster, tmp_path):
    # two trials share one dense run (one seed); the sparse one is the worse ticket. Run in grid
    # order, one at a time, so ASHA's first rung (ticket iteration 3 = the first retraining epoch
    # after 2 search epochs) has the 10 % ticket recorded when the 0.5 % ticket reaches it.
    f = _sweep_file(tmp_path, "asha", {"base": str(REPO / "configs" / "digits.yaml"),
                                       "set": {**TINY, "training.epochs": 4, "training.milestones": [3]},
                                       "grid": {"search.density": [0.1, 0.005]}, "max_concurrent": 1,
                                       "scheduler": {"asha": {"grace_period": 3}}})
    p = _run([f, "--address", ray_cluster, "--quiet"], tmp_path)
    root = tmp_path / "sweeps" / "asha"
    rows = {t["target_density"]: t for t in tables.read(root, "trials").to_pylist()}
    good, bad = rows[0.1], rows[0.005]
    assert good["status"] == "finished" and good["last_phase"] == "retrain" and good["last_epoch"] == 4
    assert bad["status"] == "stopped" and bad["last_phase"] == "retrain" and bad["last_epoch"] == 2, bad
    assert bad["error"] == "stopped by asha at retrain epoch 2, ticket iteration 3"
    assert 0 < bad["test_accuracy"] < good["test_accuracy"] and bad["mask_path"] is None
    assert bad["config_hash"] and bad["seed"] == 0 and bad["temperature"] == good["temperature"]
    # its epochs are kept: the whole shared dense run, its search, the one retraining epoch
    phases = [r["phase"] for r in tables.read(root, "epochs").to_pylist() if r["trial_id"] == bad["trial_id"]]
    assert phases == ["dense"] * 4 + ["search"] * 2 + ["retrain"]
    assert not list((root / "trials").glob(".*partial*"))
    # the summary counts it and says why
    assert f"stopped: trial {bad['trial_id']} (seed 0): {bad['error']}" in p.stdout
    # MLflow keeps its run, marked stopped
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path / 'sweeps' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cts-ray")
    run = client.search_runs([exp.experiment_id], f"tags.`cts.trial_id` = '{bad['trial_id']}'")[0]
    assert run.data.tags["cts.status"] == "stopped" and run.info.status == "KILLED"
    assert run.data.tags["cts.stopped_at"] == "retrain epoch 2"
    # and logs each phase's own numbers: a search epoch has no test accuracy, a dense epoch the dense one
    good_run = client.search_runs([exp.experiment_id], f"tags.`cts.trial_id` = '{good['trial_id']}'")[0].info.run_id
    assert client.get_metric_history(good_run, "search/test_accuracy") == []
    dense = {m.step: m.value for m in client.get_metric_history(good_run, "dense/test_accuracy")}
    epochs = tables.read(root, "epochs").to_pylist()
    assert sorted(dense.values()) == sorted(r["test_accuracy"] for r in epochs
                                            if r["trial_id"] == good["trial_id"] and r["phase"] == "dense")
    # --resume --retry-stopped runs the stopped trial again, in place (one row, one MLflow run each)
    _run([f, "--address", ray_cluster, "--quiet", "--resume", "--retry-stopped"], tmp_path)
    again = {t["trial_id"]: t for t in tables.read(root, "trials").to_pylist()}
    assert set(again) == {good["trial_id"], bad["trial_id"]} and again[good["trial_id"]] == good
    assert again[bad["trial_id"]]["ended_at"] > bad["ended_at"]
    runs = client.search_runs([exp.experiment_id], "tags.`cts.sweep` = 'asha' and tags.`cts.role` = 'trial'")
    assert sorted(r.data.tags["cts.trial_id"] for r in runs) == sorted(again)


def _mixed(root):
    """CTS at two temperatures and SNIP (which has none) over two seeds: one CTS trial diverged,
    one SNIP trial stopped, and SNIP run twice under temperatures it does not read."""
    from test_analysis import _trial
    _trial(root, "cts", 0.1, 0, 0.90, temperature=0.5)
    _trial(root, "cts", 0.1, 1, 0.92, temperature=0.5)
    _trial(root, "cts", 0.1, 0, 0.80, temperature=1.0)
    _trial(root, "cts", 0.1, 1, None, temperature=1.0, status="diverged")
    _trial(root, "snip", 0.1, 0, 0.85, temperature=0.5)
    _trial(root, "snip", 0.1, 0, 0.85, temperature=1.0)
    _trial(root, "snip", 0.1, 1, 0.5, temperature=0.5, status="stopped")


def test_the_sweep_summary_has_one_row_per_setting_with_counts_and_no_std_from_one_value(tmp_path):
    from cts_ray.sweep.spec import SweepSpec
    from cts_ray.sweep.summary import format_summary, summarise
    spec = SweepSpec(name="mixed", base={}, storage=str(tmp_path),
                     grid={"search.method": ["cts", "snip"], "search.temperature": [0.5, 1.0], "seed": [0, 1]})
    _mixed(spec.root)
    summary = summarise(spec)
    rows = {(r["method"], r["values"]["search.temperature"]): r for r in summary["rows"]}
    assert set(rows) == {("cts", 0.5), ("cts", 1.0), ("snip", None)}     # τ is not SNIP's: one row
    assert rows["cts", 0.5]["n"] == 2 and rows["cts", 0.5]["std"] is not None
    assert rows["cts", 1.0]["counts"] == {"finished": 1, "stopped": 0, "diverged": 1, "error": 0, "interrupted": 0}
    assert rows["cts", 1.0]["std"] is None                                # one value: no std
    assert rows["snip", None]["counts"]["stopped"] == 1 and rows["snip", None]["n"] == 1   # the repeat counts once
    text = format_summary(summary)
    lines = text.splitlines()
    assert lines[0].split()[:10] == ["method", "density", "temperature", "finished", "stopped", "diverged", "failed",
                                     "seeds", "effective", "test"] and "over seeds" not in text
    assert any(line.startswith("cts") and " 0.5 " in line and "91.00 ± 1.41 %" in line for line in lines)
    assert any(line.startswith("cts") and " 1 " in line and "80.00 %  (one trial: no std)" in line for line in lines)
    assert any(line.startswith("snip") and " – " in line and "85.00 %  (one trial: no std)" in line for line in lines)
    assert "counted once: snip at density 0.1: one trial repeats an identical experiment" in text
    assert "diverged: trial" in text and "stopped: trial" in text
    # a random search (every trial its own setting) also lists its best trials
    spec.searcher, spec.grid = "random", {"search.method": ["cts", "snip"], "seed": [0, 1]}
    spec.sample = {"search.temperature": {"uniform": [0.5, 1.0]}}
    text = format_summary(summarise(spec))
    best = text.split("best trials by test_accuracy (max):\n")[1].splitlines()
    assert "92" in best[0] and "cts density 0.1 seed 1  temperature=0.5" in best[0]


def test_the_report_shows_every_setting_and_says_what_it_left_out(tmp_path):
    from cts_ray.analysis import comparison, load as load_mod
    _mixed(tmp_path / "mixed")
    out = comparison.analyse(load_mod.load([tmp_path / "mixed"]))
    assert out["labels"] == ["cts (temperature=0.5)", "cts (temperature=1)", "snip"]
    table = comparison.accuracy_table(out)
    assert "| cts (temperature=0.5) | 91.00 ± 1.41 (n=2) |" in table and "| snip | 85.00 (n=1) |" in table
    assert "| cts (temperature=1) | 80.00 (n=1) |" in table
    assert ("Not in this table: one diverged trial; one stopped trial; one repeat of a config or experiment "
            "already counted. Only finished trials count.") in table


def test_statistics_follow_one_seed_threshold_and_stay_within_0_100(tmp_path):
    import math
    from test_analysis import _trial
    from cts_ray.analysis import insensitivity, load as load_mod, seeds, stats
    mean, std, lo, hi = stats.mean_ci([90.0, 99.0])            # two seeds: a std, no interval
    assert std > 0 and math.isnan(lo) and math.isnan(hi)
    assert stats.mean_ci([97.0, 99.5, 100.0])[3] == 100.0       # clipped, not 101.9
    assert math.isnan(stats.anova_p([[1, 2], [3, 4]])) and math.isnan(stats.bootstrap_spread([[1, 2], [3, 4]])[0][0])
    # two temperatures x two seeds: the insensitivity row is indicative, with no test and no intervals
    root = tmp_path / "two"
    for seed, e in enumerate((-1, 1)):
        for t, base in ((0.5, 90), (1.0, 80)):
            _trial(root, "cts", 0.1, seed, (base + e) / 100, temperature=t)
    res = load_mod.load([root])
    (row,) = insensitivity.analyse(res, axes=["temperature"])
    assert math.isnan(row["p"]) and all(math.isnan(x) for x in (*row["range_ci"], *row["std_ci"]))
    assert row["verdict"] == "indicative: 10.00 points across 0.5–1; no test (needs ≥ 3 seeds per value, has 2)"
    md = insensitivity.markdown([row])
    assert "std across values / seed std" in md and "*ANOVA p* one-way ANOVA" in md and stats.RULE in md
    cell = seeds.analyse(res)["cells"][0]
    assert cell["n"] == 2 and math.isnan(cell["ci"][0]) and stats.RULE in seeds.markdown(seeds.analyse(res))


def test_dry_run_previews_the_sweep_and_starts_nothing(tmp_path):
    f = _sweep_file(tmp_path, "preview", {"base": str(REPO / "configs" / "digits.yaml"),
                                          "set": {"training.epochs": 10, "training.milestones": [5]},
                                          "grid": {"search.method": ["cts", "ltr", "snip"],
                                                   "search.density": [0.5, 0.2], "seed": [0, 1]}})
    before = sorted(tmp_path.rglob("*"))
    code = ("import sys; from cts_ray import cli; rc = cli.main(['sweep', sys.argv[1], '--dry-run']); "
            "print('ray imported' if 'ray' in sys.modules else 'no ray'); sys.exit(rc)")
    p = subprocess.run([str(BIN / "python"), "-c", code, str(f)], capture_output=True, text=True, cwd=tmp_path,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert sorted(tmp_path.rglob("*")) == before and out.rstrip().endswith("no ray")   # nothing written or started
    assert "12 trials (search.density × 2, search.method × 3, seed × 2), searcher grid" in out   # file order
    assert "    1  search.density=0.5 search.method=cts seed=0" in out and "   12  " in out
    assert "dense runs: 2 shared by 12 trials" in out
    # LTR: 0.8^3 ≈ 0.5 and 0.8^7 ≈ 0.2: one chain of 7 rounds per seed serves both densities
    assert "LTR levels: 7 rounds shared by 2 trials; 7 rounds shared by 2 trials" in out
    # per seed: 10 dense epochs; LTR 7 rounds x 9 epochs; CTS (5 search + 9 retrain) and SNIP (9) at 2 densities
    shared = 2 * (10 + 7 * 9 + 2 * (5 + 9) + 2 * 9)
    alone = 2 * (6 * 10 + (3 + 7) * 9 + 2 * (5 + 9) + 2 * 9)
    assert f"compute: about {shared:,} epochs ({alone:,} without the shared dense runs and LTR rounds)" in out
    # a bad value is still refused first, in one line
    p = subprocess.run([str(BIN / "cts-ray"), "sweep", str(f), "--dry-run", "--set", "training.lr=-1"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert p.returncode == 2 and p.stderr.startswith("cts-ray: error: training.lr: -1.0 is out of range")
