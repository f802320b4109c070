"""What a new user meets on day one: a diverged run, the device and threads a run records, piping
into `head`, `--version`, learning-rate milestones past the end of training."""
import os
import subprocess
import warnings

import pytest

from cts_ray import config as C
from cts_ray import pipeline, runtime, versions

from conftest import BIN

TINY = ["training.epochs=2", "training.milestones=[1]", "search.length=0.5"]


def _cli(*args, **kw):
    return subprocess.run([str(BIN / "cts-ray"), *map(str, args)], capture_output=True, text=True, timeout=300, **kw)


def test_a_diverged_run_ends_with_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    p = _cli("run", *sum((["--set", o] for o in [*TINY, "training.lr=1000"]), []), "--out", out, "--quiet")
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cts-ray: diverged: dense: training loss became nan"), p.stderr
    assert not out.exists() and not list(tmp_path.glob(".run.partial-*"))


def test_summary_records_the_compute_device_and_one_thread_for_a_small_model(tmp_path):
    import torch
    before = torch.get_num_threads()
    try:
        summary = pipeline.run(C.load(None, TINY), tmp_path / "run", progress=False)
    finally:
        torch.set_num_threads(before)
    assert summary["device"] == "cpu"              # torch's device string, not the CPU architecture
    assert summary["threads"] == 1                 # mlp_digits is far below runtime.SMALL_MODEL_PARAMS
    assert runtime.default_threads(runtime.SMALL_MODEL_PARAMS) >= 1


def test_output_into_a_closed_pipe_exits_cleanly():
    read, write = os.pipe()
    os.close(read)                                 # the reader is gone before anything is written (| head)
    p = subprocess.run([str(BIN / "cts-ray"), "config", "--keys"], stdout=write, stderr=subprocess.PIPE,
                       text=True, timeout=120)
    os.close(write)
    assert p.returncode == 0 and p.stderr == "", p.stderr


def test_version_prints_the_code_version():
    p = _cli("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"cts-ray {versions.code_version()}"


def test_milestones_past_the_end_are_refused_when_set_and_warned_when_defaulted():
    with pytest.raises(C.ConfigError, match=r"^training\.milestones: \[50\] never reached with training\.epochs=10"):
        C.load(None, ["training.epochs=10", "training.milestones=[5, 50]"])
    with pytest.warns(UserWarning, match=r"of the default \[15, 25\] never reached with training.epochs=6"):
        C.load(None, ["training.epochs=6"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        C.load(None, ["training.epochs=6", "training.milestones=[4]"])
