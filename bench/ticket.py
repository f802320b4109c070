"""Time to a retrained ticket: CTS vs LTR at density 0.0074, MNIST / LeNet-300-100, CPU.

Real runs of ``cts_ray.pipeline.run`` (what ``cts-ray run`` does) on configs/mnist_lenet300.yaml
into a temporary folder that is removed afterwards: CTS (the config's method, search length 0.5),
CTS with the paper's default search length 0.125 (20 of 160 epochs on CIFAR; 1 epoch here), and LTR
(``search.method=ltr``; rounds = nearest r with 0.8^r to the density: 22 at 0.0074), and CTS with
``search.step: fused`` (its compile included, from inductor's disk cache when warm). All come
from the same config, seed and dense recipe (checked: equal ``dense_identity``), and neither gets a
``DenseCache``: each trains its own dense network in-process, nothing from an earlier run is read.

Times are the runs' own ``summary.json`` fields (training seconds, evaluation excluded, SPEC §1):
``ticket_seconds`` = CTS: dense to the rewind point + search + retraining; LTR: dense to the end +
every round's retraining; plus ``search_seconds`` and each run's wall time. These are single long
runs (CTS, then LTR), not alternated; repeats = 1 unless --repeats is given.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import yaml

from cts_ray import config, data, pipeline
from cts_ray.methods import ltr

from .report import Row, summary

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "mnist_lenet300.yaml"
DENSITY, TARGET = 0.0074, 15.0
SHORT_SEARCH = 0.125     # the paper's default search length (a fraction of training)
QUICK = ["training.epochs=2", "data.subset=2000", "data.test_subset=1000"]   # density 0.5: 3 LTR rounds


def configs(quick: bool, epochs: int | None) -> dict[str, config.Config]:
    root = Path(yaml.safe_load(CONFIG.read_text())["data"]["root"])   # relative to the checkout
    base = [f"data.root={root if root.is_absolute() else (ROOT / root).resolve()}", "resources.device=cpu",
            f"search.density={0.5 if quick else DENSITY}", *(QUICK if quick else [])]
    if epochs:
        base.append(f"training.epochs={epochs}")
    cfgs = {"cts": config.load(CONFIG, base + ["search.method=cts"]),
            "cts_short": config.load(CONFIG, base + ["search.method=cts", f"search.length={SHORT_SEARCH}"]),
            "cts_fused": config.load(CONFIG, base + ["search.method=cts", "search.step=fused"]),
            "ltr": config.load(CONFIG, base + ["search.method=ltr"])}
    ids = [c.dense_identity() for c in cfgs.values()]
    assert all(i == ids[0] for i in ids), "CTS and LTR must share the dense run"
    return cfgs


def run(repeats: int | None = None, quick: bool = False, ticket_epochs: int | None = None, **_) -> list[Row]:
    repeats = repeats or 1
    cfgs = configs(quick, ticket_epochs)
    c, t = cfgs["cts"], cfgs["ltr"]
    rounds = ltr.rounds_for(t.search.density, t.search.ltr_fraction)
    print(f"  MNIST / LeNet-300-100 on CPU, {c.training.epochs} epochs, density {c.search.density:g}, "
          f"LTR {rounds} rounds; single long runs (CTS, short-search CTS, fused CTS, LTR), not alternated; "
          f"{repeats} repeat(s)", flush=True)
    keys = ("ticket_seconds", "search_seconds", "wall", "test_accuracy", "dense_test_accuracy")
    res = {m: {k: [] for k in keys} for m in cfgs}
    data.load(c.data)    # MNIST read from disk once (kept per process), so neither run's wall pays for it
    tmp = Path(tempfile.mkdtemp(prefix="cts-bench-ticket-"))
    try:
        for r in range(repeats):
            for m, cfg in cfgs.items():
                t0 = time.perf_counter()
                s = pipeline.run(cfg, tmp / f"{m}-{r}", progress=False)   # no cache: its own dense run
                s["wall"] = time.perf_counter() - t0
                if m == "ltr":
                    assert len(s["levels"]) == rounds, (len(s["levels"]), rounds)
                for k in keys:
                    res[m][k].append(s[k])
                print(f"  {m}: ticket {s['ticket_seconds']:.1f} s, search {s['search_seconds']:.1f} s, "
                      f"wall {s['wall']:.1f} s, test accuracy {s['test_accuracy']:.4f}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    if len({tuple(r["dense_test_accuracy"]) for r in res.values()}) > 1:
        print("  warning: the dense runs differ in test accuracy (same recipe and seed; nondeterminism?)")
    one = lambda v: (v[0], "—") if repeats == 1 else summary(v)
    med = {m: {k: one(v) for k, v in res[m].items()} for m in res}
    labels = {"cts": f"CTS (search length {c.search.length:g}: {c.search_epochs} epochs)",
              "cts_short": f"CTS (search length {SHORT_SEARCH}: {cfgs['cts_short'].search_epochs} epochs)",
              "cts_fused": f"CTS, fused step (search length {c.search.length:g})",
              "ltr": f"LTR ({rounds} rounds)"}
    rows = []
    for m, label in labels.items():
        (tk, tks), (sr, srs), (w, ws) = med[m]["ticket_seconds"], med[m]["search_seconds"], med[m]["wall"]
        rows += [Row(f"{label}: ticket_seconds", tk, "s", tks),
                 Row(f"{label}: search_seconds", sr, "s", srs),
                 Row(f"{label}: run wall (with evaluation, dense baseline, I/O)", w, "s", ws),
                 Row(f"{label}: ticket test accuracy", 100 * med[m]["test_accuracy"][0], "%")]
    rows.append(Row("dense test accuracy (same recipe and seed for all)",
                    100 * med["cts"]["dense_test_accuracy"][0], "%"))
    acc_l = med["ltr"]["test_accuracy"][0]
    for m in ("cts", "cts_short", "cts_fused"):
        x = [a / b for a, b in zip(res["ltr"]["ticket_seconds"], res[m]["ticket_seconds"])]
        speed, acc_c = summary(x)[0], med[m]["test_accuracy"][0]
        failed = [why for why, bad in (("ratio", speed < TARGET), ("accuracy", acc_c < acc_l)) if bad]
        rows.append(Row(f"time to ticket, LTR / {labels[m]}", speed, "×", one(x)[1],
                        f"accuracy CTS {100 * acc_c:.2f} vs LTR {100 * acc_l:.2f} %",
                        f"≥ {TARGET:.0f}× and CTS accuracy ≥ LTR's",
                        "yes" if not failed else "no: " + " and ".join(failed)))
    return rows
