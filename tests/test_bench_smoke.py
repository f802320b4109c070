"""Smoke test of the benchmark suite: `python -m bench loader data gpu --quick --device cpu` (in-process,
1 round, 1 thread), `paper --quick` and `export --quick` print full tables and leave
bench/RESULTS.md as it was."""
import math
import sys

import torch

from conftest import REPO

sys.path.insert(0, str(REPO))   # `bench` lives beside the package, not inside it
from bench import __main__ as bench_main  # noqa: E402
from bench.report import RESULTS  # noqa: E402


def test_quick_data_and_gpu_benches_give_finite_rows_and_record_nothing(monkeypatch, capsys):
    rows = {}

    def keep(name, fn):
        def wrapped(**kw):
            rows[name] = fn(**kw)
            return rows[name]
        return wrapped

    for name in ("loader", "data", "gpu"):
        monkeypatch.setitem(bench_main.BENCHES, name, keep(name, bench_main.BENCHES[name]))
    before = RESULTS.read_bytes() if RESULTS.exists() else None
    threads = torch.get_num_threads()
    try:
        bench_main.main(["loader", "data", "gpu", "--quick", "--device", "cpu", "--repeats", "1", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert (RESULTS.read_bytes() if RESULTS.exists() else None) == before, "--quick must not touch RESULTS.md"

    names = {k: [r.name for r in v] for k, v in rows.items()}
    for kind in ("train epoch", "loader only"):
        assert sum(kind in n for n in names["loader"]) == 3
        assert any(n.startswith("device-resident") and kind in n for n in names["loader"])
        assert any("num_workers=0" in n and kind in n for n in names["loader"])
        assert any("num_workers=2" in n and kind in n for n in names["loader"])
        assert [n.split(",")[0] for n in names["data"] if kind in n and "32x32" in n][:2] == ["in memory", "streamed"]
    assert any(n.startswith("Ray Data") for n in names["data"]) and any("224x224" in n for n in names["data"])
    for prefix, count in (("a: dense epoch", 3), ("a: torch.compile time", 1), ("b: CTS pipeline", 4),
                          ("c: ", 2), ("b*: one search epoch, fused step", 1)):
        assert sum(n.startswith(prefix) for n in names["gpu"]) == count, (prefix, names["gpu"])
    assert all("extrapolated" in n for n in names["gpu"] if n.startswith("b:"))
    assert not any(n.startswith("d:") for n in names["gpu"])   # GPU memory: CUDA only
    for r in rows["loader"] + rows["data"] + rows["gpu"]:
        assert math.isfinite(r.value) and r.value > 0, r
    out = capsys.readouterr().out
    assert "| name | value |" in out and "EXTRAPOLATED" in out and "appended" not in out


def _quick_on_cifar(monkeypatch, name: str, *args: str) -> list:
    """The rows of `python -m bench NAME --quick --data CIFAR-10-JPEG ARGS`, which must record nothing."""
    from conftest import SHARED_DATA
    rows = []
    real = bench_main.BENCHES[name]
    monkeypatch.setitem(bench_main.BENCHES, name, lambda **kw: rows.extend(real(**kw)) or rows)
    before = RESULTS.read_bytes() if RESULTS.exists() else None
    threads = torch.get_num_threads()
    try:
        bench_main.main([name, "--quick", "--data", str(SHARED_DATA / "CIFAR-10-JPEG"), *args])
    finally:
        torch.set_num_threads(threads)
    assert (RESULTS.read_bytes() if RESULTS.exists() else None) == before, "--quick must not touch RESULTS.md"
    return rows


def test_quick_paper_bench_runs_the_real_pipeline_on_cifar10_jpeg_and_records_nothing(monkeypatch, capsys):
    rows = _quick_on_cifar(monkeypatch, "paper", "--threads", "1")
    names = [r.name for r in rows]
    assert names[0].startswith("ticket test accuracy (density 0.0074; 1 + 2 + 3 epochs")
    assert any(n.startswith("CTS search (2 epochs") for n in names)
    assert all(math.isfinite(r.value) and r.value >= 0 for r in rows)
    assert 0 <= rows[0].value <= 100 and rows[0].ratio == "paper CTS-KL 74.0 %"
    out = capsys.readouterr().out
    assert "(paper 74.0 %)" in out and "(paper 7.9 min)" in out and "| name | value |" in out and "appended" not in out


def test_paper_bench_shortens_only_the_retraining():
    from conftest import SHARED_DATA
    from bench import paper
    from cts_ray import config
    base = paper.data_overrides(SHARED_DATA / "CIFAR-10-JPEG")
    full = config.load(paper.RECIPE, base)
    assert (full.search_epoch, full.search_epochs, full.training.epochs) == (9, 80, 160)
    short = config.load(paper.RECIPE, base + paper.shortened(full, 100))
    assert (short.search_epoch, short.search_epochs, short.training.epochs) == (9, 80, 109)
    assert short.training.milestones == [54, 82]              # the same fractions, 1/2 and 3/4


def test_quick_export_bench_compacts_real_tickets_and_records_nothing(monkeypatch, capsys):
    rows = _quick_on_cifar(monkeypatch, "export")   # one thread inside, without --threads
    for ticket in ("LeNet-300-100 CTS", "LeNet-300-100 SNIP", "ResNet-20 SNIP"):
        mine = [r for r in rows if r.name.startswith(ticket)]
        assert [r.name.split(": ")[1] for r in mine][:3] == ["dense", "masked ticket", "compact"], mine
        assert all(math.isfinite(r.value) and r.value > 0 and "b256:" in r.ratio for r in mine[:3])
    goal = [r for r in rows if r.target != "—"]
    assert len(goal) == 1 and goal[0].name.startswith("LeNet-300-100 CTS") and goal[0].met in ("yes", "no")
    out = capsys.readouterr().out
    assert "| name | value |" in out and "appended" not in out


def test_quick_ddp_bench_trains_in_a_gloo_world_of_two_and_records_nothing(monkeypatch, capsys):
    rows = _quick_on_cifar(monkeypatch, "ddp", "--device", "cpu", "--repeats", "1")
    names = [r.name for r in rows]
    assert names[0].startswith("a: 1 process × 1 thread, world of one") and rows[0].ratio == "1.00"
    assert names[1].startswith("b: 2 processes × 1 thread, gloo world of 2 (16 each)") and rows[1].target == "b/a ≥ 1.6×"
    assert names[2].startswith("b+sync") and names[3].startswith("overhead: train_epochs step, world of one")
    assert names[4].startswith("overhead: the World machinery alone") and math.isfinite(rows[4].value)
    assert [n.split(",")[0] for n in names[5:8]] == ["limit: 1 process", "limit: 2 processes", "limit: gradient all-reduce"]
    assert names[8].startswith("machine: 1-minute load average") and len(rows) == 9
    assert all(math.isfinite(r.value) and r.value > 0 for r in rows[:4] + rows[5:8]), rows
    out = capsys.readouterr().out
    assert "| name | value |" in out and "appended" not in out
