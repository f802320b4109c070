"""The ticket a run trained is kept (ticket.pt: masked weights exactly zero, loadable with
weights_only=True) and `cts-ray eval RUN_DIR` re-evaluates it to the recorded accuracy."""
import json
import subprocess

import pytest
import torch

from cts_ray import config as C
from cts_ray import pipeline
from cts_ray.masking import Mask

from conftest import BIN

TINY = ["training.epochs=3", "training.milestones=[2]", "search.length=0.5"]


@pytest.mark.parametrize("method, density", [("cts", 0.05), ("ltr", 0.64), ("gates", 0.5)])
def test_the_final_ticket_is_saved_and_re_evaluates_to_the_recorded_accuracy(tmp_path, method, density):
    out = tmp_path / method
    summary = pipeline.run(C.load(None, [*TINY, f"search.method={method}", f"search.density={density}"]), out,
                           progress=False)
    state = torch.load(out / "ticket.pt", weights_only=True)
    mask = Mask.load(out / "mask.pt")
    for name, keep in mask.layers.items():
        assert torch.all(state[name][~keep] == 0) and torch.count_nonzero(state[name]) <= int(keep.sum())
    again = pipeline.evaluate_run(out)
    assert again["test_accuracy"] == summary["test_accuracy"] == again["recorded"]
    if method == "cts":   # the weights really are the retrained ones, not the search point's
        start = torch.load(out / "search_point.pt", weights_only=True)
        assert any(not torch.equal(state[n], start[n] * mask.layers[n]) for n in mask.layers)


def test_cli_eval_prints_the_accuracy_and_refuses_a_folder_without_a_ticket(tmp_path):
    out = tmp_path / "run"
    summary = pipeline.run(C.load(None, TINY), out, progress=False)
    p = subprocess.run([str(BIN / "cts-ray"), "eval", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    pct = f"{100 * summary['test_accuracy']:.2f} %"
    assert p.stdout.startswith(f"test accuracy {pct}") and f"equal to the recorded {pct}" in p.stdout
    assert json.loads((out / "summary.json").read_text())["peak_test_accuracy"] >= summary["test_accuracy"]
    p = subprocess.run([str(BIN / "cts-ray"), "eval", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.startswith("cts-ray: error: RUN_DIR:") and "no config.yaml" in p.stderr
