"""`cts-ray export RUN_DIR`: a run's ticket as a compact dense model in a file plain torch loads.

The artifact is a ``torch.export`` program (``torch.export.save``, ``.pt2``) with a dynamic batch
dimension: ``torch.export.load(path).module()(x)`` runs it with torch alone, no cts-ray class
needed, and the graph is what the compact model computes (gathers, bias maps and constants
included). Every family compaction handles traces with ``torch.export`` (plain convolutions,
linears, BatchNorm, pooling, residual additions; no data-dependent control flow), so TorchScript,
in maintenance mode since torch 2.x, is never needed. Beside it, ``<out>.json``: shapes, the
input normalisation, parameters and FLOPs (dense, masked, compact), what was kept per layer, and
a check that the saved program gives the masked ticket's logits.

Costs (``cost``, ``ticket_cost``): FLOPs are multiply-accumulates (a multiply and its add count
once) of the Conv2d and Linear layers for one example; BatchNorm, activations, pooling, biases,
bias maps and gathers are not counted. Parameters are weights, biases, BatchNorm affine and a
collapsed ticket's constant logits; a compact model's bias maps (stored constants, one value per
channel and position) are counted apart, as ``bias_map_values``. A masked network counts only its
kept prunable weights, and its FLOPs only the MACs of its kept weights (an ideal sparse kernel; as
run, a masked network costs the dense FLOPs).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from . import models, storage
from .compact import compact
from .errors import ConfigError
from .masking import Mask

NEEDED = ("config.yaml", "summary.json", "mask.pt", "ticket.pt")
CHECK_EXAMPLES = 64


def _macs_per_weight(model: nn.Module, input_shape) -> dict[str, int]:
    """Each Conv2d / Linear layer's output positions per example (a weight's MACs), from one forward."""
    positions: dict[str, int] = {}

    def count(name):
        def hook(module, args, out):
            positions[name] = out[0, 0].numel() if isinstance(module, nn.Conv2d) else 1
        return hook
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [m.register_forward_hook(count(n)) for n, m in layers]
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, *input_shape, device=next(model.parameters()).device))
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    return positions


def cost(model: nn.Module, input_shape, mask: Optional[Mask] = None, positions: Optional[dict] = None) -> dict[str, int]:
    """{"params", "flops", "bias_map_values"} of ``model`` for one example (FLOPs as multiply-
    accumulates, see the module docstring). With ``mask``: only its kept prunable weights count, as
    parameters and as MACs (what an ideal sparse kernel would do; the masked network as run costs
    the dense MACs). ``positions``: ``_macs_per_weight`` of ``model`` when already measured."""
    kept = {} if mask is None else {n.rpartition(".")[0]: int(m.sum()) for n, m in mask.layers.items()}
    positions = positions if positions is not None else _macs_per_weight(model, input_shape)
    modules = dict(model.named_modules())
    macs = sum(kept.get(n, modules[n].weight.numel()) * at for n, at in positions.items())
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    maps = sum(v for n, v in sizes.items() if n.endswith("bias_map"))
    params = sum(sizes.values()) - maps
    if mask is not None:
        params -= sum(m.numel() - int(m.sum()) for m in mask.layers.values())
    return {"params": params, "flops": macs, "bias_map_values": maps}


def costs(model: nn.Module, mask: Mask, input_shape, small: nn.Module) -> dict[str, dict[str, int]]:
    """``cost`` of the dense network, the masked ticket (one forward measures both) and its
    compact model ``small``."""
    positions = _macs_per_weight(model, input_shape)
    return {"dense": cost(model, input_shape, positions=positions),
            "masked": cost(model, input_shape, mask, positions=positions),
            "compact": cost(small, input_shape)}


def ticket_cost(model: nn.Module, mask: Mask, input_shape) -> dict:
    """A ticket's inference cost as flat metrics: {dense,masked,compact}_{params,flops} (FLOPs as
    MACs for one example) and compact_flops_fraction (compact FLOPs / dense FLOPs).
    ``errors.CompactError`` for a family compaction does not handle (the transformers)."""
    c = costs(model, mask, input_shape, compact(model, mask, input_shape)[0])
    out = {f"{kind}_{what}": c[kind][what] for kind in c for what in ("params", "flops")}
    out["compact_flops_fraction"] = out["compact_flops"] / out["dense_flops"]
    return out


def same_logits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float32 reassociation: relative 1e-5, and absolute 1e-5 of the largest logit
    (a logit near zero is a difference of large terms, so its relative error is unbounded)."""
    return bool(torch.allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(b.abs().max()))))


def check_run_dir(run_dir, needed=NEEDED) -> Path:
    """``run_dir`` as a Path once it holds ``needed``; else a one-line ConfigError."""
    run_dir = Path(run_dir)
    for name in needed:
        if not (run_dir / name).is_file():
            raise ConfigError(f"RUN_DIR: {str(run_dir)!r} has no {name}; expected a run folder written by cts-ray run "
                              "(or a sweep's trials/<trial>)")
    return run_dir


def _damaged(path: Path, e: BaseException) -> ConfigError:
    why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    return ConfigError(f"RUN_DIR: {str(path)!r} cannot be read ({type(e).__name__}: {why}); expected the file "
                       "cts-ray wrote (damaged or truncated: run the experiment again)")


def read_summary(run_dir: Path) -> dict:
    """A run folder's summary.json; a damaged one is a one-line ConfigError."""
    path = run_dir / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise _damaged(path, e) from None
    if not isinstance(summary, dict):
        raise _damaged(path, ValueError("not a JSON object"))
    return summary


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    """``model`` with the state dict saved at ``path``; a damaged file, or one of another
    architecture, is a one-line ConfigError naming it."""
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:   # torch raises many kinds here: pickle, zip, EOF
        raise _damaged(path, e) from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        why = " ".join(str(e).split())[:200]
        raise ConfigError(f"RUN_DIR: {str(path)!r} does not fit the model its config.yaml describes ({why}); "
                          "expected the run's own config.yaml and ticket.pt") from None
    return model


def run_config(run_dir: Path):
    """A run folder's resolved config (``config.Config``)."""
    from .config import load as load_config
    return load_config(run_dir / "config.yaml")


def build_ticket_model(cfg, input_shape, num_classes: int, run_dir: Path) -> nn.Module:
    """The one place a saved run's model is rebuilt: from the run's full model config (every
    option: batchnorm, shortcut, classifier bias, stem), then given the ticket's weights."""
    with torch.random.fork_rng(devices=[]):   # its initialisation is replaced by the ticket's weights
        model = models.from_config(cfg.model, tuple(input_shape), num_classes, cfg.data.name)
    return load_weights(model, run_dir / "ticket.pt")


def load_ticket(run_dir) -> tuple[torch.nn.Module, Mask, tuple, dict]:
    """(model with the ticket's weights, mask, input shape, resolved config as a dict) of a run
    folder; the model is rebuilt from the run's full model config (all its options)."""
    run_dir = check_run_dir(run_dir)
    cfg = run_config(run_dir)
    data = read_summary(run_dir).get("data") or {}
    if "input_shape" not in data:   # summary without data provenance: the data set says
        from .data import load as load_data
        d = load_data(cfg.data, "cpu")
        data = {"input_shape": list(d.input_shape), "num_classes": d.num_classes, "mean": list(d.mean),
                "std": list(d.std)}
    shape = tuple(data["input_shape"])
    model = build_ticket_model(cfg, shape, data["num_classes"], run_dir)
    try:
        mask = Mask.load(run_dir / "mask.pt")
    except Exception as e:
        raise _damaged(run_dir / "mask.pt", e) from None
    return model.eval(), mask, shape, {**cfg.to_dict(), "data_provenance": data}


def export_run(run_dir, out=None) -> dict:
    """Write the compact ticket of ``run_dir`` to ``out`` (default RUN_DIR/compact.pt2) and its
    description to ``out`` with suffix .json; returns that description."""
    run_dir = check_run_dir(run_dir)
    out = run_dir / "compact.pt2" if out is None else Path(out)
    if out.is_dir():
        raise ConfigError(f"--out: {str(out)!r} is a folder; expected a file name such as ticket.pt2")
    if not out.parent.is_dir():
        raise ConfigError(f"--out: folder {str(out.parent)!r} does not exist")
    model, mask, shape, cfg = load_ticket(run_dir)
    small, info = compact(model, mask, shape)   # CompactError for the transformers
    example = torch.zeros(2, *shape)
    program = torch.export.export(small, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    with storage.atomic(out) as f:
        torch.export.save(program, f)
    meta = _describe(out, cfg, shape, info, model, mask, small)
    meta["check"] = _check(out, model, mask, shape)
    storage.write_text(out.with_suffix(".json"), json.dumps(meta, indent=1))
    return meta


def _describe(out: Path, cfg: dict, shape: tuple, info: dict, model, mask: Mask, small) -> dict:
    c = costs(model, mask, shape, small)
    data = cfg["data_provenance"]
    return {"artifact": str(out), "format": "torch.export program (torch.export.save); run: "
                                            "torch.export.load(path).module()(x), x of shape (N, C, H, W)",
            "torch": torch.__version__, "model": cfg["model"], "input_shape": list(shape),
            "num_classes": data["num_classes"],
            "input": {"normalised": "(x - mean) / std per channel, as the run's data", "mean": data.get("mean"),
                      "std": data.get("std")},
            "batchnorm": cfg["model"]["batchnorm"], "flops": "multiply-accumulates of the Conv2d and Linear "
                                                             "layers for one example",
            "cost": c, "compact_flops_fraction": c["compact"]["flops"] / c["dense"]["flops"],
            **info}


def _check(out: Path, model, mask: Mask, shape: tuple) -> dict:
    """The saved program against the masked ticket on random inputs; a mismatch is a bug."""
    x = torch.randn(CHECK_EXAMPLES, *shape, generator=torch.Generator().manual_seed(0))
    masked = model.eval()
    mask.apply_(masked)
    with torch.no_grad():
        want, got = masked(x), torch.export.load(out).module()(x)
    if not same_logits(got, want):
        raise RuntimeError(f"export: the compact model's logits differ from the masked ticket's by up to "
                           f"{float((got - want).abs().max()):.3g}; this is a bug in cts_ray/compact.py")
    return {"random_examples": CHECK_EXAMPLES, "max_abs_diff": float((got - want).abs().max()), "same_logits": True}


def summary_lines(meta: dict) -> list[str]:
    """What `cts-ray export` prints."""
    c = meta["cost"]
    lines = [f"compact ticket: {meta['artifact']}  (torch.export program; torch.export.load(path).module()(x))",
             f"parameters dense / masked / compact: {c['dense']['params']:,} / {c['masked']['params']:,} / "
             f"{c['compact']['params']:,}" + (f" (+ {c['compact']['bias_map_values']:,} bias-map values: constants "
                                              "folded where zero padding makes them vary)"
                                              if c["compact"]["bias_map_values"] else ""),
             f"FLOPs (MACs per example) dense / masked / compact: {c['dense']['flops']:,} / {c['masked']['flops']:,} / "
             f"{c['compact']['flops']:,}  ({100 * meta['compact_flops_fraction']:.2f} % of dense)"]
    if meta["collapsed"]:
        lines.append(meta["message"])
    else:
        lines.append("kept units: " + ", ".join(f"{ly['layer']} {ly['kept_outputs']}/{ly['outputs']}"
                                                for ly in meta["layers"] if "outputs" in ly)
                     + f"; input features {meta['input_features']['kept']}/{meta['input_features']['of']}")
    lines.append(f"checked: the saved program gives the masked ticket's logits on {meta['check']['random_examples']} "
                 f"random inputs (max difference {meta['check']['max_abs_diff']:.2g}); description "
                 f"{Path(meta['artifact']).with_suffix('.json')}")
    return lines

