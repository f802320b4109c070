"""The paper's pipeline for one ticket, beside the paper's number: ResNet-20 on CIFAR-10 with the
authors' recipe (configs/cifar10_resnet20.yaml), 9 dense epochs → CTS search (0.5 × 160 = 80 epochs)
→ 151 retraining epochs at density 0.0074, through ``cts_ray.pipeline.run`` (what ``cts-ray run``
does). Prints the ticket's test accuracy and the seconds of each phase (the run's own summary.json:
training seconds, evaluation excluded) and the run's wall time, beside the paper's CTS-KL 74.0 % in
7.9 min (SPEC §5).

Data (``--data DIR``): a folder in ImageFolder layout (``DIR/train/<class>/``) is read as
``data.name: image_folder`` (e.g. CIFAR-10-JPEG, decoded once and cached), otherwise as CIFAR-10 in
torchvision's layout. Default: ``data/CIFAR-10-JPEG`` in the checkout, else the shared copy.

Sizing (``--budget S``, default 540 s = the issue's 9 minutes, for the whole bench): one dense and
one CTS search epoch are timed first on the loaded data (``gpu``'s helpers; the first dense epoch is
a discarded warm-up); if 9 + 80 search + 151 epochs would not fit the rest of the budget, only the
retraining is shortened: ``training.epochs`` = 9 + R with the LR milestones at the same fractions (½,
¾) and ``search.length`` = 80 / epochs, so the search keeps its 80 epochs. Such a run says
"SHORTENED" in its rows. ``--budget 0`` runs the full recipe whatever it costs.

``--quick``: a CPU smoke test (recorded nowhere): 1 + 2 search + 3 retraining epochs on a real
subset of CIFAR-10-JPEG (20 training and 10 test images per class, copied to a temporary folder)
at batch 64.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from cts_ray import config, data as data_mod, models, pipeline, runtime
from cts_ray.methods import METHODS, SearchContext
from cts_ray.train import prepare

from .report import Row

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "configs" / "cifar10_resnet20.yaml"
DATA = [ROOT / "data" / "CIFAR-10-JPEG", ROOT.parent / "shared" / "datasets" / "CIFAR-10-JPEG"]
PAPER_ACCURACY, PAPER_MINUTES, DENSITY = 74.0, 7.9, 0.0074
BUDGET = 540.0
SLACK = 20.0      # seconds kept for what the plan does not time: model build, run folder, the final summary
QUICK = ["training.epochs=4", "training.milestones=[2, 3]", "search.rewind_epochs=1", "training.batch_size=64",
         "resources.device=cpu"]


def data_overrides(path: Path) -> list[str]:
    if (path / "train").is_dir():
        return ["data.name=image_folder", f"data.root={path}"]
    return ["data.name=cifar10", f"data.root={path}"]


def quick_subset(src: Path, dst: Path, train: int = 20, test: int = 10) -> Path:
    """The first ``train`` / ``test`` images of every class of an ImageFolder copy."""
    for split, n in (("train", train), ("test", test)):
        for c in sorted(p for p in (src / split).iterdir() if p.is_dir()):
            (dst / split / c.name).mkdir(parents=True)
            for f in sorted(c.iterdir())[:n]:
                shutil.copy2(f, dst / split / c.name / f.name)
    return dst


def shortened(cfg: config.Config, retrain_epochs: int) -> list[str]:
    """Overrides that keep the dense and search epochs and retrain ``retrain_epochs`` epochs."""
    full, k, search = cfg.training.epochs, cfg.search_epoch, cfg.search_epochs
    epochs = max(k + retrain_epochs, search)    # search.length must stay <= 1
    milestones = [round(m * epochs / full) for m in cfg.training.milestones]
    return [f"training.epochs={epochs}", f"training.milestones={milestones}", f"search.length={search / epochs}"]


def epoch_times(cfg: config.Config) -> tuple[float, float]:
    """(one dense epoch with its evaluation, one CTS search epoch), seconds, on ``cfg``'s data."""
    from . import gpu
    device = runtime.configure(cfg.resources)
    amp = runtime.use_amp(cfg.resources, device)
    data = data_mod.load(cfg.data, device)
    torch.manual_seed(0)
    model = prepare(models.from_config(cfg.model, data.input_shape, data.num_classes, cfg.data.name), device, amp)
    gpu.one_epoch(model, data, cfg, amp)                   # warm-up: cudnn.benchmark, allocator
    dense = gpu.one_epoch(model, data, cfg, amp)[1]
    raw = cfg.to_dict()
    raw["search"]["length"] = 1 / cfg.training.epochs      # one search epoch
    ticket = METHODS["cts"].search(SearchContext(cfg=config.from_dict(raw), model=model, data=data, device=device,
                                                 amp=amp))
    return dense, ticket.history[0]["seconds"]


def run(quick: bool = False, data: str | None = None, budget: float | None = None, device: str = "auto",
        **_) -> list[Row]:
    src = Path(data) if data else next((p for p in DATA if p.is_dir()), DATA[-1])
    tmp = Path(tempfile.mkdtemp(prefix="cts-bench-paper-"))
    cache = os.environ.get("CTS_RAY_CACHE")
    try:
        if quick:   # a fresh copy each time: its decoded cache goes with it, not into the user's cache
            src = quick_subset(src, tmp / "data")
            os.environ["CTS_RAY_CACHE"] = str(tmp / "cache")
        base = [*data_overrides(src), f"resources.device={'cpu' if quick else device}", *(QUICK if quick else [])]
        cfg = config.load(RECIPE, base)
        t_start = time.perf_counter()
        data_mod.load(cfg.data)                  # decoded / read once (cached), not part of any phase
        load_s = time.perf_counter() - t_start
        budget = BUDGET if budget is None else budget
        note, plan = "", ""
        cuda = runtime.select_device(cfg.resources).type == "cuda"
        if budget and not quick:
            dense_s, search_s = epoch_times(cfg)
            left = budget - (time.perf_counter() - t_start) - SLACK
            k, search = cfg.search_epoch, cfg.search_epochs
            fits = math.floor((left - k * dense_s - search * search_s) / dense_s)
            plan = (f"measured: dense epoch {dense_s:.2f} s, search epoch {search_s:.2f} s; {left:.0f} s left → "
                    f"{k} + {search} + up to {fits} retraining epochs")
            print(f"  plan: {plan}", flush=True)
            retrain = cfg.training.epochs - k
            if fits < 1:
                print("  plan: even 1 retraining epoch does not fit the budget; running with 1 (over budget)",
                      flush=True)
            if fits < retrain:
                cfg = config.load(RECIPE, base + shortened(cfg, max(fits, 1)))
                note = f" SHORTENED: {cfg.training.epochs - k} of {retrain} retraining epochs"
        print(f"  ResNet-20 / {cfg.data.name} ({src}) on {'CUDA' if cuda else 'CPU'}: {cfg.search_epoch} dense + "
              f"{cfg.search_epochs} search + {cfg.training.epochs - cfg.search_epoch} retraining epochs, batch "
              f"{cfg.training.batch_size}, density {cfg.search.density}{note}", flush=True)
        t0 = time.perf_counter()
        s = pipeline.run(cfg, tmp / "run", progress=False)
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if quick:
            os.environ.pop("CTS_RAY_CACHE") if cache is None else os.environ.update(CTS_RAY_CACHE=cache)
    total = time.perf_counter() - t_start
    print(f"  test accuracy {100 * s['test_accuracy']:.2f} % (paper {PAPER_ACCURACY} %), ticket "
          f"{s['ticket_seconds'] / 60:.2f} min (paper {PAPER_MINUTES} min), run wall {wall:.1f} s", flush=True)
    ok = lambda c: "— (quick)" if quick else ("yes" if c else "no") if cuda else "— (not a GPU run)"
    epochs = f"{cfg.search_epoch} + {cfg.search_epochs} + {cfg.training.epochs - cfg.search_epoch} epochs{note}"
    return [
        Row(f"ticket test accuracy (density {cfg.search.density}; {epochs})", 100 * s["test_accuracy"], "%",
            ratio=f"paper CTS-KL {PAPER_ACCURACY} %"),
        Row("peak test accuracy over retraining (not a selected result)", 100 * s["peak_test_accuracy"], "%"),
        Row(f"dense to the rewind point ({cfg.search_epoch} epochs)", s["pretrain_seconds"], "s"),
        Row(f"CTS search ({cfg.search_epochs} epochs, fp32)", s["search_seconds"], "s"),
        Row(f"retraining ({cfg.training.epochs - cfg.search_epoch} epochs)", s["retrain_seconds"], "s"),
        Row("time to ticket (dense + search + retraining)", s["ticket_seconds"] / 60, "min",
            ratio=f"paper {PAPER_MINUTES} min"),
        Row("run wall (with evaluation after every epoch, I/O)", wall, "s"),
        Row(f"whole bench: data load {load_s:.0f} s + sizing + run", total, "s", ratio=plan or "—",
            target=f"≤ {BUDGET:.0f} s on one GPU", met=ok(total <= BUDGET)),
    ]
