"""The work each grid point of a sweep needs and provides (its dense run, its LTR chain): what the
shared-work searcher (schedule.py) orders trials by. Configs only, no Ray or torch: ``--dry-run``
uses it too."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..cache import DenseCache
from ..config import from_dict
from ..methods import rounds_for


@dataclass
class Work:
    """What one grid point needs before it can run, and what it provides."""
    point: dict            # the trial's swept values (dotted keys), as Tune's grid would give them
    dense: str             # its DenseCache key
    chain: Optional[str]   # LTR: the chain of rounds it shares (dense key, fraction, output fraction)
    rounds: int            # LTR: rounds it trains or reads (0 otherwise)


def plan(spec, points: list) -> list[Work]:
    """The work of each point (configs only: nothing is started)."""
    cache = DenseCache(spec.root.parent / "_cache" / "dense")
    out = []
    for p in points:
        cfg = from_dict(spec.trial_raw(p))
        key = cache.key(cfg)
        s = cfg.search
        ltr = s.method == "ltr"
        out.append(Work(p, key, f"{key}-ltr-{s.ltr_fraction:g}-{s.ltr_output_fraction}" if ltr else None,
                        rounds_for(s.density, s.ltr_fraction) if ltr else 0))
    return out


def shares_work(work: list[Work]) -> bool:
    dense = [w.dense for w in work]
    chains = [w.chain for w in work if w.chain]
    return len(set(dense)) < len(dense) or len(set(chains)) < len(chains)


SHARED_WORK = True   # False: Tune's own grid order even where trials share work (bench/slots.py compares)


def shared_work(spec, points: Optional[list] = None) -> Optional[list[Work]]:
    """The grid's work (``plan``) where its trials share some, else None: when the shared-work
    searcher (schedule.py) runs it. ``points``: only these grid points (what --extend adds)."""
    if not SHARED_WORK or spec.searcher != "grid" or spec.sample:
        return None
    work = plan(spec, points if points is not None else spec.grid_points() or [{}])
    return work if shares_work(work) else None
