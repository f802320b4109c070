"""Hyperparameter insensitivity: per swept axis and density, the accuracy range and std across
its values (bootstrap 95 % CIs) against the seed std, an ANOVA p-value and a verdict.

    python analysis/insensitivity.py results/sweeps/method_comparison [more sweep folders] [--out DIR] [--where COLUMN=VALUE]

The same as `cts-ray analyze insensitivity …`; `--help` lists the options.
"""
import sys

from cts_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["analyze", "insensitivity", *sys.argv[1:]]))
