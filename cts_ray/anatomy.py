"""Ticket anatomy: which kept weights lie on at least one path from the input to the output.

A kept weight w: i → j is *effective* when its input unit i is reachable from the input through
kept weights and its output unit j reaches the output through kept weights (Vysogorets & Kempe
2023's effective sparsity; a layer with none is Tanaka et al. 2020's layer collapse). Both halves
come from one forward and one backward pass through a copy of the model that computes
reachability instead of values: prunable weights replaced by the 0/1 mask, other weights by ones,
biases zero, normalisation and dropout as identities, max-pooling as average pooling (a pooled
unit is connected to its whole window, whichever input wins), and every activation replaced by a
0/1 step whose backward pass is a 0/1 step too. An all-ones input then makes each unit 1 iff
reachable, the summed output's gradient is 1 iff a unit reaches the output, and a weight's
gradient (input activation × output gradient) is > 0 iff it is on a path. Additions (residual
shortcuts) pass reachability in both directions. Values stay small integers (or positive
fractions after pooling) whatever the depth, so float32 is exact about what matters: > 0.

Attention (nn.MultiheadAttention, torchvision's Swin): reachability runs with uniform attention
(q = k = 0), so v carries what reaches where; a kept q or k weight counts as effective when its
input unit is reachable and its head has an effective v weight. Weights that reach the output only
through q or k (the softmax passes no reachability gradient) count as ineffective: an under-count,
visible only near layer collapse.

Convolutions are exact per position: a kernel tap that only ever meets zero padding (a 3×3
kernel on a 1×1 map) is on no path, even in a dense mask.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .masking import Mask
from .models import prunable_names

# LayerNorm is a step too: in a transformer it is the only thing between residual additions, and as
# an identity the values there grow ~200x a block until attention's q·k overflows (NaN)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LayerNorm)
_PASS_THROUGH = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.Dropout)


class _Step(torch.autograd.Function):
    """Reachability of a unit: forward 1[x > 0]; backward 1[grad > 0] (no growth with depth)."""

    @staticmethod
    def forward(ctx, x):
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return (grad > 0).to(grad.dtype)


class _StepModule(nn.Module):
    def forward(self, x):
        return _Step.apply(x)


def reachability_net(model: nn.Module) -> nn.Module:
    net = copy.deepcopy(model).cpu().float()
    for parent in list(net.modules()):
        for name, child in parent.named_children():
            if isinstance(child, _ACTIVATIONS):
                setattr(parent, name, _StepModule())
            elif isinstance(child, _PASS_THROUGH):
                setattr(parent, name, nn.Identity())
            elif isinstance(child, nn.MaxPool2d):
                setattr(parent, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding,
                                                   ceil_mode=child.ceil_mode))
            elif isinstance(child, nn.AdaptiveMaxPool2d):
                setattr(parent, name, nn.AdaptiveAvgPool2d(child.output_size))
    return net.train(False)


@dataclass
class Anatomy:
    """The effective part of a mask: ``effective`` ⊆ ``mask``, layer by layer."""
    mask: Mask
    effective: Mask

    @property
    def effective_kept(self) -> int:
        return self.effective.kept

    @property
    def effective_density(self) -> float:
        """Effective kept weights / prunable weights."""
        return self.effective.kept / self.mask.numel

    @property
    def collapsed_layers(self) -> list[str]:
        """Prunable layers without one effective weight: the ticket is disconnected."""
        return [n for n, m in self.effective.layers.items() if not m.any()]

    def alive_units(self, layer: str) -> int:
        """Output units (channels) of ``layer`` with at least one effective incoming weight."""
        m = self.effective.layers[layer]
        return int(m.reshape(m.shape[0], -1).any(1).sum())

    def summary(self) -> dict:
        return {"effective_density": self.effective_density, "effective_kept": self.effective_kept,
                "collapsed_layers": self.collapsed_layers}

    def report(self) -> list[dict]:
        """``Mask.report()`` rows with the layer's units, effective_kept and alive_units (the
        `total` row sums them)."""
        rows = self.mask.report()
        for r in rows[:-1]:
            r.update(units=self.mask.layers[r["layer"]].shape[0],
                     effective_kept=int(self.effective.layers[r["layer"]].sum()),
                     alive_units=self.alive_units(r["layer"]))
        rows[-1].update({k: sum(r[k] for r in rows[:-1]) for k in ("units", "effective_kept", "alive_units")})
        return rows


def anatomy(model: nn.Module, mask: Mask, input_shape) -> Anatomy:
    """The kept weights of ``mask`` that lie on an input→output path of ``model`` (any registered
    model; only its structure is used, not its weights). ``input_shape``: (C, H, W) of one example."""
    names = prunable_names(model)
    if set(names) != set(mask.layers):
        raise ValueError(f"mask and model disagree on prunable layers: {sorted(set(names) ^ set(mask.layers))}")
    net = reachability_net(model)
    chosen = set(names)
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.requires_grad_(n in chosen)
            if n in chosen:
                p.copy_(mask.layers[n])
            else:   # biases carry no path; weights that are never pruned are all there
                p.fill_(0.0 if n.rpartition(".")[2] == "bias" else 1.0)
        fused = [(n, h) for n, h in _fused_qkv(model) if n in chosen]
        params = dict(net.named_parameters())
        for n, _ in fused:   # q = k = 0: uniform attention, so what reaches where does not hinge on q·k
            params[n][: 2 * params[n].shape[0] // 3] = 0
    with torch.enable_grad():
        out = net(torch.ones(1, *input_shape))
        out.sum().backward()
    effective = {n: mask.layers[n].cpu() & (params[n].grad > 0) for n in mask.layers}
    for name, heads in fused:
        effective[name] = _attention_qk(mask.layers[name].cpu(), params[name].grad, effective[name], heads)
    return Anatomy(mask, Mask(effective))


def _fused_qkv(model: nn.Module) -> list[tuple[str, int]]:
    """(weight name, heads) of each fused q/k/v projection: nn.MultiheadAttention's in_proj_weight,
    a Linear named ``qkv`` in a module with ``num_heads`` (torchvision's Swin)."""
    out = []
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
            out.append((f"{prefix}in_proj_weight", m.num_heads))
        elif isinstance(getattr(m, "qkv", None), nn.Linear) and hasattr(m, "num_heads"):
            out.append((f"{prefix}qkv.weight", m.num_heads))
    return out


def _attention_qk(mask: torch.Tensor, grad: torch.Tensor, effective: torch.Tensor, heads: int) -> torch.Tensor:
    """Effective q and k rows of a fused [q; k; v] weight. Attention is made uniform (q = k = 0, and
    on the all-ones input tokens are alike anyway), so the softmax passes no gradient to q or k. A
    kept q/k weight is taken as on a path when its input unit is reachable (some v weight from that
    input has a gradient) and its head carries signal (the head has an effective v weight)."""
    q, k, v = mask.chunk(3)
    reachable_in = (grad.chunk(3)[2] > 0).any(0)
    head_alive = effective.chunk(3)[2].reshape(heads, -1).any(1)
    alive_rows = head_alive.repeat_interleave(q.shape[0] // heads)[:, None]
    qk = torch.cat([q, k]) & reachable_in[None, :] & torch.cat([alive_rows, alive_rows])
    return torch.cat([qk, effective.chunk(3)[2]])
