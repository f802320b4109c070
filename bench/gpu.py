"""GPU benchmarks: ResNet-20 on CIFAR-shaped synthetic tensors through the project's own code
(``train.train_epochs``, ``METHODS['cts']``, ``runtime.configure``: cudnn.benchmark, TF32), with
the recipe of configs/cifar10_resnet20.yaml (batch 512, SGD, summed loss + grad clip 2.0, BatchNorm on batch
statistics, 3x3 shortcuts, flip + crop on device).

(a) Dense epoch (50,000 images, training seconds as train_epochs records them): fp32 vs bf16
    autocast + channels_last (the project's ``resources.amp``) vs the same + ``torch.compile``,
    alternating. The model is compiled here (dynamic=False, as `resources.compile` does in train_epochs) and
    handed to train_epochs; compile time (first epoch on 2 batches + one evaluation) is its own row.
(b) The recipe's whole CTS run, 9 rewind + 80 search + 151 retrain epochs (density 0.0074), is
    EXTRAPOLATED: one epoch of each phase is timed per round (dense and retrain epochs as wall
    time including the pipeline's 10,000-image evaluation after each) and multiplied out. Not
    included: reading CIFAR from disk, process start, model build, writing the run folder.
(c) Fractional packing: 4 worker processes on the one GPU (4 trials at 0.25 GPU) each train
    ``STEPS`` steps through train_epochs after a barrier, vs worker 0 alone; aggregate images/s =
    total images / (last end − first start). The same 4 processes serve every round.
(d) Peak GPU memory of one trial (``max_memory_allocated``, measured first, in a process holding
    only this trial): a dense epoch and a CTS search epoch at batch 512, the 60,000 images
    (train + test, float32) on the device included as in a real trial.

Only meaningful on CUDA. ``--device cpu --quick`` runs tiny sizes on CPU to exercise the code
(bf16/channels_last are then no-ops, as in the project; compile uses the eager backend, i.e. dynamo
tracing only; packing skips its warm-up rounds).
"""
from __future__ import annotations

import copy
import gc
import queue as queue_mod
import time
from pathlib import Path

import torch

from cts_ray import config, models, runtime
from cts_ray.data import DeviceData
from cts_ray.masking import Mask, kept_count, layer_shapes
from cts_ray.methods import METHODS, SearchContext
from cts_ray.train import prepare, train_epochs

from .report import Row, alternate, cpu_model, ratio, summary

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "configs" / "cifar10_resnet20.yaml"
FULL = dict(batch=512, images=50_000, test=10_000, steps=98)   # steps: ~1 epoch per packed worker
WORKERS, PACK_TARGET = 4, 2.5
PIPELINE_TARGET = 540.0   # issue 11: the paper's whole pipeline (9 + 80 search + 151 epochs) within 9 minutes


def recipe(device: str, extra=()) -> config.Config:
    # The data here are synthetic and CIFAR is never loaded: `download` spares the validator's check
    # that data.root holds the CIFAR files (nothing is downloaded, as nothing is loaded).
    return config.load(RECIPE, [f"data.root={ROOT}", "data.download=true", f"resources.device={device}", *extra])


def synthetic(images: int, test: int, device: torch.device, seed: int = 0) -> DeviceData:
    g = torch.Generator(device=device).manual_seed(seed)
    x = lambda n: torch.randn(n, 3, 32, 32, device=device, generator=g)   # already "normalised"
    y = lambda n: torch.randint(0, 10, (n,), device=device, generator=g)
    return DeviceData(x(images), y(images), x(test), y(test), 10, (3, 32, 32), augment=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_epoch(model, data, cfg, amp, mask=None, seed=0) -> tuple[float, float]:
    """(training seconds as train_epochs records them, wall seconds including the evaluation)."""
    t0 = time.perf_counter()
    rec = next(train_epochs(model, data, cfg.training, start=0, end=1, order_seed=seed, mask=mask, amp=amp,
                            phase="bench"))
    return rec["seconds"], time.perf_counter() - t0


def cts_epoch(model, data, device, amp, batch, extra=()) -> float:
    """Seconds of one CTS search epoch (the method's own per-epoch record) at the recipe's density."""
    cfg = recipe(device.type, [f"training.batch_size={batch}", f"search.length={1 / 160}", *extra])
    ticket = METHODS["cts"].search(SearchContext(cfg=cfg, model=model, data=data, device=device, amp=amp))
    return ticket.history[0]["seconds"]


# ---------------------------------------------------------------- (c) packing workers

def _pack_worker(rank: int, device: str, batch: int, steps: int, rounds: list, barrier, results) -> None:
    """One 'trial': builds its model and data, then for each round waits at the barrier and, when
    it is one of that round's active ranks, trains ``steps`` steps and reports (round, rank, t0, t1)."""
    try:
        if device == "cpu":
            torch.set_num_threads(1)
        cfg = recipe(device, [f"training.batch_size={batch}"])
        dev = runtime.configure(cfg.resources)
        amp = runtime.use_amp(cfg.resources, dev)
        torch.manual_seed(rank)
        model = prepare(models.from_config(cfg.model, (3, 32, 32), 10), dev, amp)
        init = copy.deepcopy(model.state_dict())
        data = synthetic(steps * batch, batch, dev, seed=rank)
        one_epoch(model, data, cfg, amp)           # warm-up: cudnn.benchmark, allocator
        for r, active in enumerate(rounds):
            barrier.wait()
            if rank < active:
                model.load_state_dict(init)
                t0 = time.time()
                one_epoch(model, data, cfg, amp, seed=r)   # ends with a sync (loss .item())
                results.put((r, rank, t0, time.time()))
        barrier.wait()
    except BaseException as e:                     # the parent reports it; the others time out
        results.put(("error", rank, repr(e), 0.0))
        barrier.abort()
        raise


def packing(device: torch.device, batch: int, steps: int, repeats: int, warm: int = 2) -> dict[str, list[float]]:
    """Aggregate images/s per round, for 1 process alone and 4 at once, in alternating order, after
    ``warm`` discarded rounds (each worker has also trained one epoch on its own before the first)."""
    import torch.multiprocessing as mp
    # Not fork: CUDA and autograd are already in use here. A forkserver imports this module once,
    # without touching CUDA, and forks the workers from that clean process.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    rounds = [1, WORKERS][:warm] + [m for r in range(repeats) for m in ((1, WORKERS) if r % 2 == 0 else (WORKERS, 1))]
    barrier, results = ctx.Barrier(WORKERS, timeout=600), ctx.Queue()
    procs = [ctx.Process(target=_pack_worker, args=(i, device.type, batch, steps, rounds, barrier, results))
             for i in range(WORKERS)]
    for p in procs:
        p.start()
    spans: dict[int, list] = {}
    deadline = time.time() + 1800
    try:
        while sum(map(len, spans.values())) < sum(rounds):
            try:
                r, rank, t0, t1 = results.get(timeout=5)
            except queue_mod.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead or time.time() > deadline:
                    raise RuntimeError(f"packing workers: exit codes {dead}, or no result by the deadline") from None
                continue
            if r == "error":
                raise RuntimeError(f"packing worker {rank} failed: {t0}")
            spans.setdefault(r, []).append((t0, t1))
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
    out = {"1 process": [], f"{WORKERS} processes": []}
    for r, active in enumerate(rounds[warm:], start=warm):
        wall = max(t1 for _, t1 in spans[r]) - min(t0 for t0, _ in spans[r])
        out["1 process" if active == 1 else f"{WORKERS} processes"].append(active * steps * batch / wall)
    return out


# ---------------------------------------------------------------- the benchmark

def run(repeats: int | None = None, quick: bool = False, device: str = "auto", **_) -> list[Row]:
    cuda = torch.cuda.is_available() and device != "cpu"
    if not cuda and not (device == "cpu" and quick):
        print("  gpu: skipped: no CUDA device visible (torch.cuda.is_available() is False). "
              "`--device cpu --quick` exercises the code on CPU; nothing is recorded.", flush=True)
        return []
    repeats = repeats or (2 if quick else 5)
    batch = FULL["batch"] if cuda else 32
    images, test, steps = (2 * batch, batch, 2) if quick else (FULL["images"], FULL["test"], FULL["steps"])
    cfg = recipe("cuda" if cuda else "cpu", [f"training.batch_size={batch}"])
    dev = runtime.configure(cfg.resources)
    amp = runtime.use_amp(cfg.resources, dev)
    name = runtime.device_name(dev) if cuda else cpu_model()
    print(f"  ResNet-20 on {name}, batch {batch}, {images} train / {test} test images, {repeats} rounds", flush=True)
    data = synthetic(images, test, dev)
    build = lambda amp_: prepare(models.from_config(cfg.model, (3, 32, 32), 10), dev, amp_)
    torch.manual_seed(0)
    ref = build(amp)
    init = copy.deepcopy(ref.state_dict())
    d = sum(s.numel() for s in layer_shapes(ref).values())
    mask = Mask.top_k(torch.rand(d, generator=torch.Generator().manual_seed(1)),
                      kept_count(cfg.search.density, d), layer_shapes(ref))

    # ---- (d) peak memory, first: the process holds only this trial's data and model (the first
    # epoch, so cudnn.benchmark's trial workspaces count, as they do in a trial)
    def peak(fn) -> float:
        if not cuda:
            return float("nan")
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        sync(dev)
        return torch.cuda.max_memory_allocated(dev) / 2**20
    mem = {"dense": peak(lambda: one_epoch(ref, data, cfg, amp)),
           "search": peak(lambda: cts_epoch(ref, data, dev, amp, batch))}
    data_mib = sum(t.numel() * t.element_size() for t in (data.train_x, data.train_y, data.test_x, data.test_y)) / 2**20

    # ---- (a) dense epoch: fp32, bf16 + channels_last, + torch.compile
    variants = {"fp32": build(False), "bf16+CL": build(amp)}
    for m in variants.values():
        m.load_state_dict(init)
    eager = build(amp)
    eager.load_state_dict(init)
    compiled = torch.compile(eager, dynamic=False, backend="inductor" if cuda else "eager")
    warm = DeviceData(data.train_x[:2 * batch], data.train_y[:2 * batch], data.test_x[:1000], data.test_y[:1000],
                      10, (3, 32, 32), augment=True)   # same batch shapes as `data`: no recompilation later
    compile_s = one_epoch(compiled, warm, cfg, amp)[1]
    variants["bf16+CL+compile"] = compiled

    def dense(key):
        raw = eager if key == "bf16+CL+compile" else variants[key]
        raw.load_state_dict(init)          # in place: the compiled graph keeps its parameters
        return one_epoch(variants[key], data, cfg, amp and key != "fp32")[0]
    print("  (a) dense epoch, seconds", flush=True)
    sec = alternate({k: (lambda k=k: dense(k)) for k in variants}, repeats, " s")

    # ---- (b) the recipe's CTS run, extrapolated from one epoch of each phase per round
    def phase(key):
        ref.load_state_dict(init)
        if key.startswith("search"):   # the fused step compiles in the warm-up call
            return cts_epoch(ref, data, dev, amp, batch, ["search.step=fused"] if key == "search fused" else [])
        return one_epoch(ref, data, cfg, amp, mask=mask if key == "retrain" else None)[1]
    print("  (b) one epoch of each CTS phase, wall seconds (dense and retrain include evaluation)", flush=True)
    ph = alternate({k: (lambda k=k: phase(k)) for k in ("dense", "search", "retrain", "search fused")}, repeats, " s")
    full = recipe("cuda")
    counts = {"dense": full.search_epoch, "search": full.search_epochs,
              "retrain": full.training.epochs - full.search_epoch}
    totals = [sum(counts[k] * ph[k][r] for k in counts) for r in range(repeats)]
    del variants, compiled, eager
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    # ---- (c) fractional packing
    print(f"  (c) packing: {WORKERS} worker processes × {steps} steps of batch {batch}", flush=True)
    pk = packing(dev, batch, steps, repeats, warm=0 if quick else 2)

    # ---- rows
    ok = lambda c: "— (quick)" if quick else ("yes" if c else "no") if cuda else "— (not a GPU run)"
    rows = []
    for k, label in (("fp32", "fp32" + (" (TF32 on, as runtime.configure sets)" if cuda else "")), ("bf16+CL", "bf16 autocast + channels_last"),
                     ("bf16+CL+compile", "bf16 + channels_last + torch.compile")):
        med, spread = summary(sec[k])
        cell = ratio(sec["fp32"], sec[k])[1] + " speedup" if k != "fp32" else "1.00"
        rows.append(Row(f"a: dense epoch, {label} (b{batch}, {images} img)", med, "s", spread, cell))
    rows.append(Row("a: torch.compile time (first compiled epoch of 2 batches + eval)", compile_s, "s",
                    ratio="inductor" if cuda else "eager backend (CPU: dynamo only)"))
    for k in counts:
        med, spread = summary(ph[k])
        rows.append(Row(f"b: CTS pipeline, extrapolated: one {k} epoch", med, "s", spread, f"× {counts[k]} epochs"))
    med, spread = summary(totals)
    rows.append(Row(f"b: CTS pipeline total, extrapolated ({' + '.join(map(str, counts.values()))} epochs)", med, "s",
                    spread, "per round: Σ count × epoch", f"≤ {PIPELINE_TARGET:.0f} s on one GPU",
                    ok(med <= PIPELINE_TARGET)))
    rows.append(Row("b*: one search epoch, fused step (search.step: fused; measured, not in the total)", summary(ph["search fused"])[0], "s",
                    summary(ph["search fused"])[1], ratio(ph["search fused"], ph["search"])[1] + " × the exact step's"))
    one, many = pk["1 process"], pk[f"{WORKERS} processes"]
    r, cell = ratio(many, one)
    rows.append(Row(f"c: 1 process alone (b{batch}, {steps} steps)", summary(one)[0], "img/s", summary(one)[1], "1.00"))
    rows.append(Row(f"c: {WORKERS} processes at once, aggregate", summary(many)[0], "img/s", summary(many)[1], cell,
                    f"{WORKERS}/1 ≥ {PACK_TARGET}×", ok(r >= PACK_TARGET)))
    if cuda:
        quarter = torch.cuda.get_device_properties(dev).total_memory / 2**20 / WORKERS
        for k, label in (("dense", "dense epoch"), ("search", "CTS search epoch")):
            rows.append(Row(f"d: peak GPU memory per trial, {label} (b{batch})", mem[k], "MiB",
                            ratio=f"data {data_mib:.0f} MiB of it", target=f"≤ ¼ GPU ({quarter:.0f} MiB)",
                            met=ok(mem[k] <= quarter)))
    else:
        print("  (d) peak GPU memory: skipped on CPU", flush=True)
    return rows
