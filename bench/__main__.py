"""`python -m bench [NAME ...] [--repeats N] [--quick]`: run, print, append to bench/RESULTS.md."""
from __future__ import annotations

import argparse

from . import anatomy, data_path, ddp, export, gpu, paper, readme, slots, steps, stream, sweep_overhead, ticket
from .report import RESULTS, append, table

BENCHES = {"steps": steps.run, "readme": readme.run, "sweep": sweep_overhead.run, "data": stream.run, "loader": data_path.run,
           "ticket": ticket.run, "gpu": gpu.run, "paper": paper.run, "anatomy": anatomy.run,
           "slots": slots.run, "export": export.run, "ddp": ddp.run}
DEFAULT = ["steps"]   # the others take minutes (`ticket` on CPU: tens of minutes): only when named
NOTES = {
    "loader": "Images/s, median of alternating rounds; ratio = device-resident ÷ DataLoader, paired per round.",
    "data": "Images/s, median of alternating rounds; ratio = ÷ in memory (same kind of row), paired per round. "
            "Memory: one cts-ray run each, the kernel's peak RSS (VmHWM) of it and of its largest loader process "
            "(bench/stream.py).",
    "ticket": "Single long runs (CTS, short-search CTS, fused CTS, then LTR), not alternated; times are the runs' summary.json training "
              "seconds (evaluation excluded).",
    "gpu": "(b) is EXTRAPOLATED from one timed epoch per phase and round, not a measured full run.",
    "slots": "Two real sweeps, one after the other (Tune's grid order, then the shared-work scheduler); useful "
             "compute = computed (not cached) epoch seconds + search seconds of the epoch-less methods.",
    "export": "Value: ms per call at batch 256 (median of alternating rounds, 1 thread); ratio: speed-up over the dense "
              "network (paired rounds) at batch 256 and 1. Tickets from short recipes (bench/export.py); FLOPs are MACs "
              "per example of the Conv2d and Linear layers; a masked ticket counts its kept weights but runs at the "
              "dense cost.",
    "ddp": "a, b: images/s of train_epochs (its own seconds: the step loop, evaluation and process start excluded), "
           "median of alternating rounds; b: 2 spawned processes in a torch.distributed world (no Ray), the slower "
           "rank's seconds. overhead: what resources.workers: 1 adds (it runs in-process, a world of one; Ray "
           "Train is used only for workers > 1): train_epochs against the loop before data parallelism, and the World's "
           "part alone (µs a step); on CUDA "
           "also a 1-rank nccl world against in-process. limit rows: what bounds b/a (bench/ddp.py).",
    "paper": "One measured run (not alternated): phase seconds are the run's summary.json training seconds "
             "(evaluation excluded); the paper's numbers are CTS-KL at density 0.74 % (SPEC §5).",
}


def title(name: str, a: argparse.Namespace, repeats: int) -> str:
    if name == "steps":
        return f"steps (steps/epoch 10, repeats {repeats})"
    if name == "sweep" and a.trials:
        return (f"sweep --trials {' '.join(map(str, a.trials))} (tiny trials, {sweep_overhead.CONCURRENCY} at a time, "
                "a fresh Ray per N)")
    if name == "sweep":
        return (f"sweep (Ray Tune, {sweep_overhead.TRIALS} tiny + {sweep_overhead.LONG_TRIALS} × "
                f"~{sweep_overhead.LONG_SECONDS:.0f} s trials, {sweep_overhead.CONCURRENCY} at a time)")
    if name == "loader":
        return f"loader (ResNet-20 b{data_path.BATCH}, {data_path.IMAGES} images, repeats {repeats})"
    if name == "data":
        return (f"data (CIFAR-10-JPEG, ResNet-20 b{stream.BATCH}, {stream.IMAGES} images, {stream.WORKERS} loader "
                f"processes, repeats {a.repeats or 3})")
    if name == "ticket":
        epochs = f", {a.ticket_epochs} epochs" if a.ticket_epochs else ""
        return f"ticket (MNIST LeNet-300-100, CTS vs LTR at density {ticket.DENSITY}{epochs}, repeats {a.repeats or 1})"
    if name == "slots":
        return (f"slots (MNIST 8k LeNet-300-100, {len(slots.METHODS)} methods × {len(slots.DENSITIES)} densities × "
                f"2 seeds, {slots.SLOTS} slots)")
    if name == "anatomy":
        return f"anatomy (density {anatomy.DENSITY}, random masks, repeats {repeats})"
    if name == "gpu":
        return f"gpu (ResNet-20 b{gpu.FULL['batch']}, repeats {repeats})"
    if name == "export":
        return (f"export (dense / masked / compact tickets: LeNet-300-100 at {export.LENET['density']}, ResNet-20 at "
                f"{export.RESNET['density']}; 1 thread, repeats {a.repeats or 5})")
    if name == "ddp":
        return (f"ddp (ResNet-20 / CIFAR-10-JPEG in memory, global batch {ddp.BATCH}, 1 thread a process, "
                f"repeats {repeats})")
    if name == "paper":
        return f"paper (ResNet-20 / CIFAR-10, authors' recipe, one CTS ticket at density {paper.DENSITY})"
    return name


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("names", nargs="*", metavar="NAME",
                   help=f"benchmarks to run: {', '.join(BENCHES)} (default: {' '.join(DEFAULT)})")
    p.add_argument("--repeats", type=int, default=None,
                   help="alternating rounds (default 5; 2 with --quick; ticket: 1)")
    p.add_argument("--quick", action="store_true",
                   help="smoke check at tiny sizes (steps: 2 steps per epoch; loader, data: 256 images; ticket: "
                        "2 epochs on 2,000 images at density 0.5; gpu: 2 batches; ddp: 2 steps of 32; "
                        "export: 200 images, density 0.05, 1 round); printed, not recorded")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's). On a shared 2-core machine 1 thread is far "
                        "steadier: with 2, a busy neighbour stalls every parallel region")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="data, loader, gpu, ddp: compute device (gpu runs on CPU only with --quick)")
    p.add_argument("--ticket-epochs", type=int, default=None,
                   help="ticket: training.epochs for both runs (default: the config's 10)")
    p.add_argument("--data", default=None,
                   help="paper, export, data, ddp: CIFAR-10 folder, ImageFolder layout or torchvision's (ddp: ImageFolder "
                        "only) (default: data/CIFAR-10-JPEG)")
    p.add_argument("--trials", type=int, nargs="+", default=None, metavar="N",
                   help="sweep: the tiny-trial sweep at each N instead (e.g. 100 400 2000): cost per trial against "
                        "N, driver peak memory, MLflow's queue, `cts-ray report`/`analyze` seconds")
    p.add_argument("--budget", type=float, default=None,
                   help=f"paper: seconds for the whole bench; retraining is shortened to fit (default "
                        f"{paper.BUDGET:.0f}; 0 = the full recipe)")
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
        kwargs = {"repeats": a.repeats, "quick": a.quick, "device": a.device, "ticket_epochs": a.ticket_epochs,
                  "data": a.data, "budget": a.budget}
        if name == "steps":
            kwargs = {"repeats": repeats, "steps": 2 if a.quick else 10}
        if name == "sweep" and a.trials:
            kwargs["trials"] = a.trials
        rows = BENCHES[name](**kwargs)
        if not rows:
            continue
        print("\n".join(table(rows)))
        if name in NOTES:
            print(NOTES[name])
        if not a.quick:
            append(title(name, a, repeats), rows, NOTES.get(name, ""))
            print(f"[bench] appended to {RESULTS}")


if __name__ == "__main__":
    main()
