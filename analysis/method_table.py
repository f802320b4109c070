"""Method × density table from a sweep's trials table (the issue-3 comparison report).

    python analysis/method_table.py results/sweeps/method_comparison

Prints Markdown: retrained test accuracy (mean ± std over seeds, with the count) and mean seconds
(the method's own compute; and the time to a retrained ticket, SPEC §1 accounting) per method and
target density, the dense accuracy, and the LTR / CTS wall-time ratio at each density.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cts_ray.sweep import tables  # noqa: E402

ORDER = ["cts", "ltr", "snip", "grasp", "synflow", "magnitude", "random", "gates", "edge_popup"]


def _ms(values, scale=1.0, digits=1):
    if not values:
        return "–"
    mean = statistics.mean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def build(root) -> str:
    rows = [r for r in tables.read(root, "trials").to_pylist() if r["status"] == "finished" and r["sanity"] == "none"]
    if not rows:
        raise SystemExit(f"{root}: no finished trials")
    densities = sorted({r["target_density"] for r in rows}, reverse=True)
    methods = sorted({r["method"] for r in rows}, key=lambda m: ORDER.index(m) if m in ORDER else 99)
    cell = defaultdict(list)
    for r in rows:
        cell[r["method"], r["target_density"]].append(r)
    out = ["| method | " + " | ".join(f"d={d:g}: acc % | method s | ticket s" for d in densities) + " |",
           "|---|" + "---|---|---|" * len(densities)]
    for m in methods:
        parts = []
        for d in densities:
            rs = cell.get((m, d), [])
            acc = _ms([r["test_accuracy"] for r in rs], 100, 2) + f" (n={len(rs)})"
            parts += [acc, _ms([r["search_seconds"] for r in rs], digits=2), _ms([r["ticket_seconds"] for r in rs], digits=2)]
        out.append(f"| {m} | " + " | ".join(parts) + " |")
    dense = [r["dense_test_accuracy"] for r in rows if r["dense_test_accuracy"] is not None]
    out.append("")
    out.append(f"Dense test accuracy: {_ms(dense, 100, 2)} % (n={len(dense)} trials).")
    ltr = {d: [r for r in cell.get(("ltr", d), [])] for d in densities}
    for d in densities:
        c, l = cell.get(("cts", d), []), ltr[d]
        if c and l:
            ratio = statistics.mean(r["ticket_seconds"] for r in l) / statistics.mean(r["ticket_seconds"] for r in c)
            ach = statistics.mean(r["achieved_density"] for r in l)
            out.append(f"Density {d:g}: LTR / CTS time to a retrained ticket = {ratio:.1f}× "
                       f"(LTR's achieved density {ach:.4f}).")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", help="a sweep folder (storage/<name>)")
    args = p.parse_args(argv)
    print(build(args.results))


if __name__ == "__main__":
    main()
