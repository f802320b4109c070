"""A content-addressed cache of dense runs, shared by the trials of a sweep.

Trials that agree on (data, model, training recipe, seed, search point) share one dense run: the
first trial to ask trains it under a file lock, the others wait and read it. The key is a hash of
``Config.dense_identity()`` plus how far the run goes, so any change that could alter the dense
weights gives a new entry. On a cluster the folder must be on storage every node sees.

The key needs no torch (``--dry-run`` computes it); reading and writing entries does.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from filelock import FileLock

from .config import Config, stable_hash
from .methods import METHODS
from .storage import save_torch, write_text


@dataclass
class Dense:
    """The dense run: weights at the search point (and at the end when trained that far)."""
    snapshot: dict
    trained: Optional[dict]
    records: list
    pretrain_seconds: float
    dense_seconds: float
    test_accuracy: Optional[float]


def dense_until(cfg: Config) -> int:
    """The epoch the dense run trains to: the end when the dense baseline or the method needs it."""
    method = METHODS[cfg.search.method]
    return cfg.training.epochs if (cfg.training.dense_baseline or method.needs_trained) else cfg.search_epoch


class DenseCache:
    def __init__(self, root):
        self.root = Path(root)

    def key(self, cfg: Config) -> str:
        return stable_hash({**cfg.dense_identity(), "until": dense_until(cfg)}, n=16)

    def get_or_train(self, cfg: Config, train: Callable[[], Dense]) -> tuple[Dense, bool]:
        """The cached dense run for ``cfg`` and whether it was a hit; ``train()`` fills a miss."""
        state, hit = self.get_or_compute(self.key(cfg), "dense", lambda: train().__dict__,
                                         {"config_hash": cfg.hash, "dense_identity": cfg.dense_identity()})
        return Dense(**state), hit

    def get_or_compute(self, key: str, name: str, compute: Callable[[], dict], about: dict) -> tuple[dict, bool]:
        """``<key>/<name>.pt``: loaded if present, else computed once (other askers wait on the lock).
        Data-parallel: rank 0 alone takes the lock, decides and writes; every rank computes a miss."""
        import torch
        from .distributed import World
        world = World.current()
        folder = self.root / key
        if world.main:
            folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder / f"{name}.lock")) if world.main else contextlib.nullcontext():
            path = folder / f"{name}.pt"
            if world.agree(path.exists()):
                return torch.load(path, weights_only=True), True
            state = compute()
            if not world.main:
                return state, False
            save_torch(state, path)      # readers never see a half-written file
            write_text(folder / f"{name}.made_by.json", json.dumps(
                {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(), **about}, indent=1))
            return state, False
