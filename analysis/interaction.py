"""Interaction of two swept hyperparameters: per pair of swept axes and density where the trials
form a grid of the two, a two-way ANOVA (main effects and interaction), a verdict and an
interaction plot.

    python analysis/interaction.py results/sweeps/objective_ablation [more sweep folders] [--out DIR] [--where COLUMN=VALUE]

The same as `cts-ray analyze interaction …`; `--help` lists the options.
"""
import sys

from cts_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["analyze", "interaction", *sys.argv[1:]]))
