"""One experiment: dense training to the search point → ticket search → retraining → evaluation.

Everything a run writes goes to a staging folder beside ``out`` that is renamed into place at the
end, so an interrupted or failed run never leaves a half-written run folder, and an existing run
is never touched unless ``overwrite`` is asked for.

For sweeps the same function is resumable: ``on_record`` receives a ``Progress`` with every CTS
search epoch (the search state) and every retraining epoch (the ticket plus the retraining state),
and ``resume`` continues from one to the same result; the dense run to the search point can come
from a shared ``DenseCache``.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from . import data as data_mod
from . import models, runtime, sanity, storage, versions
from .anatomy import anatomy
from .cache import Dense, DenseCache, dense_until
from .config import Config, check_folder
from .distributed import World, sync_batchnorm
from .errors import CompactError, ConfigError
from .export import build_ticket_model, check_run_dir, read_summary, run_config, ticket_cost
from .masking import Mask
from .methods import METHODS, SearchContext, Ticket, applies
from .records import Summary
from .train import evaluate, prepare, train_epochs

RUN_FILES = ("config.yaml", "summary.json", "metrics.jsonl", "layers.json", "mask.pt", "search_point.pt", "ticket.pt")
# LTR runs add level_masks.pt: the mask of every pruning level, in order.


def default_out(cfg: Config, root="results/runs") -> Path:
    s = cfg.search
    return Path(root) / f"{cfg.data.name}-{cfg.model.name}-{s.method}-d{s.density:g}-s{cfg.seed}-{cfg.hash}"


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse before any work if ``out`` already holds something we would replace."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {str(out)!r} is a file; expected a folder for the run")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out: {str(out)!r} already holds a run; choose another --out or pass --overwrite")
    check_folder("--out", out)


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="epoch", file=sys.stderr, dynamic_ncols=True,
                            disable=None)  # None: no bar when stderr is not a terminal

    def __call__(self, record: dict) -> None:
        if self.bar is None:
            return
        self.bar.set_description(record["phase"])
        shown = {k: record[k] for k in ("test_accuracy", "objective", "expected_density") if k in record}
        self.bar.set_postfix({k: f"{v:.4f}" for k, v in shown.items()})
        self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------- stages

def build_model(cfg: Config, data, device, amp: bool):
    """The run's network at its seeded initialisation (the same on every data-parallel rank), its
    BatchNorm synchronised over the world where ``model.batchnorm_sync`` asks."""
    torch.manual_seed(runtime.derive_seed(cfg.seed, "init"))
    model = models.from_config(cfg.model, data.input_shape, data.num_classes, cfg.data.name)
    if cfg.model.batchnorm_sync:
        model = sync_batchnorm(model, World.current())
    return prepare(model, device, amp)


def train_dense(cfg: Config, data, device, amp: bool, emit: Callable[[dict], None] = lambda r: None) -> Dense:
    """Initialise from the seed and train densely, keeping the weights at the search point."""
    k, until = cfg.search_epoch, dense_until(cfg)
    model = build_model(cfg, data, device, amp)
    snapshot = runtime.cpu_copy(model.state_dict())
    records, pretrain, seconds, acc = [], 0.0, 0.0, None
    for rec in train_epochs(model, data, cfg.training, start=0, end=until, amp=amp, phase="dense", compile=cfg.resources.compile,
                            order_seed=runtime.derive_seed(cfg.seed, "dense-order")):
        seconds += rec["seconds"]
        records.append(rec)
        emit(rec)
        if rec["epoch"] == k:
            snapshot, pretrain = runtime.cpu_copy(model.state_dict()), seconds
        acc = rec["test_accuracy"]
    trained = runtime.cpu_copy(model.state_dict()) if until == cfg.training.epochs and until > 0 else None
    return Dense(snapshot, trained, records, pretrain, seconds, acc if until == cfg.training.epochs else None)


@dataclass
class _Tally:
    """A retraining's running totals, kept current after every epoch (and checkpointed with it)."""
    seconds: float = 0.0
    final: Optional[dict] = None
    best: float = 0.0

    def keep(self, rec: dict) -> None:
        self.seconds += rec["seconds"]
        self.final, self.best = rec, max(self.best, rec["test_accuracy"])


class Retrain:
    """The one retraining path: train (mask, search-point weights) from epoch k to the end.
    With ``progress`` given, its ``retrain`` field is kept current after every epoch and handed to
    ``emit(record, progress)``, so a caller can checkpoint; ``resume`` (such a state) continues.
    Returns {"final": last epoch record, "peak_test_accuracy", "seconds", "records", "start", "state"}."""

    def __init__(self, cfg: Config, model, snapshot: dict, data, amp: bool, emit: Callable[..., None]):
        self.cfg, self.model, self.snapshot, self.data, self.amp, self.emit = cfg, model, snapshot, data, amp, emit

    def __call__(self, mask: Mask, phase: str = "retrain", start_state=None, tags=None,
                 progress: Optional["Progress"] = None) -> dict:
        cfg, model, t = self.cfg, self.model, self.cfg.training
        model.load_state_dict(self.snapshot if start_state is None else start_state)   # rewind
        mask.apply_(model)
        start = runtime.cpu_copy(model.state_dict())
        tally, first = _Tally(), cfg.search_epoch
        resume = progress.retrain if progress is not None else None
        if resume is not None:
            model.load_state_dict(resume["model"])
            tally, first = _Tally(resume["seconds"], resume["final"], resume["best"]), resume["epoch"]

        def keep(rec, opt):
            rec.update(tags or {})
            tally.keep(rec)
            if progress is not None:
                progress.retrain = dict(epoch=rec["epoch"], model=runtime.cpu_copy(model.state_dict()),
                                        optimizer=opt.state_dict(), seconds=tally.seconds, final=tally.final,
                                        best=tally.best)

        records = []
        for rec in train_epochs(model, self.data, t, start=first, end=t.epochs, mask=mask, amp=self.amp, phase=phase,
                                compile=cfg.resources.compile, order_seed=runtime.derive_seed(cfg.seed, "retrain-order"),
                                optimizer_state=resume["optimizer"] if resume else None, on_epoch_end=keep):
            records.append(rec)
            self.emit(rec, progress)
        if tally.final is None:  # search point at the end of training: nothing left to train
            tally.final = {"phase": phase, **(tags or {}), **evaluate(model, self.data, self.amp)}
            tally.best = tally.final["test_accuracy"]
        return {"final": tally.final, "peak_test_accuracy": tally.best, "seconds": tally.seconds, "records": records,
                "start": start, "state": runtime.cpu_copy(model.state_dict())}


make_retrain = Retrain   # the name methods/ and tests know it by


def ticket_weights(state: dict, mask: Mask) -> dict:
    """The final ticket's state dict with every masked weight exactly zero (sparse-friendly)."""
    out = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    for name, keep in mask.layers.items():
        out[name] = torch.where(keep.cpu(), out[name], torch.zeros((), dtype=out[name].dtype))
    return out


def evaluate_run(run_dir) -> dict:
    """Re-evaluate a run folder's ticket (ticket.pt) on its config's test set, the model rebuilt
    from the run's full model config: {"test_accuracy", "test_loss", "recorded": the run's
    summary test_accuracy}. A folder that is not a run, or a damaged file, is a ConfigError."""
    run_dir = check_run_dir(run_dir, ("config.yaml", "summary.json", "ticket.pt"))
    recorded = read_summary(run_dir).get("test_accuracy")
    cfg = run_config(run_dir)
    device = runtime.configure(cfg.resources)
    amp = runtime.use_amp(cfg.resources, device)
    data = data_mod.load(cfg.data, device, cfg.resources)
    model = build_ticket_model(cfg, data.input_shape, data.num_classes, run_dir)
    return {**evaluate(prepare(model, device, amp), data, amp), "recorded": recorded}


def ticket_to_state(ticket: Ticket) -> dict:
    """A ticket as plain tensors and lists (checkpointable with weights_only loading)."""
    retrained = None
    if ticket.retrained is not None:
        retrained = {k: ticket.retrained.get(k) for k in ("final", "peak_test_accuracy", "seconds", "state")}
    return {"mask": ticket.mask.layers, "seconds": ticket.seconds, "scores": ticket.scores,
            "history": ticket.history, "weights": ticket.weights, "levels": ticket.levels,
            "level_masks": [m.layers for m in ticket.level_masks], "retrained": retrained,
            "extra": ticket.extra}


def ticket_from_state(state: dict) -> Ticket:
    return Ticket(mask=Mask(state["mask"]), seconds=state["seconds"], scores=state["scores"],
                  history=state["history"], weights=state["weights"], levels=state["levels"],
                  level_masks=[Mask(m) for m in state["level_masks"]], retrained=state["retrained"],
                  extra=state["extra"])


@dataclass
class Progress:
    """What a sweep trial checkpoints: the search state after each search epoch (methods that can
    continue one), the ticket once searched, then the retraining state."""
    records: list = field(default_factory=list)
    ticket: Optional[dict] = None
    retrain: Optional[dict] = None
    search: Optional[dict] = None

    def to_state(self) -> dict:
        return {"records": self.records, "ticket": self.ticket, "retrain": self.retrain, "search": self.search}

    @classmethod
    def from_state(cls, state: dict) -> "Progress":
        return cls(state["records"], state["ticket"], state["retrain"], state.get("search"))


# ---------------------------------------------------------------- one experiment

def run(cfg: Config, out=None, *, overwrite: bool = False, progress: bool = True,
        on_record: Optional[Callable[[dict, Optional[Progress]], None]] = None,
        cache: Optional[DenseCache] = None, resume: Optional[Progress] = None) -> dict:
    """Run one experiment into ``out``; returns its summary (``records.Summary`` as a dict, as
    summary.json holds it). ``on_record(record, progress)`` sees every metrics record;
    ``progress`` is given with each CTS search epoch and each retraining epoch, and is what
    ``resume`` continues from.

    Data-parallel (``World.current()`` of N): every rank computes; only rank 0 writes ``out`` (and
    the cache) and calls ``on_record``; the others return the same summary."""
    out = Path(out) if out is not None else default_out(cfg)
    main = World.current().main
    if main:
        check_out(out, overwrite)
    device = runtime.configure(cfg.resources)
    data = data_mod.load(cfg.data, device, cfg.resources)   # ConfigError here still precedes any writing
    if cfg.resources.threads is None and device.type == "cpu":
        net = models.from_config(cfg.model, data.input_shape, data.num_classes, cfg.data.name)
        params = sum(p.numel() for p in net.parameters())
        torch.set_num_threads(runtime.default_threads(params))
    if not main:
        return _Experiment(cfg, data, device, None, resume, None, False).run(cache)
    for old in out.parent.glob(f".{out.name}.partial-*"):   # left by an earlier, killed attempt
        shutil.rmtree(old, ignore_errors=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    staging.mkdir(parents=True)
    experiment = _Experiment(cfg, data, device, staging, resume, on_record, progress)
    try:
        summary = experiment.run(cache)
        experiment.bar.close()
        _publish(staging, out)
        return summary
    except BaseException:
        experiment.bar.close()
        shutil.rmtree(staging, ignore_errors=True)
        raise


class _Experiment:
    """One run's stages, writing into ``staging``: dense training to the search point, the ticket
    search, retraining (or evaluation as is), and the run folder's files."""

    def __init__(self, cfg: Config, data, device, staging: Optional[Path], resume: Optional[Progress], on_record,
                 progress: bool):
        self.cfg, self.data, self.device, self.staging = cfg, data, device, staging
        self.resumed, self.prog = resume is not None, resume if resume is not None else Progress()
        self.amp = runtime.use_amp(cfg.resources, device)
        self.method, self.on_record = METHODS[cfg.search.method], on_record
        t, k = cfg.training, cfg.search_epoch
        method_epochs = self.method.epochs(cfg) - (t.epochs if self.method.needs_trained else 0)
        retrained = t.epochs - k if cfg.retrain and not self.method.needs_trained else 0
        self.bar = _Progress(dense_until(cfg) + method_epochs + retrained - len(self.prog.records), progress)

    def emit(self, record: dict, progress: Optional[Progress] = None) -> None:
        # epochs counted within each phase (MLflow's steps: retrain/test_accuracy against retraining epoch)
        record.setdefault("phase_step", 1 + sum(r["phase"] == record["phase"] for r in self.prog.records))
        self.prog.records.append(record)
        self.bar(record)
        if self.on_record is not None:
            self.on_record(record, progress)

    def run(self, cache: Optional[DenseCache]) -> dict:
        cfg, data, staging = self.cfg, self.data, self.staging
        if staging is not None:
            storage.write_text(staging / "config.yaml", cfg.to_yaml())
        dense = self.dense(cache)   # shared across trials via the cache
        if staging is not None:
            storage.save_torch(dense.snapshot, staging / "search_point.pt")
        model = build_model(cfg, data, self.device, self.amp)
        model.load_state_dict(dense.snapshot)
        retrain = Retrain(cfg, model, dense.snapshot, data, self.amp, self.emit)
        ticket = self.search(model, dense, retrain, cache)
        mask = sanity.apply(cfg.search.sanity, ticket.mask, ticket.scores, runtime.generator(cfg.seed, "sanity"))
        result = self.ticket_result(model, ticket, mask, dense, retrain)
        return self.write(model, ticket, mask, dense, result)

    def dense(self, cache: Optional[DenseCache]) -> Dense:
        """The dense run to the search point (and to the end where the baseline or the method needs it)."""
        cfg, fresh = self.cfg, not self.resumed
        if cache is None:
            return train_dense(cfg, self.data, self.device, self.amp, self.emit if fresh else (lambda r: None))
        dense, hit = cache.get_or_train(cfg, lambda: train_dense(cfg, self.data, self.device, self.amp))
        if fresh:
            for rec in dense.records:
                self.emit({**rec, "cached": hit})
        return dense

    def search(self, model, dense: Dense, retrain: Retrain, cache) -> Ticket:
        """The method's ticket on the search-point weights (a resumed run: the one it found)."""
        prog = self.prog
        if prog.ticket is None:
            def on_search_epoch(record: dict, state: Optional[dict] = None) -> None:
                if state is None:
                    self.emit(record)
                else:   # a search that can continue from here: checkpoint it with this record
                    prog.search = state
                    self.emit(record, prog)

            ctx = SearchContext(cfg=self.cfg, model=model, data=self.data, device=self.device, amp=self.amp,
                                on_epoch=on_search_epoch, resume=prog.search, trained_state=dense.trained,
                                dense_seconds=dense.dense_seconds, retrain=retrain, cache=cache)
            prog.ticket = ticket_to_state(self.method.search(ctx))   # checkpointed with the next record
            prog.search = None
        return ticket_from_state(prog.ticket)

    def ticket_result(self, model, ticket: Ticket, mask: Mask, dense: Dense, retrain: Retrain) -> dict:
        """Retraining of (mask, search-point weights), or evaluation as is for strong tickets."""
        cfg, s = self.cfg, self.cfg.search
        start = ticket.weights if ticket.weights is not None else dense.snapshot
        if s.sanity == "reinit":
            torch.manual_seed(runtime.derive_seed(cfg.seed, "reinit"))
            start = models.from_config(cfg.model, self.data.input_shape, self.data.num_classes, cfg.data.name).state_dict()
        if ticket.retrained is not None and s.sanity == "none":
            return ticket.retrained           # the method already retrained this very ticket
        if cfg.retrain:
            return retrain(mask, start_state=start, progress=self.prog)
        model.load_state_dict(start)
        mask.apply_(model)
        final = {"phase": "evaluate", **evaluate(model, self.data, self.amp)}
        return {"final": final, "peak_test_accuracy": final["test_accuracy"], "seconds": 0.0,
                "state": runtime.cpu_copy(model.state_dict())}

    def write(self, model, ticket: Ticket, mask: Mask, dense: Dense, result: dict) -> dict:
        """The run folder's files (none without a staging folder: a data-parallel rank > 0);
        returns the summary."""
        anat = anatomy(model, mask, self.data.input_shape)
        layers = anat.report()
        summary = _summary(self.cfg, self.method, ticket, mask, layers, dense, result, self.device, anat,
                           self.data, _inference_cost(model, mask, self.data.input_shape)).to_dict()
        staging = self.staging
        if staging is None:
            return summary
        mask.save(staging / "mask.pt")
        if result.get("state") is not None:   # the ticket as evaluated (absent only from old LTR caches)
            storage.save_torch(ticket_weights(result["state"], mask), staging / "ticket.pt")
        if ticket.level_masks:
            storage.save_torch([lm.layers for lm in ticket.level_masks], staging / "level_masks.pt")
        storage.write_text(staging / "layers.json", json.dumps(layers, indent=1))
        storage.write_text(staging / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.prog.records))
        storage.write_text(staging / "summary.json", json.dumps(summary, indent=1))
        return summary


def _inference_cost(model, mask: Mask, input_shape) -> dict:
    """The compact ticket's parameters and FLOPs (export.py); none for a family it cannot compact."""
    try:
        cost = ticket_cost(model, mask, input_shape)
    except CompactError:
        return {}
    return {k: cost[k] for k in ("compact_params", "compact_flops", "compact_flops_fraction")}


def _summary(cfg: Config, method, ticket: Ticket, mask: Mask, layers: list, dense: Dense, result: dict,
             device, anat, data, cost: dict) -> Summary:
    t, s, k = cfg.training, cfg.search, cfg.search_epoch
    own_retrain = ticket.retrained is not None and s.sanity == "none"
    retrain_seconds = 0.0 if own_retrain else result["seconds"]
    # SPEC §1 compute accounting: time to a retrained ticket. LTR's own seconds already hold its
    # dense training to the end and every round's retraining.
    ticket_seconds = (ticket.seconds if method.needs_trained else dense.pretrain_seconds + ticket.seconds) \
        + retrain_seconds
    retrained_epochs = t.epochs - k if (cfg.retrain and not own_retrain) else 0
    return Summary(
        method=s.method, **{k: getattr(s, k) if applies(s.method, f"search.{k}") else None
                            for k in ("objective", "controller", "temperature")},
        sanity=s.sanity, strong_ticket=method.strong, retrained=bool(cfg.retrain),
        strong_init=ticket.extra.get("strong_init"), seed=cfg.seed, config_hash=cfg.hash,
        dataset=cfg.data.name, model=cfg.model.name, data=data_mod.provenance(cfg.data, data),
        search_point=s.point, search_epoch=k, target_density=s.density, achieved_density=mask.density,
        kept_weights=mask.kept, prunable_weights=mask.numel,
        layer_densities={r["layer"]: r["density"] for r in layers[:-1]},
        effective_density=anat.effective_density, effective_kept=anat.effective_kept,
        collapsed_layers=anat.collapsed_layers,
        layer_alive_units={r["layer"]: r["alive_units"] for r in layers[:-1]}, **cost,
        test_accuracy=result["final"]["test_accuracy"], peak_test_accuracy=result["peak_test_accuracy"],
        dense_test_accuracy=dense.test_accuracy if t.dense_baseline else None,
        pretrain_seconds=dense.pretrain_seconds, dense_seconds=dense.dense_seconds,
        search_seconds=ticket.seconds, retrain_seconds=retrain_seconds, ticket_seconds=ticket_seconds,
        epochs_equivalent=(method.epochs(cfg) if method.needs_trained else k + method.epochs(cfg)) + retrained_epochs,
        mask_sha256=mask.sha256(), final_search_metrics=ticket.history[-1] if ticket.history else None,
        levels=ticket.levels or None, code_version=versions.code_version(),
        library_versions=versions.library_versions(), device=runtime.device_string(device),
        device_name=runtime.device_name(device), threads=torch.get_num_threads(), config=cfg.to_dict())


def _publish(staging: Path, out: Path) -> None:
    """Move the finished run into place; an old run is only removed once the new one is complete."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)
