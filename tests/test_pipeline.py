"""End-to-end runs: `cts-ray run` on digits, reproducibility, and CTS beating a random ticket on MNIST."""
import json
import subprocess

import pytest
import torch

from cts_ray import config as C
from cts_ray import models, pipeline
from cts_ray.anatomy import anatomy
from cts_ray.masking import Mask

from conftest import REPO

QUICK = ["training.epochs=6", "training.milestones=[4]", "search.length=0.5"]


def test_cli_run_writes_a_complete_run_folder(tmp_path):
    out = tmp_path / "run"
    p = subprocess.run([str(REPO / ".venv" / "bin" / "cts-ray"), "run", str(REPO / "configs" / "digits.yaml"),
                        *sum((["--set", o] for o in QUICK), []), "--out", str(out), "--quiet"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "ticket test accuracy" in p.stdout and str(out) in p.stdout
    assert sorted(f.name for f in out.iterdir()) == sorted(pipeline.RUN_FILES)
    summary = json.loads((out / "summary.json").read_text())
    for key in ("method", "objective", "seed", "config_hash", "target_density", "achieved_density",
                "test_accuracy", "dense_test_accuracy", "pretrain_seconds", "search_seconds",
                "retrain_seconds", "mask_sha256", "code_version", "library_versions"):
        assert summary[key] is not None, key
    cfg = C.load(out / "config.yaml")
    assert summary["config_hash"] == cfg.hash and summary["config"] == cfg.to_dict()
    mask = Mask.load(out / "mask.pt")
    assert mask.sha256() == summary["mask_sha256"]
    assert summary["achieved_density"] == mask.density and mask.kept == round(0.05 * mask.numel)
    layers = json.loads((out / "layers.json").read_text())
    assert layers[-1]["kept"] == mask.kept and summary["layer_densities"].keys() == mask.layers.keys()
    # ticket anatomy, recomputed from the saved mask on a freshly built model of the same shape
    a = anatomy(models.build("mlp_digits", (1, 8, 8), 10), mask, (1, 8, 8))
    assert (summary["effective_kept"], summary["effective_density"], summary["collapsed_layers"]) == \
        (a.effective_kept, a.effective_density, a.collapsed_layers) and 0 < a.effective_kept <= mask.kept
    assert layers == a.report() and summary["layer_alive_units"] == {r["layer"]: r["alive_units"] for r in layers[:-1]}
    assert "effective density" in p.stdout and f"({a.effective_kept} of {mask.kept} kept weights on a path)" in p.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    phases = [r["phase"] for r in records]
    assert phases == ["dense"] * 6 + ["search"] * 3 + ["retrain"] * 5  # rewind point 1 → retrain epochs 2..6
    assert records[-1]["test_accuracy"] == summary["test_accuracy"] > 0.5
    assert summary["dense_test_accuracy"] > 0.9
    # the search-point checkpoint is the dense net after the rewind epoch
    assert set(torch.load(out / "search_point.pt", weights_only=True)) >= set(mask.layers)
    # an existing run folder is never overwritten unless asked
    again = subprocess.run([str(REPO / ".venv" / "bin" / "cts-ray"), "run", "--out", str(out), "--quiet"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 2 and "already holds a run" in again.stderr
    assert json.loads((out / "summary.json").read_text()) == summary


def test_same_seed_same_mask_different_seed_different_mask(tmp_path):
    cfg = C.load(None, QUICK + ["training.dense_baseline=false"])
    a = pipeline.run(cfg, tmp_path / "a", progress=False)
    b = pipeline.run(cfg, tmp_path / "b", progress=False)
    c = pipeline.run(C.load(None, QUICK + ["training.dense_baseline=false", "seed=1"]), tmp_path / "c", progress=False)
    assert a["mask_sha256"] == b["mask_sha256"] and a["test_accuracy"] == b["test_accuracy"]
    assert c["mask_sha256"] != a["mask_sha256"] and c["config_hash"] != a["config_hash"]


@pytest.mark.parametrize("phase, epoch, step", [("search", 2, "exact"), ("retrain", 3, "exact"), ("search", 2, "fused")])
def test_a_run_resumed_from_its_checkpoint_ends_as_an_uninterrupted_run(tmp_path, phase, epoch, step):
    """What a sweep trial checkpoints (``Progress`` after a CTS search epoch or a retraining epoch,
    through torch.save / weights_only load) continues to the same mask and accuracy, with only the
    remaining epochs run; the fused search step too (its fused Adam's state, its noise keys)."""
    import io
    cfg = C.load(None, QUICK + ["training.dense_baseline=false", f"search.step={step}"])
    saved = {}

    def on_record(record, progress):
        if record["phase"] == phase and record["epoch"] == epoch:
            assert progress is not None, f"no checkpoint with {phase} epoch {epoch}"
            buf = io.BytesIO()
            torch.save(progress.to_state(), buf)
            saved["state"] = buf.getvalue()

    full = pipeline.run(cfg, tmp_path / "full", progress=False, on_record=on_record)
    state = torch.load(io.BytesIO(saved["state"]), weights_only=True)
    assert (state["search"] is not None) == (phase == "search")
    later = []
    resumed = pipeline.run(cfg, tmp_path / "resumed", progress=False, resume=pipeline.Progress.from_state(state),
                           on_record=lambda r, p: later.append((r["phase"], r["epoch"])))
    assert resumed["mask_sha256"] == full["mask_sha256"]
    assert resumed["test_accuracy"] == full["test_accuracy"]
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    at = next(i for i, r in enumerate(records) if (r["phase"], r["epoch"]) == (phase, epoch))
    assert later == [(r["phase"], r["epoch"]) for r in records[at + 1:]]   # only what was left
    again = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    drop = lambda r: {k: v for k, v in r.items() if k != "seconds"}
    assert [drop(r) for r in again] == [drop(r) for r in records]


def test_failed_run_leaves_nothing_behind(tmp_path):
    cfg = C.load(None, QUICK + ["training.lr=1e30", "training.momentum=0"])
    from cts_ray.train import DivergedError
    with pytest.raises(DivergedError):
        pipeline.run(cfg, tmp_path / "run", progress=False)
    assert list(tmp_path.iterdir()) == []
