"""One masking mechanism for every method: binary masks over the prunable weights.

Retraining keeps masked weights at exactly zero in place: gradients are masked before the
optimiser step and weights after it. The forward pass is then the ordinary dense forward, so no
masked copy of the weights is made per step. With zero gradient and zero weight, SGD's momentum
and weight decay and Adam's moments stay zero for masked entries; re-masking after the step
makes that exact whatever the optimiser does.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .models import prunable
from .storage import save_torch


def kept_count(density: float, total: int) -> int:
    """⌊κd⌉: the number of weights a global budget keeps (at least one)."""
    return max(1, min(total, int(round(density * total))))


def top_k_flat(scores: Tensor, k: int) -> Tensor:
    """The k highest of a flat vector as a bool vector, ties to the lower index: what a stable
    descending sort keeps, found by selection (one kthvalue, no sort of d entries)."""
    n = scores.numel()
    if k <= 0 or k >= n or torch.isnan(scores).any():   # NaN sorts first; leave that to the sort
        flat = torch.zeros(n, dtype=torch.bool, device=scores.device)
        flat[torch.sort(scores, descending=True, stable=True).indices[:k]] = True
        return flat
    t = torch.kthvalue(scores, n - k + 1).values     # the k-th highest value
    flat = scores > t
    ties = (scores == t).nonzero().squeeze(1)
    flat[ties[:k - int(flat.sum())]] = True
    return flat


@dataclass
class Mask:
    """Ordered layer name -> bool tensor shaped like the weight."""
    layers: dict[str, Tensor]

    # ---- construction
    @classmethod
    def from_flat(cls, flat: Tensor, shapes: dict[str, torch.Size]) -> "Mask":
        out, i = {}, 0
        for n, s in shapes.items():
            k = s.numel()
            out[n] = flat[i:i + k].view(s).bool()
            i += k
        assert i == flat.numel(), "flat mask does not match the layer shapes"
        return cls(out)

    @classmethod
    def top_k(cls, scores: Tensor, k: int, shapes: dict[str, torch.Size]) -> "Mask":
        """Keep the k highest scores of a flat vector; ties go to the lower index (stable sort)."""
        return cls.from_flat(top_k_flat(scores.detach().float().cpu(), k), shapes)

    @classmethod
    def top_k_per_layer(cls, scores: Tensor, counts: dict[str, int], shapes: dict[str, torch.Size]) -> "Mask":
        """Keep ``counts[layer]`` highest scores within each layer of a flat vector (same ties)."""
        out, i = {}, 0
        for n, s in shapes.items():
            out[n] = cls.top_k(scores[i:i + s.numel()], counts[n], {n: s}).layers[n]
            i += s.numel()
        return cls(out)

    # ---- queries
    def flat(self) -> Tensor:
        return torch.cat([m.reshape(-1) for m in self.layers.values()])

    @property
    def numel(self) -> int:
        return sum(m.numel() for m in self.layers.values())

    @property
    def kept(self) -> int:
        return int(sum(int(m.sum()) for m in self.layers.values()))

    @property
    def density(self) -> float:
        return self.kept / self.numel

    def report(self) -> list[dict]:
        """Per-layer numel, kept and density, then a `total` row."""
        rows = [{"layer": n, "shape": list(m.shape), "numel": m.numel(), "kept": int(m.sum()),
                 "density": float(m.sum()) / m.numel()} for n, m in self.layers.items()]
        rows.append({"layer": "total", "shape": [], "numel": self.numel, "kept": self.kept,
                     "density": self.density})
        return rows

    def sha256(self) -> str:
        h = hashlib.sha256()
        for n, m in self.layers.items():
            h.update(n.encode())
            h.update(str(tuple(m.shape)).encode())
            h.update(m.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def apply_(self, model: nn.Module) -> None:
        """Zero the masked weights of ``model`` in place."""
        MaskedParams(self, model).weights_()

    # ---- storage
    def save(self, path) -> None:
        save_torch({n: m.cpu() for n, m in self.layers.items()}, path)

    @classmethod
    def load(cls, path) -> "Mask":
        return cls({n: m.bool() for n, m in torch.load(path, weights_only=True).items()})


class MaskedParams:
    """Masks prepared once for one model on one device, for use inside a training loop."""

    def __init__(self, mask: Mask, model: nn.Module):
        params = prunable(model)
        missing = set(mask.layers) ^ set(params)
        if missing:
            raise ValueError(f"mask and model disagree on prunable layers: {sorted(missing)}")
        self.pairs = [(params[n], m.to(device=params[n].device, dtype=params[n].dtype))
                      for n, m in mask.layers.items()]

    @torch.no_grad()
    def weights_(self) -> None:
        for p, m in self.pairs:
            p.mul_(m)

    @torch.no_grad()
    def grads_(self) -> None:
        for p, m in self.pairs:
            if p.grad is not None:
                p.grad.mul_(m)


def layer_shapes(model: nn.Module) -> dict[str, torch.Size]:
    return {n: p.shape for n, p in prunable(model).items()}
