"""Per-step time of dense training, masked training (density 0.05) and the CTS search step.

ResNet-20, batch 128, CPU, CIFAR-shaped synthetic data (CIFAR cannot be downloaded here; step
time does not depend on pixel values). Everything goes through the project's own code paths:
``train_epochs`` for (masked) training and ``METHODS['cts']`` for the search, each timed by the
``seconds`` those paths record themselves (evaluation and setup excluded).
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


def synthetic(steps: int) -> DeviceData:
    g = torch.Generator().manual_seed(0)
    x = lambda n: torch.randn(n, 3, 32, 32, generator=g)   # already "normalised"
    y = lambda n: torch.randint(0, 10, (n,), generator=g)
    n = BATCH * steps
    return DeviceData(x(n), y(n), x(BATCH), y(BATCH), 10, (3, 32, 32), augment=False)


def run(steps: int = 10, repeats: int = 5, **_) -> list[Row]:
    cfg = config.load(None, ["model.name=resnet20", f"training.batch_size={BATCH}", "training.epochs=1",
                             "search.length=1.0", "search.point=init", "training.milestones=[]",
                             f"search.density={DENSITY}"])
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

    def search():
        model.load_state_dict(init)
        ticket = METHODS["cts"].search(SearchContext(cfg=cfg, model=model, data=data, device=torch.device("cpu")))
        return ticket.history[0]["seconds"]

    runs = {"dense": lambda: epoch(None), "masked": lambda: epoch(mask), "search": search}
    ms = alternate({n: (lambda fn=fn: 1000 * fn() / steps) for n, fn in runs.items()}, repeats, " ms")

    med = {n: summary(ms[n]) for n in ms}
    rows = [Row("dense step", med["dense"][0], "ms", med["dense"][1], "1.00")]
    for n, target in (("masked", 1.10), ("search", 1.5)):
        r, cell = ratio(ms[n], ms["dense"])
        rows.append(Row(f"{n} step", med[n][0], "ms", med[n][1], cell, f"{n}/dense ≤ {target}",
                        "yes" if r <= target else "no"))
    return rows
