"""Method comparison: methods x densities accuracy table, compute table (time to ticket,
LTR / CTS speed-up), sanity-check table; with --out, the sparsity-accuracy and time plots.

    python analysis/comparison.py results/sweeps/method_comparison [more sweep folders] [--out DIR] [--where COLUMN=VALUE]

The same as `cts-ray analyze comparison …`; `--help` lists the options.
"""
import sys

from cts_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["analyze", "comparison", *sys.argv[1:]]))
