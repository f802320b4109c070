"""`cts-ray analyze` / `cts-ray report`: statistics on tables with known answers, refusals when the
data cannot answer, and a report from a real (small) digits sweep checked against the Parquet files."""
import json
import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from matplotlib import image
from scipy import stats as sps

from cts_ray import cli, config
from cts_ray.analysis import comparison, insensitivity, interaction, load as load_mod, plots, seeds, stats
from cts_ray.analysis.load import AnalysisError
from cts_ray.sweep import tables

from conftest import REPO, _run


def _trial(root, method="cts", density=0.1, seed=0, acc=0.9, temperature=2 / 3, sanity="none",
           ticket_seconds=10.0, status="finished", trial_id=None, sweep=None, anatomy=None, **extra):
    """Write one trial's row of the trials table, as a sweep would (a real resolved config)."""
    overrides = [f"search.method={method}", f"search.density={density}", f"seed={seed}",
                 f"search.temperature={temperature}", f"search.sanity={sanity}"]
    overrides += [f"{k.replace('__', '.')}={v}" for k, v in extra.items()]
    cfg = config.load(None, overrides)
    trial_id = trial_id or f"{method}-{cfg.hash}"
    common = {"sweep": sweep or Path(root).name, "trial_id": trial_id, "config_hash": cfg.hash, **tables.axes(cfg)}
    row = {"status": status, "test_accuracy": acc if status == "finished" else None,
           "peak_test_accuracy": acc, "dense_test_accuracy": 0.95, "achieved_density": density, **(anatomy or {}),
           "ticket_seconds": ticket_seconds, "search_seconds": 1.0, "epochs_equivalent": 10.0,
           "started_at": 1.7e9, "ended_at": 1.7e9 + seed, "code_version": "test", "hostname": "here",
           "node_id": "n0", "library_versions": json.dumps({"torch": "2.14.1"}), "config": json.dumps(cfg.to_dict())}
    tables.write(root, "trials", method, trial_id, [row], common)
    return trial_id


NOISE = [-0.5, 0.0, 0.5]   # seed effect in points, the same for every setting (seed std 0.5)


@pytest.fixture
def known(tmp_path):
    """Temperature has no effect at density 0.1 and a large one at 0.01; two methods at 0.1."""
    root = tmp_path / "known"
    for s, e in enumerate(NOISE):
        for t in (0.25, 2 / 3, 1.0):
            _trial(root, density=0.1, seed=s, temperature=t, acc=(90 + e) / 100)
        for t, mean in ((0.25, 80), (2 / 3, 90), (1.0, 95)):
            _trial(root, density=0.01, seed=s, temperature=t, acc=(mean + e) / 100)
        _trial(root, method="random", density=0.1, seed=s, acc=(70 + 3 * e) / 100)
    return root


def test_insensitivity_no_effect_and_large_effect(known):
    res = load_mod.load([known])
    # three temperatures tie on densities and trials: the default (2/3) is the main setting, "cts"
    assert set(res.trials[res.trials["label"] == "cts"]["temperature"]) == {2 / 3}
    assert "cts (temperature=0.25)" in set(res.trials["label"])
    rows = insensitivity.analyse(res)
    assert {(r["axis"], r["density"]) for r in rows} == {("temperature", 0.1), ("temperature", 0.01)}
    flat, steep = sorted(rows, key=lambda r: -r["density"])
    assert flat["range"] == pytest.approx(0, abs=1e-9) and flat["seed_std"] == pytest.approx(0.5)
    assert flat["p"] == pytest.approx(1.0) and flat["verdict"].startswith("insensitive: within 0.00 points")
    assert steep["range"] == pytest.approx(15) and steep["means"] == pytest.approx([80, 90, 95])
    assert steep["std"] == pytest.approx(np.std([80, 90, 95], ddof=1))
    assert steep["seed_std"] == pytest.approx(0.5) and steep["p"] < 1e-6
    assert steep["best"] == 1.0 and steep["verdict"].startswith("sensitive: 15.00 points across 0.25–1")
    lo, hi = steep["range_ci"]
    assert lo <= 15 <= hi and hi - lo < 3   # resampling 3 seeds of ±0.5 moves the range by ≤ 2 points
    assert "| cts | temperature | – | 1 |" in insensitivity.markdown(rows)


def _grid(root, means: dict) -> Path:
    """A mask LR x objective grid of CTS trials, 3 seeds each, with the given mean accuracies."""
    for s, e in enumerate(NOISE):
        for (lr, objective), mean in means.items():
            _trial(root, seed=s, acc=(mean + e) / 100, search__lr=lr, search__objective=objective)
    return root


def test_two_axes_interaction_and_held_at(tmp_path, capsys):
    """A 2 x 2 grid whose effects add (10 points of LR, 5 of objective at either) and one where the
    objective's effect flips with the LR: the ANOVA tells them apart; every insensitivity row names
    the other axis's value."""
    additive = _grid(tmp_path / "add", {(0.01, "ce"): 80, (0.01, "kl_reverse"): 85,
                                        (0.1, "ce"): 90, (0.1, "kl_reverse"): 95})
    crossed = _grid(tmp_path / "cross", {(0.01, "ce"): 80, (0.01, "kl_reverse"): 95,
                                         (0.1, "ce"): 90, (0.1, "kl_reverse"): 90})
    (add,) = interaction.analyse(load_mod.load([additive]))
    (cross,) = interaction.analyse(load_mod.load([crossed]))
    assert (add["a"], add["b"], add["n"]) == ("mask_lr", "objective", 3)
    assert add["p"]["ab"] == pytest.approx(1.0) and add["p"]["a"] < 1e-3 and add["p"]["b"] < 1e-3
    assert add["verdict"].startswith("no interaction (p = 1.000): the effects add; mask_lr: an effect (p < 0.001)")
    assert cross["p"]["ab"] < 1e-3 and cross["verdict"].startswith("mask_lr and objective interact (p < 0.001)")
    assert cross["means"][0.01, "kl_reverse"] == pytest.approx(95)
    md = interaction.markdown([cross])
    assert "| cts | mask_lr × objective | – | 10 | 3 | 0.01 / ce: 80.00; 0.01 / kl_reverse: 95.00;" in md
    (png,) = interaction.plot(load_mod.load([crossed]), [cross], tmp_path)
    assert Path(png).name == "interaction_cts_mask_lr_objective.png"
    assert image.imread(png).shape[:2] == plots.PIXELS[::-1]
    rows = insensitivity.analyse(load_mod.load([crossed]))
    assert sorted((r["axis"], r["held"], round(r["range"], 6)) for r in rows) == [
        ("mask_lr", "objective=ce", 10), ("mask_lr", "objective=kl_reverse", 5),
        ("objective", "mask_lr=0.01", 15), ("objective", "mask_lr=0.1", 0)]
    assert "| cts | mask_lr | objective=ce | 10 |" in insensitivity.markdown(rows)
    assert cli.main(["analyze", "interaction", str(crossed)]) == 0
    assert "| cts | mask_lr × objective | – | 10 | 3 |" in capsys.readouterr().out
    # one axis alone: no interaction to tell, refused in one line
    with pytest.raises(AnalysisError, match="interaction: no two swept axes form a grid"):
        interaction.analyse(load_mod.load([tmp_path / "add"]), axes=["mask_lr"])


def test_two_way_anova_equals_the_balanced_formulas():
    rng = np.random.default_rng(0)
    a_levels, b_levels, n = (0, 1, 2), (0, 1), 4
    cells = {(a, b): rng.normal(a + 0.5 * b + 1.5 * (a * b == 2), 1, n) for a in a_levels for b in b_levels}
    m = {k: v.mean() for k, v in cells.items()}
    grand = np.mean(list(m.values()))
    ma = {a: np.mean([m[a, b] for b in b_levels]) for a in a_levels}
    mb = {b: np.mean([m[a, b] for a in a_levels]) for b in b_levels}
    ss = {"a": n * len(b_levels) * sum((ma[a] - grand) ** 2 for a in a_levels),
          "b": n * len(a_levels) * sum((mb[b] - grand) ** 2 for b in b_levels),
          "ab": n * sum((m[a, b] - ma[a] - mb[b] + grand) ** 2 for a in a_levels for b in b_levels)}
    dof = {"a": 2, "b": 1, "ab": 2}
    mse = sum(((v - v.mean()) ** 2).sum() for v in cells.values()) / (len(cells) * (n - 1))
    expected = {k: sps.f.sf(ss[k] / dof[k] / mse, dof[k], len(cells) * (n - 1)) for k in ss}
    assert stats.two_way_anova(cells) == pytest.approx(expected)
    assert all(math.isnan(p) for p in stats.two_way_anova({k: v[:2] for k, v in cells.items()}).values())


def test_settings_named_against_the_sweeps_base(tmp_path):
    """A sweep whose base sets CTS's mask LR to 0.1 (as the mnist config does): its CTS is plain
    `cts`, only a different LR is named; counts read as English."""
    root = tmp_path / "based"
    root.mkdir()
    (root / "sweep.json").write_text(json.dumps({"name": "based", "base": {"search": {"lr": 0.1, "loss_scale": 100}},
                                                 "set": {"search.lr_drop_at": "epoch"}}))
    _trial(root, search__lr=0.1, search__loss_scale=100, search__lr_drop_at="epoch")
    _trial(root, search__lr=0.01, search__loss_scale=100, search__lr_drop_at="epoch")
    _trial(root, method="snip")
    res = load_mod.load([root])
    assert sorted(set(res.trials["label"])) == ["cts", "cts (lr=0.01)", "snip"]
    assert "mean ± std over one seed" in comparison.accuracy_table(comparison.analyse(res))
    assert res.describe().startswith("3 finished trials from one sweep (based)")


def test_seed_statistics_and_significance(known):
    res = load_mod.load([known])
    out = seeds.analyse(res)
    cell = next(c for c in out["cells"] if c["label"] == "random" and c["density"] == 0.1)
    acc = [70 + 3 * e for e in NOISE]
    half = sps.t.ppf(0.975, 2) * np.std(acc, ddof=1) / math.sqrt(3)
    assert cell["mean"] == pytest.approx(70) and cell["std"] == pytest.approx(1.5)
    assert cell["ci"] == pytest.approx((70 - half, 70 + half)) and (cell["min"], cell["max"]) == pytest.approx((68.5, 71.5))
    # cts (primary setting: tau = 2/3) beats random by 20 points on every seed: significant, paired
    pair = next(p for p in out["pairs"] if p["density"] == 0.1 and {p["a"], p["b"]} == {"cts", "random"})
    assert {pair["a"], pair["b"]} == {"cts", "random"} and pair["test"] == "paired t" and pair["significant"]
    assert "| 10 | cts | random | 20.00 | paired t (3) |" in seeds.markdown(out)
    # seed std 0.5 against 1.5, 3 seeds each: a variance test runs and reports both
    vt = next(v for v in out["variance_tests"] if v["density"] == 0.1)   # every setting takes part
    assert vt["stds"] == pytest.approx({"cts": 0.5, "cts (temperature=0.25)": 0.5, "cts (temperature=1)": 0.5,
                                        "random": 1.5})


def test_variance_test_and_holm_on_known_data():
    rng = np.random.default_rng(0)
    calm, wild = rng.normal(0, 0.1, 12), rng.normal(0, 5, 12)
    assert stats.levene_p([calm, wild]) < 0.01 and stats.levene_p([calm, calm + 3]) > 0.5
    assert stats.holm([0.01, 0.04, 0.03, math.nan])[:3] == pytest.approx([0.03, 0.06, 0.06])
    # no pairwise test from two seeds
    assert math.isnan(stats.compare({0: 1.0, 1: 2.0}, {0: 0.0, 1: 0.5})[1])


def test_comparison_speedup_and_sanity_drop(tmp_path):
    root = tmp_path / "cmp"
    for s, e in enumerate(NOISE):
        _trial(root, "cts", 0.01, s, (90 + e) / 100, ticket_seconds=10)
        _trial(root, "ltr", 0.01, s, (91 + e) / 100, ticket_seconds=150)
        _trial(root, "cts", 0.01, s, (60 + e) / 100, sanity="shuffle", ticket_seconds=10)
        _trial(root, "snip", 0.01, s, (85 + e) / 100, search__examples_per_class=10)
    res = load_mod.load([root])
    out = comparison.analyse(res)
    assert out["speedup"] == {("ltr", "cts"): {0.01: pytest.approx(15.0)}}
    assert "| ltr / cts time | 15.0× |" in comparison.compute_table(out)
    table = comparison.accuracy_table(out)
    assert "| cts | 90.00 ± 0.50 |" in table and "| ltr | 91.00 ± 0.50 |" in table
    assert "| snip | 85.00 ± 0.50 |" in table and "dense network 95.00 ± 0.00 %" in table
    (chk,) = out["sanity"]
    assert chk["check"] == "shuffle" and chk["drop"] == pytest.approx(30) and chk["passes"]
    files = comparison.plot(res, out, tmp_path)
    assert [image.imread(f).shape[:2] for f in files] == [plots.PIXELS[::-1]] * 2


def test_nominal_vs_effective_density_and_off_target_notes(tmp_path):
    """The anatomy table and plot from known effective densities; a cell off its column's density
    by more than 1 % is named; trials without anatomy columns (older tables) are left out, not guessed."""
    root = tmp_path / "anat"
    for s, e in enumerate(NOISE):
        _trial(root, "cts", 0.01, s, (90 + e) / 100, anatomy={"effective_density": 0.0095, "collapsed": 0})
        tid = _trial(root, "ltr", 0.01, s, (91 + e) / 100,
                     anatomy={"achieved_density": 0.0105, "effective_density": 0.0104, "collapsed": 0})
        layers = [{"layer": "1.weight", "units": 300, "alive_units": 250 + 10 * s},
                  {"layer": "3.weight", "units": 100, "alive_units": 100}]
        tables.write(root, "layers", "ltr", tid, layers, {"sweep": root.name, "trial_id": tid})
        _trial(root, "snip", 0.01, s, (85 + e) / 100,
               anatomy={"effective_density": 0.005 + 0.001 * e, "collapsed": 2 if s == 0 else 0})
    res = load_mod.load([root])
    out = comparison.analyse(res)
    table = comparison.anatomy_table(out)
    assert "| cts | 1 → 0.95 (95%) |" in table and "| ltr | 1.05 → 1.04 (99%) |" in table
    assert "| snip | 1 → 0.5 (50%), 1 of 3 with a collapsed layer |" in table
    alive = comparison.alive_table(out)   # the layers table has ltr's rows only
    assert "| ltr | 260 / 100 |" in alive and "| cts | – |" in alive and "1.weight (300) / 3.weight (100)" in alive
    notes = comparison.off_target_notes(out)
    assert "ltr at 1 % keeps 1.05 % (+5.0%)" in notes and "cts" not in notes and "snip" not in notes
    md = comparison.markdown(out)
    assert "### Nominal vs effective density" in md and notes in md
    files = comparison.plot(res, out, tmp_path)
    assert [Path(f).name for f in files] == ["accuracy_vs_density.png", "accuracy_vs_effective_density.png",
                                             "time_to_ticket.png"]
    assert all(image.imread(f).shape[:2] == plots.PIXELS[::-1] for f in files)
    # a table from before ticket anatomy: no effective numbers, no effective plot, said so
    old = tmp_path / "old"
    _trial(old, "cts", 0.01, 0, 0.9)
    res = load_mod.load([old])
    out = comparison.analyse(res)
    with pytest.raises(AnalysisError, match="predate effective density"):
        comparison.anatomy_table(out)
    (tmp_path / "old_plots").mkdir()
    assert len(comparison.plot(res, out, tmp_path / "old_plots")) == 2


def test_refusals_name_the_problem(tmp_path, known, capsys):
    one_seed = tmp_path / "one"
    _trial(one_seed, "cts", 0.1, 0, 0.9)
    _trial(one_seed, "cts", 0.01, 0, 0.8)
    with pytest.raises(AnalysisError, match=r"seed variance: every \(method, density\) has one seed"):
        seeds.analyse(load_mod.load([one_seed]))
    with pytest.raises(AnalysisError, match=r"temperature: 0.6667.*sweep one"):
        insensitivity.analyse(load_mod.load([one_seed]))
    with pytest.raises(AnalysisError, match="axis: 'tau'; allowed: temperature, mask_lr"):
        insensitivity.analyse(load_mod.load([known]), axes=["tau"])
    # a trial that has started (its run folder exists) but has no row yet: still running
    (known / "trials" / "cts-running").mkdir(parents=True)
    with pytest.raises(AnalysisError, match="one trial of known has started but not finished"):
        load_mod.load([known])
    assert load_mod.load([known], allow_incomplete=True).skipped["unfinished"] == 1
    # a folder written by another schema version is refused, not misread
    old = tmp_path / "old"
    tid = _trial(old)
    path = next((old / "tables" / "trials").rglob(f"{tid}.parquet"))
    t = pq.read_table(path)
    pq.write_table(t.set_column(0, "schema_version", pa.array([0], pa.int32())), path)
    for argv, message in ((["analyze", "seeds", str(old)], "schema_version [0]"),
                          (["analyze", "seeds", str(one_seed)], "seed variance: every"),
                          (["report", str(tmp_path / "missing")], "does not exist"),
                          (["analyze", "comparison", str(known), "--where", "temperature"], "not COLUMN=VALUE"),
                          (["analyze", "bogus", str(known)], "invalid choice")):
        with pytest.raises(SystemExit) if argv[1] == "bogus" else _nothing():
            assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_same_config_in_two_sweeps_counts_once(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _trial(a, seed=0, acc=0.9)
    _trial(b, seed=0, acc=0.9)
    _trial(b, seed=1, acc=0.8, status="diverged")
    res = load_mod.load([a, b])
    assert len(res.trials) == 1 and res.skipped["duplicate configs"] == 1 and res.skipped["diverged"] == 1
    assert load_mod.load([tmp_path]).sweeps and len(load_mod.load([tmp_path]).trials) == 1   # a folder of sweeps


def test_report_from_a_real_digits_sweep(ray_cluster, tmp_path):
    """Two real sweeps (methods x densities x 3 seeds; CTS temperatures) -> one report whose numbers
    equal the ones computed here straight from the Parquet files."""
    small = {"training.epochs": 2, "training.milestones": [1], "resources.cpus": 1}
    base = str(REPO / "configs" / "digits.yaml")
    grid = {"search.density": [0.1, 0.03], "seed": [0, 1, 2]}
    for name, extra in (("methods", {"search.method": ["cts", "random"]}),
                        ("temps", {"search.temperature": [0.4, 1.5]})):
        f = tmp_path / f"{name}.yaml"
        f.write_text(yaml.safe_dump({"name": name, "storage": str(tmp_path / "sweeps"), "base": base,
                                     "set": small, "grid": {**grid, **extra}}))
        _run([f, "--address", ray_cluster, "--quiet"], tmp_path)
    sweeps = [tmp_path / "sweeps" / "methods", tmp_path / "sweeps" / "temps"]
    out = tmp_path / "report"
    assert cli.main(["report", *map(str, sweeps), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()

    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} == {"accuracy_vs_density.png", "time_to_ticket.png", "seed_variance.png",
                                      "insensitivity_cts_temperature.png", "accuracy_vs_effective_density.png"}
    for p in pngs:
        assert image.imread(p).shape[:2] == plots.PIXELS[::-1] and f"]({p.name})" in md

    rows = [{**r, "method": f.parent.name.removeprefix("method=")}   # the method is in the folder name
            for s in sweeps for f in (s / "tables" / "trials").rglob("*.parquet") for r in pq.read_table(f).to_pylist()]
    assert len(rows) == 24 and {r["status"] for r in rows} == {"finished"}
    by = {}
    for r in rows:
        by.setdefault((r["method"], r["temperature"], r["target_density"]), []).append(100 * r["test_accuracy"])
    for (method, temp, d), acc in by.items():   # every setting is a row, named by what is not default
        label = method if temp is None or abs(temp - 2 / 3) < 1e-9 else f"{method} (temperature={temp:.4g})"
        cell = f"{np.mean(acc):.2f} ± {np.std(acc, ddof=1):.2f}"
        assert re.search(rf"\| {re.escape(label)} \|.*{re.escape(cell)}", md), (label, d, cell)
    for d in (0.1, 0.03):
        means = [np.mean(by["cts", t, d]) for t in sorted(t for (m, t, dd) in by if m == "cts" and dd == d)]
        assert f"| cts | temperature | – | {100 * d:.3g} |" in md
        assert f"| {max(means) - min(means):.2f} [" in md
    # nominal vs effective density: the main settings' means, straight from the Parquet rows
    for method in ("cts", "random"):
        main = [r for r in rows if r["method"] == method and (r["temperature"] is None or abs(r["temperature"] - 2 / 3) < 1e-9)
                and r["target_density"] == 0.03]
        nominal, effective = (100 * np.mean([r[k] for r in main]) for k in ("achieved_density", "effective_density"))
        assert f"| {method} | " in md and f"{nominal:.3g} → {effective:.3g} (" in md, method
    assert "Alive units per layer, mean over seeds; layers (units): 1.weight (256) / 3.weight (128) / 5.weight (10)" in md
    assert "24 finished trials from 2 sweeps (methods, temps)" in md
    assert "## Provenance" in md and rows[0]["code_version"] in md and "config hashes" in md


def test_strong_ticket_table_from_real_runs(tmp_path):
    """Real gates / edge-popup runs (digits; one shared weight family, and gates at its paper default)
    written by the sweep's own row writer: the report's strong-ticket table names the weights and
    holds the runs' own accuracies; a CTS trial beside them stays out, and alone gets no table."""
    import time
    from cts_ray import pipeline
    from cts_ray.records import Trial
    from cts_ray.sweep import trainable

    def run(root, method, density, seed, init=None):
        cfg = config.load(None, [f"search.method={method}", f"search.density={density}", f"seed={seed}",
                                 "training.epochs=2", "training.milestones=[]", "search.length=1.0",
                                 "search.point=init", "training.dense_baseline=false", "data.subset=300",
                                 "resources.device=cpu"] + ([f"search.strong_init={init}"] if init else []))
        folder = root / "trials" / f"{method}-{cfg.hash}"
        s = pipeline.run(cfg, folder, progress=False)
        common = {"sweep": root.name, "trial_id": folder.name, "config_hash": cfg.hash, **tables.axes(cfg)}
        trainable.write_trial_row(root, cfg, common, Trial(status="finished", run_dir=str(folder), node_id="n0",
                                                           started_at=time.time()), s)
        return 100 * s["test_accuracy"]

    root = tmp_path / "strong"
    acc = {(m, w, d): [run(root, m, d, seed, init) for seed in (0, 1)]
           for m, init, w in (("gates", "signed_constant", "signed_constant"),
                              ("edge_popup", "signed_constant", "signed_constant"), ("gates", None, "kaiming_uniform"))
           for d in (0.5, 0.2)}
    run(root, "cts", 0.5, 0)
    assert cli.main(["report", str(root), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    table = md.split("## Strong tickets")[1]
    assert table.splitlines()[2] == ("| sparsity % | gates on kaiming_uniform | gates on signed_constant "
                                     "| edge_popup on signed_constant |")
    for d in (0.5, 0.2):
        cells = [f"{np.mean(a):.2f} ± {np.std(a, ddof=1):.2f}" for a in
                 (acc["gates", "kaiming_uniform", d], acc["gates", "signed_constant", d],
                  acc["edge_popup", "signed_constant", d])]
        assert f"| {100 * (1 - d):.4g} | " + " | ".join(cells) + " |" in table, (d, cells)
    assert "cts" not in table.split("\n\n")[1]
    alone = tmp_path / "cts_only"
    run(alone, "cts", 0.5, 0)
    assert cli.main(["report", str(alone), "--out", str(tmp_path / "r2")]) == 0
    assert "Strong tickets" not in (tmp_path / "r2" / "report.md").read_text()
