"""Result rows, the machine stamp and the Markdown section appended to RESULTS.md."""
from __future__ import annotations

import datetime
import os
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path

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
    from cts_ray.runtime import code_version
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return [f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
            f"- cpu: {cpu_model()}, {os.cpu_count()} cores (torch threads {torch.get_num_threads()})",
            f"- gpu: {gpu}",
            f"- python {platform.python_version()}, torch {torch.__version__}",
            f"- code: {code_version()}"]


def table(rows: list[Row]) -> list[str]:
    out = ["| name | value | unit | spread (min–max) | ratio | target | met |",
           "|---|---:|---|---|---:|---|---|"]
    out += [f"| {r.name} | {r.value:.4g} | {r.unit} | {r.spread} | {r.ratio} | {r.target} | {r.met} |"
            for r in rows]
    return out


def append(title: str, rows: list[Row]) -> None:
    new = not RESULTS.exists()
    with RESULTS.open("a") as f:
        if new:
            f.write("# Benchmark results\n\nAppended by `python -m bench`; newest last.\n")
        f.write("\n".join(["", f"## {title}", "", *stamp(), "", *table(rows)]) + "\n")
