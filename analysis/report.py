"""Every table and plot of one or more sweeps in one Markdown report, with provenance.

    python analysis/report.py results/sweeps/method_comparison [more sweep folders] [--out DIR]

The same as `cts-ray report …` (default folder: <first sweep>/report).
"""
import sys

from cts_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
