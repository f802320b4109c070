"""Data parallelism, measured (issue 26): ResNet-20 training on CIFAR-10-JPEG with 1 process × 1
thread against 2 processes × 1 thread, and what a world of one costs per step.

Data: the first ``PER_CLASS`` training and ``TEST_PER_CLASS`` test images of every class of
``--data`` (default data/CIFAR-10-JPEG, else ../shared/datasets/CIFAR-10-JPEG) copied to a temporary
folder and read in memory (``data.name: image_folder``, its decode cache in the same temporary
folder). Model and recipe: configs/cifar10_resnet20.yaml (summed loss, clip 2.0, flip + pad-4 crop)
at global batch ``BATCH``, built by ``pipeline.build_model`` (the same initialisation on every
rank). Every epoch is timed by ``train.train_epochs`` itself (its record's ``seconds``: the step
loop and the epoch's metrics, evaluation and process start excluded), from the same initial
weights each round, one torch thread in every process.

- a: the bench's own process, no ``torch.distributed`` group: a world of one, today's path and what
  a trial with ``resources.workers: 1`` runs (in-process; Ray Train is used only for workers > 1).
- b: 2 spawned processes in a gloo world of 2 (``torch.distributed``, no Ray: process start and Ray
  Train's set-up are not what is timed), each its half of every global batch; images/s = global
  images ÷ the slower rank's seconds, after a barrier. b+sync: the same with
  ``model.batchnorm_sync``.
- overhead: train_epochs in a world of one against the step loop as it was before data parallelism
  (46a2f3e^: no World, no shard, ``loss.backward()``): what ``workers: 1`` adds per step; and that
  addition alone (``train._backward`` around a one-weight graph's backward, µs), which a ResNet
  step's noise on a shared machine hides. On CUDA,
  also train_epochs in a 1-rank nccl world (a spawned process) against in-process.
- limits of b/a: one process's step at the per-worker batch (compute alone), 2 processes' steps at
  the per-worker batch at once without communication (the 2 cores' contention), and the gradient's
  all-reduce over the world of 2.

``--device cuda``: the world of 2 needs 2 GPUs (one a rank, nccl); with one, its rows say skipped.
``--quick``: 7 training and 3 test images a class, global batch 32 (2 steps), no warm-up round.
"""
from __future__ import annotations

import copy
import os
import queue as queue_mod
import shutil
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from cts_ray import config, data as data_mod, pipeline, runtime
from cts_ray.distributed import World
from cts_ray.runtime import derive_seed
from cts_ray.train import _backward, autocast, make_optimizer, to_input, train_epochs

from .paper import DATA, RECIPE, data_overrides, quick_subset
from .report import Row, alternate, cpu_model, ratio, summary

BATCH, PER_CLASS, TEST_PER_CLASS, CUDA_PER_CLASS = 128, 256, 25, 1024
QUICK_BATCH, QUICK_PER_CLASS, QUICK_TEST_PER_CLASS = 32, 7, 3
SPEEDUP, OVERHEAD = 1.6, 1.02          # targets: b/a ≥ 1.6×, a world of one ≤ 2 % per step
ALLREDUCES = 20                        # calls timed per round


class Trainer:
    """One process's side: the recipe's ResNet-20 (and, in a world of N, its SyncBatchNorm twin),
    the data in memory on the device, and the measurements."""

    def __init__(self, overrides: list[str]):
        self.cfg = config.load(RECIPE, overrides)
        self.device = runtime.configure(self.cfg.resources)
        self.amp = runtime.use_amp(self.cfg.resources, self.device)
        self.data = data_mod.load(self.cfg.data, self.device)
        self.world = World.current()
        build = lambda cfg: pipeline.build_model(cfg, self.data, self.device, self.amp)
        self.models = {"plain": build(self.cfg)}
        if self.world.size > 1:
            self.models["sync"] = build(config.load(RECIPE, overrides + ["model.batchnorm_sync=true"]))
        self.init = {k: copy.deepcopy(m.state_dict()) for k, m in self.models.items()}

    def epoch(self, key: str = "plain") -> float:
        """Seconds of one epoch of train_epochs (as it records them)."""
        model = self.models[key]
        model.load_state_dict(self.init[key])
        return next(train_epochs(model, self.data, self.cfg.training, start=0, end=1, order_seed=0, amp=self.amp,
                                 phase="bench"))["seconds"]

    def old_loop(self, batch: int, steps: int) -> float:
        """Seconds per step of train_epochs' loop before data parallelism (46a2f3e^: no World, no
        shard, ``loss.backward()``), ``steps`` steps at ``batch``; no collective, whatever the world."""
        model, t = self.models["plain"], self.cfg.training
        model.load_state_dict(self.init["plain"])
        opt = make_optimizer(model, t)
        params = [p for g in opt.param_groups for p in g["params"]]
        t0 = time.perf_counter()
        generator = torch.Generator().manual_seed(derive_seed(0, "epoch:0"))
        model.train()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        for step, (x, y) in enumerate(self.data.train_batches(batch, generator)):
            if step == steps:
                break
            with autocast(self.amp, self.device):
                out = model(to_input(x, self.amp))
                loss = F.cross_entropy(out.float(), y, reduction=t.loss_reduction)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if t.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            opt.step()
            loss_sum += loss.detach() if t.loss_reduction == "sum" else loss.detach() * y.numel()
            correct += (out.argmax(1) == y).sum()
        loss_sum.item()          # the epoch's one host-device sync, as in train_epochs
        return (time.perf_counter() - t0) / steps

    def machinery(self, calls: int = 2000) -> float:
        """Seconds per step that train_epochs' World adds to the old loop in a world of one: its
        ``_backward`` (a size check) around ``loss.backward()``, on a one-weight graph so that the
        difference is not lost in a ResNet step's noise (the per-epoch ``World.current()`` is less)."""
        w, world = torch.ones((), requires_grad=True), World.current()
        spent = []
        for step in (lambda: (w * 2).backward(), lambda: _backward(w * 2, world, "sum", [w])):
            t0 = time.perf_counter()
            for _ in range(calls):
                step()
            spent.append((time.perf_counter() - t0) / calls)
        return spent[1] - spent[0]

    def allreduce(self, calls: int) -> float:
        """Seconds per all-reduce of a gradient-sized flat tensor (what ``World.grads_`` sends a step)."""
        flat = torch.zeros(sum(p.numel() for p in self.models["plain"].parameters()), device=self.device)
        self.world.sum_(flat)    # the first call sets the connection up
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(calls):
            self.world.sum_(flat)
        sync(self.device)
        return (time.perf_counter() - t0) / calls


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rank_main(rank: int, size: int, backend: str, folder: str, overrides: list[str], inbox, outbox) -> None:
    """One rank: joins the world, builds its Trainer, then runs each ``(method, *args)`` it is sent
    after a barrier (so the ranks start together) and sends back ``(rank, value)``."""
    torch.set_num_threads(1)
    try:
        gpu = torch.device("cuda", rank) if backend == "nccl" else None
        if gpu is not None:
            torch.cuda.set_device(gpu)
        dist.init_process_group(backend, init_method=f"file://{folder}/rendezvous", rank=rank, world_size=size,
                                device_id=gpu)
        try:
            trainer = Trainer(overrides)
            outbox.put((rank, 0.0))
            while (cmd := inbox.get())[0] != "stop":
                dist.barrier()
                outbox.put((rank, getattr(trainer, cmd[0])(*cmd[1:])))
        finally:
            dist.destroy_process_group()
    except BaseException:
        outbox.put(("error", f"rank {rank} of {size}:\n{traceback.format_exc()}"))
        raise


class Ranks:
    """``size`` spawned processes (spawned, not forked: a forked OpenMP pool can hang) in a
    ``torch.distributed`` world, each with a Trainer; ``call`` runs one measurement on every rank."""

    def __init__(self, size: int, backend: str, overrides: list[str], folder: Path, timeout: float = 600):
        folder.mkdir(parents=True)
        ctx = mp.get_context("spawn")
        self.size, self.timeout = size, timeout
        self.inbox = [ctx.Queue() for _ in range(size)]
        self.outbox = ctx.Queue()
        self.procs = [ctx.Process(target=_rank_main, args=(r, size, backend, str(folder), overrides, self.inbox[r],
                                                           self.outbox), daemon=True) for r in range(size)]
        for p in self.procs:
            p.start()
        self._collect()          # every rank ready: joined, data loaded, models built

    def call(self, method: str, *args) -> list[float]:
        for q in self.inbox:
            q.put((method, *args))
        return self._collect()

    def _collect(self) -> list[float]:
        got: dict[int, float] = {}
        deadline = time.time() + self.timeout
        while len(got) < self.size:
            try:
                rank, value = self.outbox.get(timeout=5)
            except queue_mod.Empty:
                dead = [p.exitcode for p in self.procs if p.exitcode is not None]
                if dead or time.time() > deadline:
                    raise RuntimeError(f"ddp ranks: exit codes {dead}, or no answer within {self.timeout:.0f} s") from None
                continue
            if rank == "error":
                raise RuntimeError(value)
            got[rank] = value
        return [got[r] for r in range(self.size)]

    def close(self) -> None:
        for q in self.inbox:
            q.put(("stop",))
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()


def run(repeats: int | None = None, quick: bool = False, device: str = "auto", data: str | None = None,
        **_) -> list[Row]:
    repeats = repeats or (2 if quick else 5)
    cuda = device != "cpu" and torch.cuda.is_available()
    if device == "cuda" and not cuda:
        print("  ddp: skipped: --device cuda, and no CUDA device is visible", flush=True)
        return []
    gpus = torch.cuda.device_count() if cuda else 0
    batch = QUICK_BATCH if quick else BATCH
    per_class, test_per_class = ((QUICK_PER_CLASS, QUICK_TEST_PER_CLASS) if quick else
                                 (CUDA_PER_CLASS if cuda else PER_CLASS, TEST_PER_CLASS))
    src = Path(data) if data else next((p for p in DATA if p.is_dir()), DATA[-1])
    tmp = Path(tempfile.mkdtemp(prefix="cts-bench-ddp-"))
    cache, threads = os.environ.get("CTS_RAY_CACHE"), torch.get_num_threads()
    os.environ["CTS_RAY_CACHE"] = str(tmp / "cache")   # the subset's decode: gone with the folder; ranks inherit it
    pools: dict[str, Ranks] = {}
    try:
        folder = quick_subset(src, tmp / "data", per_class, test_per_class)
        overrides = [*data_overrides(folder), "data.stream=off", f"training.batch_size={batch}",
                     "training.milestones=[]", f"resources.device={'cuda' if cuda else 'cpu'}"]
        torch.set_num_threads(1)
        local = Trainer(overrides)   # decodes the subset once, before the ranks read its cache
        steps = local.data.steps_per_epoch(batch)
        images = steps * batch
        backend = "nccl" if cuda else "gloo"
        if cuda:
            pools["one"] = Ranks(1, backend, overrides, tmp / "one")
        if not cuda or gpus >= 2:
            pools["two"] = Ranks(2, backend, overrides, tmp / "two")
        where = runtime.device_name(local.device) if cuda else cpu_model()
        print(f"  ResNet-20, {local.data.n_train} CIFAR-10-JPEG images ({steps} steps of {batch}) on {where}, "
              f"1 thread a process; worlds: {', '.join(f'{len(p.procs)} × {backend}' for p in pools.values())}; "
              f"{repeats} rounds", flush=True)
        fns = {"a": lambda: images / local.epoch(),
               "old loop": lambda: 1000 * local.old_loop(batch, steps),
               "half alone": lambda: 1000 * local.old_loop(batch // 2, steps),
               "machinery": lambda: 1e6 * local.machinery(200 if quick else 2000)}
        if "one" in pools:
            fns["nccl 1"] = lambda: images / pools["one"].call("epoch")[0]
        if "two" in pools:
            two = pools["two"]
            fns["b"] = lambda: images / max(two.call("epoch"))
            fns["b sync"] = lambda: images / max(two.call("epoch", "sync"))
            fns["half at once"] = lambda: 1000 * max(two.call("old_loop", batch // 2, steps))
            fns["allreduce"] = lambda: 1000 * statistics.median(two.call("allreduce", 5 if quick else ALLREDUCES))
        load = os.getloadavg()[0]
        got = alternate(fns, repeats, warmup=not quick)
        load = (load, os.getloadavg()[0])
    finally:
        for p in pools.values():
            p.close()
        torch.set_num_threads(threads)
        os.environ.pop("CTS_RAY_CACHE") if cache is None else os.environ.update(CTS_RAY_CACHE=cache)
        shutil.rmtree(tmp, ignore_errors=True)
    return rows(got, batch, images, quick, cuda, gpus) + [
        Row("machine: 1-minute load average at the end (b needs 2 idle cores)", load[1], "runnable",
            ratio=f"{load[0]:.1f} at the start; {os.cpu_count()} cores")]


def row(name: str, xs: list[float], unit: str, cell: str = "—", target: str = "—", met: str = "—") -> Row:
    med, spread = summary(xs)
    return Row(name, med, unit, spread, cell, target, met)


def rows(got: dict[str, list[float]], batch: int, images: int, quick: bool, cuda: bool, gpus: int) -> list[Row]:
    ok = lambda c: "— (quick)" if quick else "yes" if c else "no"
    step_ms = lambda ims: [1000 * batch / v for v in ims]     # img/s → ms per global step
    a, kind, half = got["a"], "GPU" if cuda else "thread", batch // 2
    out = [row(f"a: 1 process × 1 {kind}, world of one (today's path), {images} images", a, "img/s", "1.00")]
    if "b" in got:
        r, cell = ratio(got["b"], a)
        out.append(row(f"b: 2 processes × 1 {kind}, {'nccl' if cuda else 'gloo'} world of 2 ({half} each)", got["b"],
                       "img/s", cell, f"b/a ≥ {SPEEDUP}×", ok(r >= SPEEDUP)))
        out.append(row("b+sync: the same, model.batchnorm_sync", got["b sync"], "img/s", ratio(got["b sync"], a)[1]))
    else:
        out.append(Row(f"b: 2 processes × 1 GPU: skipped: one GPU ({gpus} visible)", float("nan"), "img/s"))
    r, cell = ratio(step_ms(a), got["old loop"])
    out.append(row("overhead: train_epochs step, world of one ÷ the loop before data parallelism (46a2f3e^)",
                   step_ms(a), "ms/step", cell, f"≤ {OVERHEAD}", ok(r <= OVERHEAD)))
    share = statistics.median(got["machinery"]) / statistics.median(step_ms(a)) / 1000
    out.append(row("overhead: the World machinery alone (train._backward vs loss.backward(), one-weight graph)",
                   got["machinery"], "µs/step", f"{100 * share:.4f} % of a's step", f"≤ {100 * (OVERHEAD - 1):.0f} %",
                   ok(share <= OVERHEAD - 1)))
    if "nccl 1" in got:
        r, cell = ratio(step_ms(got["nccl 1"]), step_ms(a))
        out.append(row("overhead: train_epochs step in a 1-rank nccl world ÷ in-process", step_ms(got["nccl 1"]),
                       "ms/step", cell, f"≤ {OVERHEAD}", ok(r <= OVERHEAD)))
    # what bounds b/a: compute at the per-worker batch, the cores' contention, the gradient's all-reduce
    out.append(row(f"limit: 1 process, a step at batch {half} alone", got["half alone"], "ms/step",
                   f"{ratio(step_ms(a), got['half alone'])[1]} = a's step ÷ this: b/a if nothing else cost"))
    if "b" in got:
        out.append(row(f"limit: 2 processes, steps at batch {half} at once, no communication", got["half at once"],
                       "ms/step", f"{ratio(step_ms(a), got['half at once'])[1]} = a's step ÷ this: b/a with contention"))
        share = statistics.median(got["allreduce"]) / statistics.median(step_ms(got["b"]))
        out.append(row("limit: gradient all-reduce, world of 2 (one flat call a step)", got["allreduce"], "ms",
                       f"{100 * share:.1f} % of b's step"))
    return out
