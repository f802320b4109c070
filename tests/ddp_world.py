"""Run a function in N gloo processes (a ``torch.distributed`` world on CPU) and collect each rank's
result: the harness of test_ddp.py. Spawned, not forked (a forked OpenMP pool can hang), one torch
thread each; a rank that fails fails the call with its traceback."""
from __future__ import annotations

import traceback
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank: int, size: int, folder: str, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(1)
    out = Path(folder) / f"rank{rank}.pt"
    try:
        dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=size)
        try:
            result = fn(*args)
        finally:
            dist.destroy_process_group()
        torch.save({"result": result}, out)
    except BaseException:
        torch.save({"error": traceback.format_exc()}, out)
        raise


def run_world(fn: Callable, size: int, folder: Path, *args, timeout: float = 300) -> list:
    """``fn(*args)`` on every rank of a world of ``size``; the ranks' results, in rank order.
    ``fn`` must be importable (a module-level function)."""
    folder.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(r, size, str(folder), fn, args)) for r in range(size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    results = []
    for r, p in enumerate(procs):
        path = folder / f"rank{r}.pt"
        got = torch.load(path, weights_only=False) if path.exists() else {"error": f"exit code {p.exitcode}"}
        assert "error" not in got, f"rank {r} of {size}:\n{got['error']}"
        results.append(got["result"])
    return results
