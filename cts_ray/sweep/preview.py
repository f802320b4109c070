"""``cts-ray sweep FILE --dry-run``: what a sweep would run, from its configs alone."""
from __future__ import annotations

from ..config import from_dict
from ..wording import count
from .spec import TUNE_DIR, SweepSpec, probes
from .work import shared_work

LIST_AT_MOST = 40   # a dry run lists the trials of sweeps up to this size, else their count and axes


def preview(spec: SweepSpec) -> str:
    """What ``cts-ray sweep FILE --dry-run`` prints: the trials, the dense runs and LTR rounds they
    share, and the compute in epochs. Builds configs only: no Ray, no files."""
    from ..cache import DenseCache, dense_until
    from ..methods import METHODS, rounds_for
    points = spec.grid_points() if spec.grid else [{}]
    # random/optuna: the edges of each distribution stand in
    per_sample = [{**pt, **pr} for pt in points for pr in probes(spec.sample)]
    configs = [from_dict(spec.trial_raw(v)) for v in per_sample]
    n = spec.trial_count()
    axes = ", ".join([f"{k} × {len(v)}" for k, v in spec.grid.items()] +
                     [f"{k} ~ {next(iter(d))}{next(iter(d.values()))}" for k, d in spec.sample.items()])
    lines = [f"sweep {spec.name!r}: dry run — nothing is started or written",
             f"{n} trials ({axes or 'no swept keys'}), searcher {spec.searcher}"
             + (f", {spec.num_samples} samples per grid point" if spec.searcher == "grid" and spec.num_samples > 1
                else ""),
             f"folder {spec.root}" + (" (exists: continue it with --resume or --extend)" if (spec.root / TUNE_DIR).exists()
                                      else "")]
    lines.append(_resources(configs[0]))
    if spec.searcher == "grid" and n <= LIST_AT_MOST:
        lines += ["trials:"] + [f"  {i + 1:>3}  " + (" ".join(f"{k}={v}" for k, v in p.items()) or "(the base config)")
                                for i, p in enumerate(points * spec.num_samples)]
    cache = DenseCache(spec.root.parent / "_cache" / "dense")   # key() only: nothing is created
    dense, chains, own = {}, {}, []
    for cfg in configs:
        dense.setdefault(cache.key(cfg), (dense_until(cfg), []))[1].append(cfg)
        method = METHODS[cfg.search.method]
        if cfg.search.method == "ltr":
            chain = (cache.key(cfg), cfg.search.ltr_fraction, cfg.search.ltr_output_fraction)
            rounds = rounds_for(cfg.search.density, cfg.search.ltr_fraction)
            old = chains.get(chain, (0, 0, 0))
            chains[chain] = (max(old[0], rounds), cfg.training.epochs - cfg.search_epoch, old[2] + 1)
        else:
            own.append(method.epochs(cfg) + (cfg.training.epochs - cfg.search_epoch if cfg.retrain else 0))
    scale = n / len(configs)   # grid repeats, or the trials a searcher draws per probe
    lines.append(f"dense runs: {len(dense)} shared by {n} trials (cache keys "
                 + ", ".join(f"{k}: {count(round(len(v[1]) * scale), 'trial')}, {v[0]} epochs" for k, v in list(dense.items())[:6])
                 + (" …" if len(dense) > 6 else "") + ")")
    if chains:
        lines.append("LTR levels: " + "; ".join(f"{r} rounds shared by {count(c, 'trial')}" for r, _, c in chains.values()))
    if shared_work(spec) is not None:
        lines.append("order: a trial starts once its dense run is cached (or to train it) and, for LTR, after the "
                     "shallower trials of its chain; LTR chains first — no trial holds a slot to wait")
    shared = sum(e for e, _ in dense.values()) + sum(r * e for r, e, _ in chains.values()) + scale * sum(own)
    alone = sum(dense_until(c) + (METHODS[c.search.method].epochs(c) - c.training.epochs if c.search.method == "ltr"
                                  else 0) for c in configs) * scale + scale * sum(own)
    lines.append(f"compute: about {shared:,.0f} epochs ({alone:,.0f} without the shared dense runs and LTR rounds); "
                 "1 epoch = one pass over the trial's training set (dense training, a CTS search epoch and a "
                 "retraining epoch count 1 each)"
                 + ("; sampled keys are estimated at their ranges' edges" if spec.sample else ""))
    return "\n".join(lines)


def _resources(cfg) -> str:
    """What each trial reserves on the cluster (every trial's the same: spec.py)."""
    r = cfg.resources
    each = f"{r.cpus:g} CPU" + (f" and {r.gpus:g} GPU" if r.gpus else "")
    if r.workers == 1:
        return f"resources: each trial {each}, in its own process"
    return (f"resources: each trial {r.workers} data-parallel workers (Ray Train, {r.backend}) "
            f"of {each} each, reserved together (on one node or several); the trial's own process a sliver of a CPU")
