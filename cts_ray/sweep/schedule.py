"""Grid sweeps whose trials share work, scheduled so that no trial holds a slot to wait for another.

Trials of a seed share their dense run, and LTR trials of a seed share their pruning rounds (the
sweep's ``DenseCache``): round r is trained once, by the first trial that reaches it, and read by
the others. Handed to Tune in grid order, a trial that needs work another trial is still doing
would hold its slot and wait on the cache's lock. ``SharedWorkGrid`` hands out a trial only when
it can run without waiting:

- its dense run is in the cache, or no trial has started it yet (this trial will train it);
- for LTR, every trial of its chain with fewer rounds has ended (it then trains only the rounds
  beyond theirs, reading the rest).

Among the trials it could hand out it prefers LTR chains (the sweep's critical path: their rounds
are serial), deepest chain first, then trials that start a dense run others wait for, then grid
order. Each trial stays one Tune trial with its own rows, so tables, MLflow, retries and
``--resume`` are as for any grid. Used for grid sweeps where some dense run or LTR chain is shared
(``shares_work``); other sweeps keep Tune's own grid generator.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from ray.tune.search import Searcher

from .. import storage
from .work import Work, plan, shares_work  # noqa: F401  (the searcher's inputs)


class SharedWorkGrid(Searcher):
    """A grid searcher that suggests a point only when it can run without waiting (module doc)."""

    def __init__(self, work: list[Work], cache_root, repeats: int = 1):
        super().__init__()
        self.cache_root = str(cache_root)
        self.work = work
        self.todo = [i for _ in range(repeats) for i in range(len(work))]   # indices into work, grid order
        self.running: dict[str, int] = {}        # trial id -> work index (suggested, not yet ended)
        self.training: Counter = Counter()       # dense key -> running trials that may be training it
        self.cached: set[str] = set()            # dense keys found in the cache
        self.outstanding: dict[str, Counter] = {}   # LTR chain -> rounds of its trials not yet ended
        self.depth: dict[str, int] = {}
        for i in self.todo:
            w = work[i]
            if w.chain:
                self.outstanding.setdefault(w.chain, Counter())[w.rounds] += 1
                self.depth[w.chain] = max(self.depth.get(w.chain, 0), w.rounds)

    # ---- readiness
    def _ready(self, w: Work) -> bool:
        if self.training[w.dense] and w.dense not in self.cached:
            if not Path(self.cache_root, w.dense, "dense.pt").exists():
                return False   # a running trial is training it
            self.cached.add(w.dense)
        if w.chain and min(r for r, n in self.outstanding[w.chain].items() if n) < w.rounds:
            return False       # a shallower trial of the chain has not ended: its rounds come first
        return True

    def _priority(self, w: Work) -> tuple:
        if w.chain:
            return (0, -self.depth[w.chain], w.rounds)
        return (1,) if w.dense not in self.cached and not self.training[w.dense] else (2,)

    # ---- Tune's searcher interface
    def suggest(self, trial_id: str):
        if not self.todo:
            return Searcher.FINISHED
        ready = [(self._priority(self.work[i]), n) for n, i in enumerate(self.todo) if self._ready(self.work[i])]
        if not ready:
            return None   # Tune asks again later
        i = self.todo.pop(min(ready)[1])
        w = self.work[i]
        self.running[trial_id] = i
        self.training[w.dense] += 1
        return dict(w.point)

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        i = self.running.pop(trial_id, None)
        if i is None:
            return
        w = self.work[i]
        self.training[w.dense] -= 1
        if w.chain:
            self.outstanding[w.chain][w.rounds] -= 1

    # JSON, not pickle: a sweep folder's files never run code when read (tests/test_safe_defaults.py)
    def save(self, checkpoint_path: str) -> None:
        state = {"cache_root": self.cache_root, "work": [asdict(w) for w in self.work], "todo": self.todo,
                 "running": self.running, "training": self.training, "cached": sorted(self.cached),
                 "outstanding": {c: list(n.items()) for c, n in self.outstanding.items()}, "depth": self.depth}
        storage.write_text(checkpoint_path, json.dumps(state))

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as f:
            s = json.load(f)
        self.cache_root, self.work, self.todo = s["cache_root"], [Work(**w) for w in s["work"]], s["todo"]
        self.running, self.training, self.cached = s["running"], Counter(s["training"]), set(s["cached"])
        self.outstanding = {c: Counter(dict((int(r), n) for r, n in items)) for c, items in s["outstanding"].items()}
        self.depth = s["depth"]
