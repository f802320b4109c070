"""`python -m bench [NAME ...] [--repeats N] [--quick]`: run, print, append to bench/RESULTS.md."""
from __future__ import annotations

import argparse

from . import readme, steps, sweep_overhead
from .report import RESULTS, append, table

BENCHES = {"steps": steps.run, "readme": readme.run, "sweep": sweep_overhead.run}
DEFAULT = ["steps"]   # `readme` (the test suite) and `sweep` (two Ray Tune sweeps) take minutes: only when named


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("names", nargs="*", metavar="NAME",
                   help=f"benchmarks to run: {', '.join(BENCHES)} (default: {' '.join(DEFAULT)})")
    p.add_argument("--repeats", type=int, default=None, help="alternating rounds (default 5; 2 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="smoke check: 2 steps per epoch, 2 rounds; printed but not recorded in RESULTS.md")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's). On a shared 2-core machine 1 thread is far "
                        "steadier: with 2, a busy neighbour stalls every parallel region")
    a = p.parse_args(argv)
    for name in a.names:
        if name not in BENCHES:
            p.error(f"unknown benchmark {name!r}; choose from {', '.join(BENCHES)}")
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    repeats = a.repeats or (2 if a.quick else 5)
    for name in a.names or DEFAULT:
        print(f"[bench] {name}", flush=True)
        kwargs = {"repeats": repeats, "steps": 2 if a.quick else 10} if name == "steps" else {}
        if name == "sweep":
            kwargs = {"quick": True} if a.quick else {}
        rows = BENCHES[name](**kwargs)
        print("\n".join(table(rows)))
        if not a.quick:
            title = {"steps": f" (steps/epoch {kwargs.get('steps')}, repeats {repeats})",
                     "sweep": f" (Ray Tune, {sweep_overhead.TRIALS} tiny + {sweep_overhead.LONG_TRIALS} × "
                              f"~{sweep_overhead.LONG_SECONDS:.0f} s trials, {sweep_overhead.CONCURRENCY} at a time)"}
            append(name + title.get(name, ""), rows)
            print(f"[bench] appended to {RESULTS}")


if __name__ == "__main__":
    main()
