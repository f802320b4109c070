"""Per-step time of dense training, masked training (density 0.05) and the CTS search step (exact,
the default, and fused: ``search.step``).

ResNet-20, batch 128, CPU, CIFAR-shaped synthetic data (CIFAR cannot be downloaded here; step
time does not depend on pixel values). Everything goes through the project's own code paths:
``train_epochs`` for (masked) training and ``METHODS['cts']`` for the search, each timed by the
``seconds`` those paths record themselves (evaluation and setup excluded).

LeNet-300-100 at batch 60 (the MNIST recipe: Adam), MNIST-shaped synthetic data: a dense epoch
against a search epoch: the exact step eager and compiled (``resources.compile_search``), and the
fused step (``search.step: fused``, compiled), each search a whole 5-epoch search divided by 5 (so
the teacher's outputs, computed once, are paid for); the compiles happen in the warm-up (once per
process) and the first one is reported on its own.
"""
from __future__ import annotations

import copy

import torch

from cts_ray import config, models
from cts_ray.data import DeviceData
from cts_ray.masking import Mask, kept_count, layer_shapes
from cts_ray.methods import METHODS, SearchContext
from cts_ray.train import train_epochs

from .report import Row, alternate, ratio, summary

BATCH, DENSITY = 128, 0.05
LENET_BATCH, LENET_EPOCHS = 60, 5


def synthetic(steps: int) -> DeviceData:
    g = torch.Generator().manual_seed(0)
    x = lambda n: torch.randn(n, 3, 32, 32, generator=g)   # already "normalised"
    y = lambda n: torch.randint(0, 10, (n,), generator=g)
    n = BATCH * steps
    return DeviceData(x(n), y(n), x(BATCH), y(BATCH), 10, (3, 32, 32), augment=False)


def run(steps: int = 10, repeats: int = 5, **_) -> list[Row]:
    over = ["model.name=resnet20", f"training.batch_size={BATCH}", "training.epochs=1", "search.length=1.0",
            "search.point=init", "training.milestones=[]", f"search.density={DENSITY}"]
    cfg = config.load(None, over)
    data = synthetic(steps)
    torch.manual_seed(0)
    model = models.build("resnet20", (3, 32, 32), 10)
    init = copy.deepcopy(model.state_dict())
    shapes = layer_shapes(model)
    d = sum(s.numel() for s in shapes.values())
    mask = Mask.top_k(torch.rand(d, generator=torch.Generator().manual_seed(1)), kept_count(DENSITY, d), shapes)

    def epoch(m):  # one training epoch from the same initial weights each time, so rounds are alike
        model.load_state_dict(init)
        rec = next(train_epochs(model, data, cfg.training, start=0, end=1, order_seed=0,
                                mask=m, amp=False, phase="bench"))
        return rec["seconds"]

    fused = config.load(None, over + ["search.step=fused"])

    def search(c=cfg):
        model.load_state_dict(init)
        ticket = METHODS["cts"].search(SearchContext(cfg=c, model=model, data=data, device=torch.device("cpu")))
        return ticket.history[0]["seconds"]

    runs = {"dense": lambda: epoch(None), "masked": lambda: epoch(mask), "search": search,
            "search fused": lambda: search(fused)}
    ms = alternate({n: (lambda fn=fn: 1000 * fn() / steps) for n, fn in runs.items()}, repeats, " ms")

    med = {n: summary(ms[n]) for n in ms}
    rows = [Row("dense step", med["dense"][0], "ms", med["dense"][1], "1.00")]
    for n, target in (("masked", 1.10), ("search", 1.35), ("search fused", 1.35)):
        r, cell = ratio(ms[n], ms["dense"])
        label = "search step, fused (search.step: fused)" if n == "search fused" else f"{n} step"
        rows.append(Row(label, med[n][0], "ms", med[n][1], cell, f"{n.split()[0]}/dense ≤ {target}",
                        "yes" if r <= target else "no"))
    return rows + lenet(steps * 100, repeats)


def lenet(steps: int, repeats: int) -> list[Row]:
    """Dense vs search epoch, LeNet-300-100 at batch 60: the search's passes over θ dominate here."""
    import time
    g = torch.Generator().manual_seed(0)
    n = LENET_BATCH * steps
    data = DeviceData(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g),
                      torch.randn(LENET_BATCH, 1, 28, 28, generator=g), torch.randint(0, 10, (LENET_BATCH,), generator=g),
                      10, (1, 28, 28), augment=False)
    over = ["model.name=lenet_300_100", f"training.batch_size={LENET_BATCH}", f"training.epochs={LENET_EPOCHS}",
            "training.optimizer=adam", "training.lr=1.2e-3", "training.milestones=[]", "search.length=1.0",
            "search.point=init", "search.density=0.0074", "search.lr=0.1"]
    cfgs = {c: config.load(None, over + [f"resources.compile_search={c}"]) for c in ("false", "true")}
    cfgs["fused"] = config.load(None, over + ["search.step=fused"])
    torch.manual_seed(0)
    model = models.build("lenet_300_100", (1, 28, 28), 10)
    init = copy.deepcopy(model.state_dict())

    def dense():
        model.load_state_dict(init)
        rec = next(train_epochs(model, data, cfgs["false"].training, start=0, end=1, order_seed=0, amp=False,
                                phase="bench"))
        return rec["seconds"]

    first = {}

    def search(c):
        model.load_state_dict(init)
        t0 = time.perf_counter()
        ticket = METHODS["cts"].search(SearchContext(cfg=cfgs[c], model=model, data=data, device=torch.device("cpu")))
        first.setdefault(c, time.perf_counter() - t0)
        assert ticket.extra["compiled"] == (c != "false")
        return ticket.seconds / LENET_EPOCHS

    runs = {"lenet dense": dense, "lenet search": lambda: search("false"), "lenet search compiled": lambda: search("true"),
            "lenet search fused": lambda: search("fused")}
    ms = alternate({k: (lambda fn=fn: 1000 * fn()) for k, fn in runs.items()}, repeats, " ms")
    med = {k: summary(v) for k, v in ms.items()}
    rows = [Row("LeNet-300-100 b60: dense epoch", med["lenet dense"][0], "ms", med["lenet dense"][1], "1.00")]
    for k, label in (("lenet search", "search epoch, exact step, eager"),
                     ("lenet search compiled", "search epoch, exact step, compiled"),
                     ("lenet search fused", "search epoch, fused step (search.step: fused)")):
        r, cell = ratio(ms[k], ms["lenet dense"])
        rows.append(Row(f"LeNet-300-100 b60: {label}", med[k][0], "ms", med[k][1], cell, "search/dense ≤ 1.2",
                        "yes" if r <= 1.2 else "no"))
    rows.append(Row("LeNet-300-100: first compiled search's extra (compile, once per process)",
                    first["true"] - LENET_EPOCHS * med["lenet search compiled"][0] / 1000, "s"))
    return rows
