"""GitHub issue 7, item 4: a corpus of bad input, each refused for real before Ray starts.

Every row is a malformed sweep file, run config or command line, given to the real `cts-ray`
entry point (in process, and three of them through the installed console script). Each must
exit 2 with exactly one line on stderr naming the field and what is allowed, leave the results
folder (the sweep's ``storage`` / the run's ``--out``) empty, write nothing where it was started,
and never get as far as ``ray.init``.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

from conftest import REPO

BIN = REPO / ".venv" / "bin"
BASE = str(REPO / "configs" / "digits.yaml")
SMALL = {"training.epochs": 2, "training.milestones": [1]}   # a valid trial, were it ever run


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[Path, Path], list]   # (input folder, results folder) -> command line; writes the inputs
    field: str                           # the stderr line names this ...
    allowed: str                         # ... and says this about what is allowed


def sweep(body: dict | None = None, *extra: str, storage: Callable[[Path, Path], str] | None = None):
    """`cts-ray sweep FILE`: a sweep over the digits base, storage in the results folder."""
    def build(inp: Path, results: Path) -> list:
        raw = {"base": BASE, "set": dict(SMALL), **(body or {})}
        raw["storage"] = storage(inp, results) if storage else str(results)
        f = inp / "bad.yaml"
        f.write_text(yaml.safe_dump(raw, sort_keys=False))
        return ["sweep", str(f), "--quiet", *extra]
    return build


def sweep_text(text: str | bytes):
    """`cts-ray sweep FILE` for a file with exactly this content."""
    def build(inp: Path, results: Path) -> list:
        f = inp / "bad.yaml"
        f.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["sweep", str(f), "--quiet"]
    return build


def run(*args: str, config: str | None = None, out: Callable[[Path, Path], Path] | None = None):
    """`cts-ray run [CONFIG] ARGS --out RESULTS/run`."""
    def build(inp: Path, results: Path) -> list:
        files = []
        if config is not None:
            (inp / "run.yaml").write_text(config)
            files = [str(inp / "run.yaml")]
        where = out(inp, results) if out else results / "run"
        return ["run", *files, *args, "--out", str(where), "--quiet"]
    return build


def a_file(inp: Path, name: str = "afile") -> Path:
    f = inp / name
    f.write_text("not a folder\n")
    return f


CASES = [
    # ---- out-of-range values
    Case("density-0", sweep({"grid": {"search.density": [0.1, 0]}}), "search.density", "(0, 1]"),
    Case("density-1.5", sweep({"set": {**SMALL, "search.density": 1.5}}), "search.density", "(0, 1]"),
    Case("density-negative", sweep({"grid": {"search.density": [-0.1]}}), "search.density", "(0, 1]"),
    Case("density-abc", sweep({"grid": {"search.density": ["abc"]}}), "search.density", "expected a number"),
    Case("temperature-0", sweep({"set": {**SMALL, "search.temperature": 0}}), "search.temperature", "a number > 0"),
    Case("temperature-negative", sweep({"grid": {"search.temperature": [0.5, -1]}}), "search.temperature",
         "a number > 0"),
    Case("gpus-negative", sweep({"set": {**SMALL, "resources.gpus": -1}}), "resources.gpus",
         "0, a number in [0.0001, 1] or a whole number > 1"),
    Case("gpus-1.5-not-whole", sweep({"set": {**SMALL, "resources.gpus": 1.5}}), "resources.gpus",
         "a whole number > 1"),
    Case("gpus-finer-than-ray", sweep({"grid": {"resources.gpus": [0.00001]}}), "resources.gpus",
         "[0.0001, 1]"),
    Case("cpus-0", sweep({"set": {**SMALL, "resources.cpus": 0}}), "resources.cpus", "a number >= 0.0001"),
    Case("rewind-after-the-end", sweep({"set": {**SMALL, "search.rewind_epochs": 3}}), "search.rewind_epochs",
         "expected 0..2"),
    # ---- unknown names
    Case("method-unknown", sweep({"grid": {"search.method": ["cts", "nope"]}}), "search.method",
         "choose one of: cts, edge_popup, gates"),
    Case("objective-unknown", sweep({"set": {**SMALL, "search.objective": "l2"}}), "search.objective",
         "kl_reverse"),
    Case("model-unknown", sweep({"set": {**SMALL, "model.name": "resnet1000"}}), "model.name", "resnet20"),
    Case("dataset-unknown", sweep({"set": {**SMALL, "data.name": "svhn"}}), "data.name", "cifar10, cifar100"),
    Case("controller-unknown", sweep({"set": {**SMALL, "search.controller": "pid"}}), "search.controller",
         "gradbalance, lagrange"),
    Case("searcher-unknown", sweep({"searcher": "hyperband"}), "searcher", "grid, random, optuna"),
    Case("sanity-unknown", sweep({"set": {**SMALL, "search.sanity": "flip"}}), "search.sanity",
         "none, shuffle, invert, reinit"),
    Case("metric-unknown", sweep({"metric": "loss"}), "metric", "test_accuracy, peak_test_accuracy"),
    Case("mode-unknown", sweep({"mode": "maximize"}), "mode", "max, min"),
    # ---- wrong types
    Case("epochs-ten", sweep({"set": {**SMALL, "training.epochs": "ten"}}), "training.epochs", "an integer"),
    Case("seed-1.5", sweep({"grid": {"seed": [0, 1.5]}}), "seed", "expected an integer"),
    Case("grid-value-not-a-list", sweep({"grid": {"search.density": 0.1}}), "grid.search.density",
         "expected a list of values"),
    Case("num_samples-0", sweep({"num_samples": 0}), "num_samples", "an integer >= 1"),
    Case("max_failures-negative", sweep({"max_failures": -1}), "max_failures", "an integer >= 0"),
    Case("mlflow-experiment-not-a-string", sweep({"mlflow": {"experiment": {"x": 1}}}), "mlflow.experiment",
         "a non-empty string or null"),
    Case("mlflow-system-metrics-not-a-bool", sweep({"mlflow": {"system_metrics": "yes"}}), "mlflow.system_metrics",
         "expected true or false"),
    # ---- malformed or missing files
    Case("yaml-tab-indent", sweep_text(f"base: {BASE}\ngrid:\n\tseed: [0, 1]\n"), "bad.yaml",
         "malformed YAML at line 3"),
    Case("yaml-unclosed-bracket", sweep_text(f"base: {BASE}\ngrid:\n  seed: [0, 1\n"), "bad.yaml",
         "malformed YAML"),
    Case("yaml-list-not-mapping", sweep_text(f"- base: {BASE}\n- grid: {{}}\n"), "bad.yaml",
         "expected a mapping with keys name, base, set, grid"),
    Case("file-not-utf8", sweep_text(b"name: \xff\xfe bad\n"), "bad.yaml", "expected a readable UTF-8 YAML file"),
    Case("sweep-file-missing", lambda inp, res: ["sweep", str(inp / "nope.yaml")], "nope.yaml",
         "does not exist; expected a YAML file"),
    Case("base-file-missing", sweep({"base": "missing.yaml"}), "base", "expected a YAML run config"),
    Case("grid-empty-list", sweep({"grid": {"search.density": []}}), "grid.search.density",
         "expected at least one value"),
    Case("sweep-key-unknown", sweep({"searchr": "grid"}), "searchr", "allowed: name, base, set, grid"),
    Case("set-run-key-unknown", sweep({"set": {**SMALL, "search.densty": 0.1}}), "search.densty",
         "allowed keys in search: method, density"),
    Case("grid-run-key-unknown", sweep({"grid": {"training.lrr": [0.1, 0.2]}}), "training.lrr",
         "allowed keys in training"),
    # ---- contradictions
    Case("gates-with-retrain", sweep({"set": {**SMALL, "search.method": "gates", "training.retrain": True}}),
         "training.retrain", "expected null or false"),
    Case("edge_popup-with-retrain", sweep({"set": {**SMALL, "training.retrain": True},
                                           "grid": {"search.method": ["cts", "edge_popup"]}}),
         "training.retrain", "expected null or false"),
    Case("ltr-density-above-first-round", sweep({"set": {**SMALL, "search.method": "ltr"},
                                                 "grid": {"search.density": [0.5, 0.9]}}),
         "search.density", "expected a density <= 0.8"),
    Case("invert-without-scores", sweep({"set": {**SMALL, "search.method": "random", "search.sanity": "invert"}}),
         "search.sanity", "choose one of: none, shuffle, reinit"),
    Case("grid-searcher-with-sample", sweep({"sample": {"search.temperature": {"uniform": [0.1, 1.0]}}}),
         "searcher", "choose one of: random, optuna"),
    Case("asha-with-multi-objective", sweep({"searcher": "optuna", "grid": {"search.density": [0.1, 0.05]},
                                             "metric": ["test_accuracy", "ticket_seconds"], "mode": ["max", "min"],
                                             "scheduler": {"asha": {"grace_period": 1}}}),
         "scheduler", "set scheduler: null"),
    # ---- searchers, distributions, schedulers
    Case("optuna-nothing-to-search", sweep({"searcher": "optuna"}), "searcher", "choose one of: grid, random"),
    Case("loguniform-low-0", sweep({"searcher": "optuna", "sample": {"search.temperature": {"loguniform": [0, 1]}}}),
         "sample.search.temperature.loguniform", "must be > 0"),
    Case("uniform-bounds-reversed", sweep({"searcher": "random", "sample": {"search.lr": {"uniform": [0.1, 0.01]}}}),
         "sample.search.lr.uniform", "must be below high"),
    Case("distribution-unknown", sweep({"searcher": "random", "sample": {"search.temperature": {"normal": [0, 1]}}}),
         "sample.search.temperature", "{loguniform: [lo, hi]}"),
    Case("distribution-edge-out-of-range", sweep({"searcher": "random",
                                                  "sample": {"search.density": {"uniform": [0.5, 2]}}}),
         "search.density", "(0, 1]"),
    Case("asha-key-unknown", sweep({"scheduler": {"asha": {"grace": 2}}}), "scheduler.asha.grace",
         "grace_period, reduction_factor, max_t"),
    # ---- where data and results live
    Case("mnist-root-missing", sweep({"set": {**SMALL, "data.name": "mnist", "model.name": "lenet_300_100",
                                              "data.root": "/nonexistent/mnist"}}),
         "data.root", "expected an existing folder"),
    Case("mnist-root-without-mnist", lambda inp, res: sweep({"set": {**SMALL, "data.name": "mnist",
                                                                      "model.name": "lenet_300_100",
                                                                      "data.root": str(inp)}})(inp, res),
         "data.root", "has no mnist in torchvision's layout (no MNIST/raw/train-images-idx3-ubyte)"),
    Case("run-cifar-root-without-cifar", lambda inp, res: run("--set", "data.name=cifar10", "--set",
                                                              "model.name=resnet20", "--set",
                                                              f"data.root={inp}")(inp, res),
         "data.root", "has no cifar10 in torchvision's layout (no cifar-10-batches-py/data_batch_1)"),
    Case("storage-is-a-file", sweep(storage=lambda inp, res: str(a_file(inp))), "storage", "expected a folder path"),
    Case("storage-inside-a-file", sweep(storage=lambda inp, res: str(a_file(inp) / "sweeps")), "storage",
         "expected a folder path"),
    # ---- the sweep command line
    Case("sweep-set-without-equals", sweep({}, "--set", "training.epochs"), "--set", "expected KEY=VALUE"),
    Case("sweep-set-unknown-key", sweep({}, "--set", "search.densty=0.1"), "search.densty",
         "allowed keys in search"),
    Case("sweep-set-bad-value", sweep({}, "--set", "num_samples=-3"), "num_samples", "an integer >= 1"),
    Case("sweep-name-is-a-path", sweep({}, "--name", "../escape"), "name", "a plain folder name"),
    Case("sweep-resume-nothing", sweep({}, "--resume"), "--resume", "run it without --resume first"),
    Case("sweep-without-file", lambda inp, res: ["sweep"], "file", "required"),
    Case("command-unknown", lambda inp, res: ["frobnicate"], "frobnicate", "choose from 'run', 'sweep'"),
    # ---- the run command line
    Case("run-config-missing", lambda inp, res: ["run", str(inp / "missing.yaml"), "--out", str(res / "run")],
         "missing.yaml", "does not exist; expected a YAML file"),
    Case("run-config-key-unknown", run(config="training:\n  epoch: 3\n"), "training.epoch",
         "allowed keys in training"),
    Case("run-config-section-not-mapping", run(config="training: 5\n"), "training", "expected a mapping"),
    Case("run-set-without-equals", run("--set", "search.density"), "--set", "expected KEY=VALUE"),
    Case("run-set-unknown-key", run("--set", "search.densty=0.1"), "search.densty", "allowed keys in search"),
    Case("run-set-bad-type", run("--set", "seed=1.5"), "seed", "expected an integer"),
    Case("run-mnist-root-missing", run("--set", "data.name=mnist", "--set", "model.name=lenet_300_100",
                                       "--set", "data.root=/nonexistent/mnist"), "data.root", "does not exist"),
    Case("run-out-inside-a-file", run(out=lambda inp, res: a_file(inp) / "run"), "--out", "expected a folder path"),
]


def _main(argv: list) -> int:
    from cts_ray import cli
    try:
        return cli.main(argv)
    except SystemExit as e:      # argparse errors
        return e.code


def _folders(tmp_path: Path) -> tuple[Path, Path, Path]:
    inp, results, cwd = tmp_path / "in", tmp_path / "results", tmp_path / "cwd"
    inp.mkdir()
    cwd.mkdir()
    return inp, results, cwd


def _nothing_written(tmp_path: Path, inputs: list, results: Path, cwd: Path) -> None:
    assert not results.exists() or not any(results.iterdir()), f"written to the results folder: {list(results.rglob('*'))}"
    assert not any(cwd.iterdir()), f"written where the command ran: {list(cwd.rglob('*'))}"
    assert sorted((tmp_path / "in").rglob("*")) == inputs, "the input folder changed"
    made = [p for p in tmp_path.rglob("*") if p.name in ("tune", "mlflow.db", "mlruns", "optuna.db", "trials")]
    assert made == [], made


@pytest.fixture
def no_ray(monkeypatch):
    """Real Ray, but a call to ray.init means the bad input got past validation: fail at once."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("ray.init was called: the bad input was not refused before Ray starts")

    assert not ray.is_initialized()
    monkeypatch.setattr(ray, "init", refuse)
    yield ray
    assert not ray.is_initialized()


def test_the_corpus_is_large_and_distinct():
    assert len(CASES) >= 34 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_before_ray_starts(case, tmp_path, monkeypatch, capsys, no_ray):
    inp, results, cwd = _folders(tmp_path)
    monkeypatch.chdir(cwd)              # default results/ and mlruns/ would land here
    argv = case.argv(inp, results)
    inputs = sorted(inp.rglob("*"))
    code = _main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, (argv, code, err)
    assert len(lines) == 1 and err.endswith("\n") and lines[0].startswith("cts-ray: error: "), err
    line = lines[0]
    assert case.field in line, f"the message does not name {case.field!r}: {line}"
    assert case.allowed in line, f"the message does not say {case.allowed!r}: {line}"
    assert "Traceback" not in err
    _nothing_written(tmp_path, inputs, results, cwd)
    assert not no_ray.is_initialized()


CONSOLE = ["gpus-1.5-not-whole", "yaml-tab-indent", "run-set-without-equals"]


@pytest.mark.parametrize("case", [c for c in CASES if c.id in CONSOLE], ids=CONSOLE)
def test_console_script_exits_2_with_one_line(case, tmp_path):
    """End to end through the installed `cts-ray` script, in a fresh process."""
    inp, results, cwd = _folders(tmp_path)
    argv = case.argv(inp, results)
    inputs = sorted(inp.rglob("*"))
    p = subprocess.run([str(BIN / "cts-ray"), *argv], capture_output=True, text=True, cwd=cwd, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and lines[0].startswith("cts-ray: error: "), p.stderr
    assert case.field in lines[0] and case.allowed in lines[0], lines[0]
    assert p.stdout == ""
    _nothing_written(tmp_path, inputs, results, cwd)
