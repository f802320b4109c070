"""Result rows, the machine stamp and the Markdown section appended to RESULTS.md."""
from __future__ import annotations

import datetime
import os
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).with_name("RESULTS.md")


@dataclass
class Row:
    name: str
    value: float
    unit: str
    spread: str = "—"       # min–max over repeats, so noise is visible next to the median
    ratio: str = "—"
    target: str = "—"
    met: str = "—"


def summary(xs: list[float]) -> tuple[float, str]:
    """Median and 'min–max' of a list; the median because a shared machine gives outliers."""
    return statistics.median(xs), f"{min(xs):.4g}–{max(xs):.4g}"


def alternate(fns: dict[str, Callable[[], float]], repeats: int, unit: str = "", warmup: bool = True
              ) -> dict[str, list[float]]:
    """Call every ``fns[name]()`` (each returns one measurement) ``repeats`` times, in rounds that
    rotate the order so no variant always runs first or right after the same other one; one
    warm-up call each first (allocator, kernel selection, first-call overheads). Prints each round."""
    names = list(fns)
    if warmup:
        for fn in fns.values():
            fn()
    ms = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            ms[n].append(fns[n]())
        print(f"  round {r + 1}/{repeats}: " + ", ".join(f"{n} {ms[n][-1]:.4g}{unit}" for n in names), flush=True)
    return ms


def ratio(num: list[float], den: list[float]) -> tuple[float, str]:
    """Ratio of medians, and a cell with it and the spread of the same-round ratios."""
    r = statistics.median(num) / statistics.median(den)
    paired = [a / b for a, b in zip(num, den)]
    return r, f"{r:.2f} ({min(paired):.2f}–{max(paired):.2f})"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def stamp() -> list[str]:
    import torch
    from cts_ray.versions import code_version, library_versions
    gpu = "none"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = (f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} visible; "
               f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    elif torch.version.cuda:
        gpu += f" (torch built for CUDA {torch.version.cuda})"
    libs = ", ".join(f"{k} {torch.__version__ if k == 'torch' else v}"   # torch's own: keeps the +cuXXX tag
                     for k, v in library_versions().items() if v and k != "python")
    return [f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
            f"- cpu: {cpu_model()}, {os.cpu_count()} cores (torch threads {torch.get_num_threads()})",
            f"- gpu: {gpu}",
            f"- python {platform.python_version()}; {libs}",
            f"- code: {code_version()}"]


def table(rows: list[Row]) -> list[str]:
    out = ["| name | value | unit | spread (min–max) | ratio | target | met |",
           "|---|---:|---|---|---:|---|---|"]
    out += [f"| {r.name} | {r.value:.4g} | {r.unit} | {r.spread} | {r.ratio} | {r.target} | {r.met} |"
            for r in rows]
    return out


def append(title: str, rows: list[Row], note: str = "") -> None:
    new = not RESULTS.exists()
    with RESULTS.open("a") as f:
        if new:
            f.write("# Benchmark results\n\nAppended by `python -m bench`; newest last.\n")
        f.write("\n".join(["", f"## {title}", "", *stamp(), "", *table(rows), *(["", note] if note else [])]) + "\n")
