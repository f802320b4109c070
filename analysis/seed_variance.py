"""Seed variance: per (method, density) mean, std, 95 % CI, min/max; whether the methods' variances
differ; which methods are significantly better than which (paired over shared seeds, Holm).

    python analysis/seed_variance.py results/sweeps/method_comparison [more sweep folders] [--out DIR] [--where COLUMN=VALUE]

The same as `cts-ray analyze seeds …`; `--help` lists the options.
"""
import sys

from cts_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["analyze", "seeds", *sys.argv[1:]]))
