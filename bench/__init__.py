"""Benchmarks (not tests): `python -m bench [NAME ...] [--repeats N] [--quick]`.

Each benchmark returns ``Row``s; ``__main__`` prints them and appends a machine-stamped section
to bench/RESULTS.md. Comparisons are always measured side by side, alternating, in one process,
because the machine is shared and absolute timings drift.
"""
