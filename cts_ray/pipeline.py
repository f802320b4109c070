"""One experiment: dense training to the search point → ticket search → retraining → evaluation.

Everything a run writes goes to a staging folder beside ``out`` that is renamed into place at the
end, so an interrupted or failed run never leaves a half-written run folder, and an existing run
is never touched unless ``overwrite`` is asked for.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from . import data as data_mod
from . import models, runtime, sanity
from .config import Config, ConfigError
from .masking import Mask
from .methods import METHODS, SearchContext
from .train import evaluate, prepare, train_epochs

RUN_FILES = ("config.yaml", "summary.json", "metrics.jsonl", "layers.json", "mask.pt", "search_point.pt")
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


def make_retrain(cfg: Config, model, snapshot: dict, data, amp: bool, emit: Callable[[dict], None]):
    """The one retraining path: train (mask, search-point weights) from epoch k to the end."""
    k, t = cfg.search_epoch, cfg.training

    def retrain(mask: Mask, phase: str = "retrain", start_state=None, tags=None) -> dict:
        model.load_state_dict(snapshot if start_state is None else start_state)   # rewind
        mask.apply_(model)
        start = copy.deepcopy(model.state_dict())
        order = runtime.generator(cfg.seed, "retrain-order")
        seconds, final, best = 0.0, None, 0.0
        for rec in train_epochs(model, data, t, start=k, end=t.epochs, generator=order, mask=mask,
                                amp=amp, phase=phase):
            rec.update(tags or {})
            seconds += rec["seconds"]
            emit(rec)
            final, best = rec, max(best, rec["test_accuracy"])
        if final is None:  # search point at the end of training: nothing left to train
            final = {"phase": phase, **(tags or {}), **evaluate(model, data, amp)}
            best = final["test_accuracy"]
        return {"final": final, "best_test_accuracy": best, "seconds": seconds,
                "start": start, "state": copy.deepcopy(model.state_dict())}

    return retrain


def run(cfg: Config, out=None, *, overwrite: bool = False, progress: bool = True,
        on_record: Optional[Callable[[dict], None]] = None) -> dict:
    out = Path(out) if out is not None else default_out(cfg)
    check_out(out, overwrite)
    device = runtime.configure(cfg.resources)
    amp = runtime.use_amp(cfg.resources, device)
    t, s = cfg.training, cfg.search
    method = METHODS[s.method]
    data = data_mod.load(cfg.data, device)           # ConfigError here still precedes any writing

    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    metrics_file = open(staging / "metrics.jsonl", "w")
    k = cfg.search_epoch
    dense_end = t.epochs if (t.dense_baseline or method.needs_trained) else k
    method_epochs = method.epochs(cfg) - (t.epochs if method.needs_trained else 0)
    bar = _Progress(dense_end + method_epochs + (t.epochs - k if cfg.retrain and not method.needs_trained else 0),
                    progress)

    def emit(record: dict) -> None:
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        bar(record)
        if on_record is not None:
            on_record(record)

    try:
        (staging / "config.yaml").write_text(cfg.to_yaml())

        # 1. dense training, with a snapshot of the weights at the search point
        torch.manual_seed(runtime.derive_seed(cfg.seed, "init"))
        model = prepare(models.build(cfg.model.name, data.input_shape, data.num_classes), device, amp)
        snapshot = copy.deepcopy(model.state_dict())
        pretrain_seconds, dense_seconds, dense_acc = 0.0, 0.0, None
        order = runtime.generator(cfg.seed, "dense-order")
        for rec in train_epochs(model, data, t, start=0, end=dense_end, generator=order, amp=amp, phase="dense"):
            dense_seconds += rec["seconds"]
            emit(rec)
            if rec["epoch"] == k:
                snapshot, pretrain_seconds = copy.deepcopy(model.state_dict()), dense_seconds
            dense_acc = rec["test_accuracy"]
        trained_state = copy.deepcopy(model.state_dict()) if method.needs_trained else None
        if not t.dense_baseline:
            dense_acc = None
        torch.save(snapshot, staging / "search_point.pt")

        retrain = make_retrain(cfg, model, snapshot, data, amp, emit)

        # 2. ticket search on the search-point weights
        model.load_state_dict(snapshot)
        ctx = SearchContext(cfg=cfg, model=model, data=data, device=device, amp=amp, on_epoch=emit,
                            trained_state=trained_state, dense_seconds=dense_seconds, retrain=retrain)
        ticket = method.search(ctx)
        mask = sanity.apply(s.sanity, ticket.mask, ticket.scores, runtime.generator(cfg.seed, "sanity"))

        # 3. retraining of (mask, search-point weights), or evaluation as is for strong tickets
        start = ticket.weights if ticket.weights is not None else snapshot
        if s.sanity == "reinit":
            torch.manual_seed(runtime.derive_seed(cfg.seed, "reinit"))
            start = prepare(models.build(cfg.model.name, data.input_shape, data.num_classes), device, amp).state_dict()
        if ticket.retrained is not None and s.sanity == "none":
            result = ticket.retrained           # the method already retrained this very ticket
        elif cfg.retrain:
            result = retrain(mask, start_state=start)
        else:
            model.load_state_dict(start)
            mask.apply_(model)
            final = {"phase": "evaluate", **evaluate(model, data, amp)}
            result = {"final": final, "best_test_accuracy": final["test_accuracy"], "seconds": 0.0}
        final = result["final"]

        mask.save(staging / "mask.pt")
        if ticket.level_masks:
            torch.save([{n: m.cpu() for n, m in lm.layers.items()} for lm in ticket.level_masks],
                       staging / "level_masks.pt")
        layers = mask.report()
        (staging / "layers.json").write_text(json.dumps(layers, indent=1))
        is_cts = s.method == "cts"
        # SPEC §1 compute accounting: time to a retrained ticket. LTR's own seconds already hold
        # its dense training to the end and every round's retraining.
        retrain_seconds = result["seconds"] if ticket.retrained is None or s.sanity != "none" else 0.0
        ticket_seconds = (ticket.seconds if method.needs_trained
                          else pretrain_seconds + ticket.seconds) + retrain_seconds
        summary = {
            "method": s.method, "objective": s.objective if is_cts else None,
            "controller": s.controller if is_cts else None,
            "temperature": s.temperature if is_cts else None,
            "sanity": s.sanity, "strong_ticket": method.strong, "retrained": bool(cfg.retrain),
            "seed": cfg.seed, "config_hash": cfg.hash, "dataset": cfg.data.name, "model": cfg.model.name,
            "search_point": s.point, "search_epoch": k,
            "target_density": s.density, "achieved_density": mask.density,
            "kept_weights": mask.kept, "prunable_weights": mask.numel,
            "layer_densities": {r["layer"]: r["density"] for r in layers[:-1]},
            "test_accuracy": final["test_accuracy"], "best_test_accuracy": result["best_test_accuracy"],
            "dense_test_accuracy": dense_acc,
            "pretrain_seconds": pretrain_seconds, "dense_seconds": dense_seconds,
            "search_seconds": ticket.seconds, "retrain_seconds": retrain_seconds,
            "ticket_seconds": ticket_seconds,
            "epochs_equivalent": (method.epochs(cfg) if method.needs_trained else k + method.epochs(cfg))
            + (t.epochs - k if retrain_seconds or (cfg.retrain and ticket.retrained is None) else 0),
            "mask_sha256": mask.sha256(),
            "final_search_metrics": ticket.history[-1] if ticket.history else None,
            "levels": ticket.levels or None,
            "code_version": runtime.code_version(), "library_versions": runtime.library_versions(),
            "device": runtime.device_name(device), "config": cfg.to_dict(),
        }
        (staging / "summary.json").write_text(json.dumps(summary, indent=1))
        metrics_file.close()
        bar.close()
        _publish(staging, out)
        return summary
    except BaseException:
        metrics_file.close()
        bar.close()
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _publish(staging: Path, out: Path) -> None:
    """Move the finished run into place; an old run is only removed once the new one is complete."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)
