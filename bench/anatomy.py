"""Ticket anatomy (cts_ray/anatomy.py) per ticket: seconds for one call on ResNet-20 and VGG-16
(CIFAR shape, 10 classes) at density 0.01, random masks, CPU. Target: well under a second, so it
runs on every ticket (and on every LTR level)."""
from __future__ import annotations

import time

import torch

from cts_ray import models
from cts_ray.anatomy import anatomy
from cts_ray.masking import Mask, kept_count, layer_shapes

from .report import Row, alternate, summary

DENSITY, TARGET = 0.01, 1.0
MODELS = ("resnet20", "vgg16")


def run(repeats: int = 5, quick: bool = False, **_) -> list[Row]:
    calls = {}
    for name in MODELS[:1] if quick else MODELS:
        torch.manual_seed(0)
        net = models.build(name, (3, 32, 32), 10)
        shapes = layer_shapes(net)
        d = sum(s.numel() for s in shapes.values())
        mask = Mask.top_k(torch.rand(d, generator=torch.Generator().manual_seed(1)), kept_count(DENSITY, d), shapes)

        def call(net=net, mask=mask):
            t = time.perf_counter()
            anatomy(net, mask, (3, 32, 32))
            return time.perf_counter() - t
        calls[name] = call
    secs = alternate(calls, repeats or 5, " s")
    rows = []
    for name, xs in secs.items():
        med, spread = summary(xs)
        rows.append(Row(f"{name}: anatomy of one ticket", med, "s", spread, target=f"< {TARGET:g} s",
                        met="yes" if med < TARGET else "no"))
    return rows
