"""Lottery Ticket Rewinding / IMP with rewinding (SPEC §2).

Start from the dense network trained to the end; each round prunes a fraction (default 20 %) of
the remaining weights by global magnitude, rewinds the kept weights to the search point and
retrains them to the end. Density after r rounds is (1 − f)^r; the number of rounds is the r whose
density is nearest the target (0.8^22 ≈ 0.0074). Every level is recorded (density, effective density and
collapsed layers (anatomy.py), accuracy, cumulative seconds) so one LTR run serves a whole sparsity sweep.
"""
from __future__ import annotations

import torch

from ..anatomy import anatomy
from ..masking import Mask
from ..models import prunable_names
from . import ltr_epochs as epochs, rounds_for  # the schedule: in the torch-free registry
from .base import SearchContext, Ticket


def next_count(remaining: int, fraction: float) -> int:
    """Weights a round keeps of ``remaining`` when it prunes ``fraction`` of them."""
    return round(remaining * (1 - fraction))


def prune_round(mask: Mask, weights: dict, fraction: float, output_fraction=None,
                output_layer=None) -> Mask:
    """Remove ``fraction`` of the remaining weights by global magnitude (ties: lower index kept).
    With ``output_fraction`` the classifier layer is pruned on its own at that rate."""
    separate = [output_layer] if output_fraction is not None else []
    groups = [([n for n in mask.layers if n not in separate], fraction)]
    if separate:
        groups.append((separate, output_fraction))
    out = dict(mask.layers)
    for names, f in groups:
        scores = torch.cat([torch.where(mask.layers[n], weights[n].detach().abs().float().cpu(),
                                        torch.tensor(-1.0)).flatten() for n in names])
        remaining = int(sum(int(mask.layers[n].sum()) for n in names))
        keep = next_count(remaining, f)
        order = torch.sort(scores, descending=True, stable=True).indices
        flat = torch.zeros(scores.numel(), dtype=torch.bool)
        flat[order[:keep]] = True
        i = 0
        for n in names:
            k = mask.layers[n].numel()
            out[n] = flat[i:i + k].view(mask.layers[n].shape)
            i += k
    return Mask(out)


def search(ctx: SearchContext) -> Ticket:
    s = ctx.cfg.search
    assert ctx.trained_state is not None and ctx.retrain is not None, "ltr needs the trained dense net"
    names = prunable_names(ctx.model)
    mask = Mask({n: torch.ones(ctx.trained_state[n].shape, dtype=torch.bool) for n in names})
    weights = {n: ctx.trained_state[n].cpu() for n in names}
    cumulative = ctx.dense_seconds
    levels, level_masks, result, scores = [], [], None, None
    for r in range(1, rounds_for(s.density, s.ltr_fraction) + 1):
        scores = torch.cat([weights[n].abs().float().flatten() for n in names])

        def one_round(mask=mask, weights=weights, r=r):
            pruned = prune_round(mask, weights, s.ltr_fraction, s.ltr_output_fraction, names[-1])
            res = ctx.retrain(pruned, phase="retrain", tags={"round": r})
            return {"mask": pruned.layers, "final": res["final"], "peak_test_accuracy": res["peak_test_accuracy"],
                    "seconds": res["seconds"], "records": res["records"], "state": res["state"],
                    "weights": {n: res["state"][n].cpu() for n in names}}

        if ctx.cache is not None:   # rounds are shared by every LTR trial of this dense run
            key = f"{ctx.cache.key(ctx.cfg)}-ltr-{s.ltr_fraction:g}-{s.ltr_output_fraction}"
            out, hit = ctx.cache.get_or_compute(key, f"round{r:03d}", one_round, {"round": r})
            if hit:
                for rec in out["records"]:
                    ctx.on_epoch({**rec, "cached": True})
        else:
            out = one_round()
        mask, weights = Mask(out["mask"]), out["weights"]
        cumulative += out["seconds"]
        levels.append({"round": r, "density": mask.density, "kept": mask.kept,
                       **anatomy(ctx.model, mask, ctx.data.input_shape).summary(),
                       "test_accuracy": out["final"]["test_accuracy"],
                       "peak_test_accuracy": out.get("peak_test_accuracy", out.get("best_test_accuracy")),
                       "cumulative_seconds": cumulative,
                       "cumulative_epochs": epochs(ctx.cfg, r)})
        level_masks.append(mask)
        result = out
    # Training seconds of the whole procedure, dense training to the end included (SPEC §1
    # accounting; evaluation excluded, as for every method; counted in full when rounds were cached).
    return Ticket(mask=mask, seconds=cumulative, scores=scores, levels=levels, level_masks=level_masks,
                  retrained={k: result.get(k) for k in ("final", "peak_test_accuracy", "seconds", "state")},
                  extra={"rounds": len(levels)})
