"""Tickets that run faster: the dense network, the masked ticket and the compact ticket
(cts_ray/compact.py) side by side, one CPU thread: parameters, FLOPs (multiply-accumulates per
example of the Conv2d and Linear layers) and latency at batch 1 and 256.

Tickets are real runs of ``cts_ray.pipeline.run`` (what ``cts-ray run`` does) into a temporary
folder, loaded back as ``cts-ray export`` loads them (``export.load_ticket``). Short recipes, so the
bench runs in minutes; a ticket's structure (which units die), not its accuracy, sets its speed:

- LeNet-300-100 / MNIST (configs/mnist_lenet300.yaml) at density 0.00738, CTS, LTR, SNIP and SynFlow:
  3 epochs on the first 10,000 training images, rewind point 1 epoch (CTS: 2 search epochs; LTR: 22
  rounds of 2 retraining epochs; SynFlow: 100 rounds);
- ResNet-20 / CIFAR-10 (configs/cifar10_resnet20.yaml, the authors' model: BatchNorm on batch
  statistics, 3x3 shortcuts) at density 0.0144, CTS, LTR, SNIP and SynFlow: 2 epochs on the first
  2,000 training images at batch 128, rewind point 1 epoch (CTS: 2 search epochs, search length 1;
  one search epoch leaves a collapsed ticket; LTR: 6 rounds pruning 50 % each, not 19 of 20 %, to
  fit minutes).

Latency: median over alternating rounds (``report.alternate``) of the mean of an inner loop of
calls (about 50 ms), ``torch.no_grad``, eager modules. "compact + CSR" replaces each compact Linear
by torch's sparse CSR matmul where that measures faster at that batch size (convolutions have no
sparse kernel to try); it is not part of the exported artifact.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from cts_ray import config, pipeline
from cts_ray.compact import GatherLinear, compact
from cts_ray.export import cost, load_ticket, same_logits

from .paper import DATA, data_overrides, quick_subset
from .report import Row, alternate, ratio, summary

ROOT = Path(__file__).resolve().parent.parent
MNIST = ROOT.parent / "shared" / "datasets"
METHODS = ("cts", "ltr", "snip", "synflow")
LENET = dict(config=ROOT / "configs" / "mnist_lenet300.yaml", density=0.00738, label="LeNet-300-100",
             recipe=["training.epochs=3", "data.subset=10000", "training.dense_baseline=false"])
RESNET = dict(config=ROOT / "configs" / "cifar10_resnet20.yaml", density=0.0144, label="ResNet-20",
              recipe=["training.epochs=2", "training.milestones=[]", "search.rewind_epochs=1", "data.subset=2000",
                      "data.test_subset=1000", "training.batch_size=128", "search.length=1.0",
                      "search.ltr_fraction=0.5"])
QUICK = ["training.epochs=2", "data.subset=200", "data.test_subset=100", "training.batch_size=50",
         "search.synflow_rounds=5"]   # LeNet: CTS and SNIP; ResNet-20 (bench.paper's quick subset): SNIP
BATCHES, TARGET = (1, 256), 2.0
INNER_SECONDS = 0.05


def tickets(folder: Path, quick: bool, cifar: Path) -> list[tuple[str, Path]]:
    """Run every method for both models into ``folder``; (ticket label, run folder)."""
    out = []
    for spec, data in ((LENET, [f"data.root={MNIST}"]), (RESNET, data_overrides(cifar))):
        base = [*data, "resources.device=cpu", "resources.threads=1", *spec["recipe"],
                f"search.density={0.05 if quick else spec['density']}", *(QUICK if quick else [])]
        for method in (("snip",) if spec is RESNET else ("cts", "snip")) if quick else METHODS:
            cfg = config.load(spec["config"], [*base, f"search.method={method}"])
            t = time.perf_counter()
            s = pipeline.run(cfg, folder / f"{spec['label']}-{method}", progress=False)
            label = f"{spec['label']} {method.upper()} (test acc {100 * s['test_accuracy']:.1f} %)"
            print(f"  ticket {label}: {time.perf_counter() - t:.0f} s", flush=True)
            out.append((label, folder / f"{spec['label']}-{method}"))
    return out


class CsrLinear(nn.Module):
    """A compact Linear with its weight in torch's sparse CSR layout."""

    def __init__(self, layer: GatherLinear):
        super().__init__()
        with warnings.catch_warnings():   # "sparse CSR support is in beta": what this bench measures
            warnings.simplefilter("ignore", UserWarning)
            self.weight = layer.weight.detach().to_sparse_csr()
        self.bias, self.index = layer.bias.detach(), layer.index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x if self.index is None else x.index_select(1, self.index)
        return torch.sparse.mm(self.weight, x.t()).t() + self.bias


def _per_call(fn: Callable, x: torch.Tensor, inner: int) -> Callable[[], float]:
    def call() -> float:
        with torch.no_grad():
            t = time.perf_counter()
            for _ in range(inner):
                fn(x)
            return (time.perf_counter() - t) / inner * 1e3
    return call


def _inner(fn: Callable, x: torch.Tensor) -> int:
    with torch.no_grad():
        fn(x)
        t = time.perf_counter()
        fn(x)
    return max(1, int(INNER_SECONDS / max(time.perf_counter() - t, 1e-6)))


def _csr_faster(layer: GatherLinear, x: torch.Tensor, rounds: int = 5) -> bool:
    dense, csr = layer, CsrLinear(layer)
    calls = {"dense": _per_call(dense, x, _inner(dense, x)), "csr": _per_call(csr, x, _inner(csr, x))}
    ms = {k: [] for k in calls}
    for r in range(rounds):   # alternating, as report.alternate, without its per-round lines
        for k in (list(calls) if r % 2 else list(calls)[::-1]):
            ms[k].append(calls[k]())
    return summary(ms["csr"])[0] < summary(ms["dense"])[0]


def with_csr(small: nn.Module, x: torch.Tensor) -> tuple[nn.Module | None, int]:
    """(``small`` with CSR Linears where they measure faster on batch ``x``, or None where none is;
    how many Linears it has)."""
    inputs: dict[str, torch.Tensor] = {}
    layers = {n: m for n, m in small.named_modules() if isinstance(m, GatherLinear)}
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0])) for n, m in layers.items()]
    with torch.no_grad():
        small(x)
    for h in handles:
        h.remove()
    faster = [n for n, m in layers.items() if _csr_faster(m, inputs[n])]
    if not faster:
        return None, len(layers)
    out = copy.deepcopy(small)
    for n in faster:
        parent, _, child = n.rpartition(".")
        setattr(out.get_submodule(parent), child, CsrLinear(layers[n]))
    return out, len(layers)


def networks(run_dir: Path) -> tuple[dict[str, nn.Module], dict[str, dict], tuple]:
    """The dense network (search-point weights), the masked ticket and the compact ticket; their costs."""
    ticket, mask, shape, _ = load_ticket(run_dir)
    dense = copy.deepcopy(ticket)
    dense.load_state_dict(torch.load(run_dir / "search_point.pt", weights_only=True, map_location="cpu"))
    small, info = compact(ticket, mask, shape)
    print("  kept units: " + ("none (collapsed)" if info["collapsed"] else ", ".join(
        f"{ly['layer']} {ly['kept_outputs']}/{ly['outputs']}" for ly in info["layers"] if "outputs" in ly)), flush=True)
    nets = {"dense": dense.eval(), "masked ticket": ticket.eval(), "compact": small}
    costs = {"dense": cost(dense, shape), "masked ticket": cost(ticket, shape, mask), "compact": cost(small, shape)}
    return nets, costs, shape


def latencies(nets: dict[str, nn.Module], shape: tuple, repeats: int) -> dict[int, dict[str, list[float]]]:
    """ms per call for every network at every batch size, alternating; "compact + CSR" where any
    compact Linear is faster in CSR at that batch size (checked to give the same logits)."""
    out = {}
    for b in BATCHES:
        x = torch.randn(b, *shape, generator=torch.Generator().manual_seed(b))
        nets_b = dict(nets)
        csr, linears = with_csr(nets["compact"], x)
        if csr is not None:
            with torch.no_grad():
                assert same_logits(csr(x), nets["compact"](x)), "CSR compact model: logits differ"
            kept = sum(isinstance(m, CsrLinear) for m in csr.modules())
            nets_b[f"compact + CSR ({kept} of {linears} Linears at b{b})"] = csr
        print(f"  batch {b}:", flush=True)
        out[b] = alternate({k: _per_call(m, x, _inner(m, x)) for k, m in nets_b.items()}, repeats, " ms")
    return out


def rows_for(label: str, costs: dict[str, dict], ms: dict[int, dict[str, list[float]]]) -> list[Row]:
    """One row per network: latency at batch 256 (value), its speed-up over dense and batch 1 (ratio)."""
    rows, big, one = [], ms[BATCHES[-1]], ms[BATCHES[0]]
    dense_flops = costs["dense"]["flops"]
    for name in dict.fromkeys([*big, *one]):
        c = costs.get(name.split(" + ")[0], costs["compact"])
        maps = f" + {c['bias_map_values']:,} bias-map values" if c["bias_map_values"] else ""
        what = f"{c['params']:,} params{maps}, {c['flops']:,} MACs ({100 * c['flops'] / dense_flops:.3g} % of dense)"
        cells = []
        for b, times in ((BATCHES[-1], big), (BATCHES[0], one)):
            if name in times:
                speed = ratio(times["dense"], times[name])[1]
                cells.append(f"b{b}: {summary(times[name])[0]:.3g} ms, ×{speed}")
        value = summary(big[name]) if name in big else summary(one[name])
        goal = label.startswith("LeNet-300-100 CTS") and name == "compact"
        met = "yes" if goal and ratio(big["dense"], big[name])[0] >= TARGET else "no" if goal else "—"
        target = f"≥ {TARGET:g}× dense at b{BATCHES[-1]}" if goal else "—"
        rows.append(Row(f"{label}: {name}: {what}", value[0], f"ms (b{BATCHES[-1] if name in big else BATCHES[0]})",
                        value[1], "; ".join(cells), target, met))
    return rows


def run(repeats: int | None = None, quick: bool = False, data: str | None = None, **_) -> list[Row]:
    torch.set_num_threads(1)   # the one thread; left set, so the section's stamp says so
    tmp = Path(tempfile.mkdtemp(prefix="cts-bench-export-"))
    cache = os.environ.get("CTS_RAY_CACHE")
    cifar = Path(data) if data else next((p for p in DATA if p.is_dir()), DATA[-1])
    try:
        if quick:   # a small copy: its decoded cache goes with it, not into the user's cache
            cifar = quick_subset(cifar, tmp / "cifar")
            os.environ["CTS_RAY_CACHE"] = str(tmp / "cache")
        rows = []
        for label, run_dir in tickets(tmp, quick, cifar):
            print(f"  {label}", flush=True)
            nets, costs, shape = networks(run_dir)
            rows += rows_for(label, costs, latencies(nets, shape, repeats or (1 if quick else 5)))
        return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if quick:
            os.environ.pop("CTS_RAY_CACHE") if cache is None else os.environ.update(CTS_RAY_CACHE=cache)
