"""Compact a ticket into a smaller dense network that computes the same function (issue 27).

A unit (a Linear's output, a conv channel, a flattened feature) is *kept* when it is reachable
from the input and reaches the output through kept weights: anatomy's reachability network
(``anatomy.reachability_net``), read per unit at each point of a ``Plan``. Everything else is
either constant (no input reaches it: its bias and BatchNorm shift through the activation) or
irrelevant (it reaches no output). The compact model keeps the kept units only:

- each Conv2d / Linear keeps the rows of its kept outputs and the columns of its kept inputs; a
  Linear after a flatten (and an MLP's first layer) gathers the input features it reads;
- what dropped inputs still contribute is input-independent, so it is computed once from the masked
  model on a zero input and added to the layer's bias: per channel when it is spatially uniform, as
  a bias map when zero padding makes it vary at the borders (a constant channel into a padded conv);
- a residual stream is one channel group: a channel of it is kept when kept at any point of the
  stream (any block that reads or writes it), so identity shortcuts still add like to like;
- a layer with no kept input becomes its constant output; a ticket whose classifier reads nothing
  kept (no input→output path) exports to its constant logits.

Unit reachability is read per channel, not per position: a kept channel is reachable at some
position and reaches the output at some position. This keeps a superset of anatomy's alive units
in rare convolution corner cases, never a unit the function needs, and stays exact with BatchNorm
on batch statistics (whose mean and variance couple a channel's positions).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import models
from .anatomy import reachability_net
from .errors import CompactError
from .masking import Mask

INPUT = ""   # the model's input, as a point and as a channel group
_BatchNorm = nn.modules.batchnorm._BatchNorm
_ELEMENTWISE = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Dropout, nn.Identity)


@dataclass(frozen=True)
class Layer:
    name: str                 # a Conv2d or Linear
    src: str                  # the channel group or flatten point it reads
    dst: Optional[str]        # the channel group it writes; None: the classifier (every output kept)


@dataclass
class Plan:
    """Where channel sets must agree: ``groups`` unite the kept channels of their points (module
    outputs, ``INPUT``); ``features`` maps a flatten's point to the group its features come from."""
    groups: dict[str, list[str]] = field(default_factory=lambda: {INPUT: [INPUT]})
    features: dict[str, str] = field(default_factory=dict)
    layers: list[Layer] = field(default_factory=list)
    norms: list[tuple[str, str]] = field(default_factory=list)   # (BatchNorm, the group it normalises)

    def layer(self, name: str, src: str, dst: Optional[str]) -> None:
        self.layers.append(Layer(name, src, dst))
        if dst is not None and dst not in self.groups:
            self.groups[dst] = [dst]


# ------------------------------------------------------------------ plans per family

def plan(model: nn.Module) -> Plan:
    """The ``Plan`` of a registered model family; ``CompactError`` for the others."""
    if type(model).__name__ in ("VisionTransformer", "SwinTransformer"):   # torchvision's (models.vit_tiny, swin_t)
        raise CompactError(f"{type(model).__name__}: transformers are not compacted (attention mixes units across "
                           "heads and tokens, and a LayerNorm couples every unit of a token)")
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros"):
            raise CompactError("only convolutions with groups=1 and zero padding are compacted")
    if isinstance(model, nn.Sequential):
        return _sequential_plan(model)
    if isinstance(model, models.ResNet):
        return _resnet_plan(model)
    if isinstance(model, models.WideResNet):
        return _wide_resnet_plan(model)
    raise CompactError(f"{type(model).__name__}: no compaction plan for this model family")


def _sequential_plan(model: nn.Sequential) -> Plan:
    p, src = Plan(), INPUT
    for name, m in model.named_children():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            p.layer(name, src, name)
            src = name
        elif isinstance(m, _BatchNorm):
            p.norms.append((name, src))
        elif isinstance(m, nn.Flatten):
            p.features[name] = src
            src = name
        elif not isinstance(m, _ELEMENTWISE):
            raise CompactError(f"{type(m).__name__} at {name!r}: not a layer compaction understands")
    last = p.layers.pop()
    del p.groups[last.name]
    p.layer(last.name, last.src, None)
    return p


def _resnet_plan(model: models.ResNet) -> Plan:
    """Post-activation blocks, basic (two convs) or bottleneck (three): a stream group runs from the
    stem (or a shortcut conv) through every block with an identity shortcut; each block's last conv
    writes it. The ImageNet stem's max-pool acts per channel, so it changes no group."""
    p = Plan()
    p.layer("stem.0", INPUT, "stem")
    p.norms.append(("stem.1", "stem"))
    stream = "stem"
    for i, block in enumerate(model.blocks):
        b = f"blocks.{i}"
        p.layer(f"{b}.conv1", stream, f"{b}.conv1")
        p.norms.append((f"{b}.bn1", f"{b}.conv1"))
        if len(block.shortcut):
            p.layer(f"{b}.shortcut.0", stream, b)
            p.norms.append((f"{b}.shortcut.1", b))
            stream = b
        else:
            p.groups[stream].append(b)
        last = 3 if isinstance(block, models.Bottleneck) else 2
        for j in range(2, last + 1):
            dst = stream if j == last else f"{b}.conv{j}"
            p.layer(f"{b}.conv{j}", f"{b}.conv{j - 1}", dst)
            p.norms.append((f"{b}.bn{j}", dst))
    p.features["pool"] = stream
    p.layer("fc", "pool", None)
    return p


def _wide_resnet_plan(model: models.WideResNet) -> Plan:
    """Pre-activation blocks: bn1 and the shortcut conv read the stream, the head's BN its end."""
    p = Plan()
    p.layer("stem", INPUT, "stem")
    stream = "stem"
    for i, block in enumerate(model.blocks):
        b = f"blocks.{i}"
        p.norms.append((f"{b}.bn1", stream))
        p.layer(f"{b}.conv1", stream, f"{b}.conv1")
        p.norms.append((f"{b}.bn2", f"{b}.conv1"))
        if block.shortcut is not None:
            p.layer(f"{b}.shortcut", stream, b)
            stream = b
        else:
            p.groups[stream].append(b)
        p.layer(f"{b}.conv2", f"{b}.conv1", stream)
    p.norms.append(("head.0", stream))
    p.features["head"] = stream
    p.layer("fc", "head", None)
    return p


# ------------------------------------------------------------------ which units are kept

def _channels(t: Tensor) -> Tensor:
    """Per index of dim 1: any entry > 0 (over the batch and positions)."""
    return (t > 0).transpose(0, 1).reshape(t.shape[1], -1).any(1)


def _reach(model: nn.Module, mask: Mask, input_shape, points: set[str]) -> dict[str, Tensor]:
    """Per point, per unit: reachable from the input and reaching the output (see the docstring)."""
    net = reachability_net(model)
    chosen = set(mask.layers)
    with torch.no_grad():   # as anatomy: prunable weights = mask, other weights ones, biases zero
        for n, prm in net.named_parameters():
            prm.requires_grad_(False)
            prm.copy_(mask.layers[n] if n in chosen else torch.full_like(prm, float(n.rpartition(".")[2] != "bias")))
    seen: dict[str, Tensor] = {}

    def keep(name):
        def hook(module, args, out):
            out.retain_grad()
            seen[name] = out
        return hook
    handles = [net.get_submodule(n).register_forward_hook(keep(n)) for n in points - {INPUT}]
    x = torch.ones(1, *input_shape, requires_grad=True)
    seen[INPUT] = x
    try:
        with torch.enable_grad():
            net(x).sum().backward()
    finally:
        for h in handles:
            h.remove()
    return {n: _channels(t.detach()) & _channels(t.grad) for n, t in seen.items()}


def kept_units(p: Plan, model: nn.Module, mask: Mask, input_shape) -> dict[str, Tensor]:
    """Bool per unit of every group and flatten point of ``p``: what the compact model keeps."""
    points = {pt for pts in p.groups.values() for pt in pts} | set(p.features)
    at = _reach(model, mask, input_shape, points)
    kept = {g: torch.stack([at[pt] for pt in pts]).any(0) for g, pts in p.groups.items()}
    for point, parent in p.features.items():
        hw = at[point].numel() // kept[parent].numel()
        kept[point] = at[point] & _present(kept, parent).repeat_interleave(hw)
    return kept


def _present(kept: dict[str, Tensor], group: str) -> Tensor:
    """The channels of ``group`` the compact model computes (the raw input has all of them)."""
    return torch.ones_like(kept[group]) if group == INPUT else kept[group]


def _inputs(p: Plan, kept: dict[str, Tensor], src: str) -> tuple[Tensor, Optional[Tensor]]:
    """(the original inputs a layer keeps, the indices gathering them from the compact tensor it
    receives, or None when that tensor is exactly them)."""
    keep = kept[src]
    if src in p.features:
        present = _present(kept, p.features[src])
        present = present.repeat_interleave(keep.numel() // present.numel())
        index, size = (present.cumsum(0) - 1)[keep], int(present.sum())
    else:
        index = keep.nonzero().squeeze(1)
        size = keep.numel() if src == INPUT else len(index)
        index = index if src == INPUT else torch.arange(len(index))
    return keep, (None if len(index) == size else index)


# ------------------------------------------------------------------ compact modules

class GatherLinear(nn.Linear):
    """A Linear on the gathered features it reads (``index`` None: all), plus its folded bias."""

    def __init__(self, weight: Tensor, bias: Tensor, index: Optional[Tensor]):
        super().__init__(weight.shape[1], weight.shape[0], device="meta")   # meta: no RNG drawn, no init
        self.weight, self.bias = nn.Parameter(weight.clone()), nn.Parameter(bias.clone())
        self.register_buffer("index", index)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x if self.index is None else x.index_select(1, self.index))


class GatherConv2d(nn.Conv2d):
    """A Conv2d on the gathered channels it reads, plus a bias map where a folded constant varies
    over positions (zero padding around a constant channel)."""

    def __init__(self, like: nn.Conv2d, weight: Tensor, bias: Tensor, index: Optional[Tensor],
                 bias_map: Optional[Tensor]):
        super().__init__(weight.shape[1], weight.shape[0], like.kernel_size, like.stride, like.padding,
                         like.dilation, device="meta")
        self.weight, self.bias = nn.Parameter(weight.clone()), nn.Parameter(bias.clone())
        self.register_buffer("index", index)
        self.bias_map = None if bias_map is None else nn.Parameter(bias_map.clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x if self.index is None else x.index_select(1, self.index))
        return y if self.bias_map is None else y.add_(self.bias_map)   # in place: conv's backward needs no y


class Constant(nn.Module):
    """A layer (or a whole collapsed ticket) whose output no input reaches: its value, per example."""

    def __init__(self, value: Tensor):
        super().__init__()
        self.value = nn.Parameter(value.clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.value.expand(x.shape[0], *self.value.shape)


# ------------------------------------------------------------------ compaction

def _masked_copy(model: nn.Module, mask: Mask) -> nn.Module:
    net = copy.deepcopy(model).cpu().float().eval()
    params = dict(net.named_parameters())
    with torch.no_grad():
        for n, m in mask.layers.items():
            params[n].mul_(m.to(params[n].dtype).cpu())
    return net.requires_grad_(False)


def _layer_inputs(net: nn.Module, layers: list[Layer], input_shape) -> tuple[dict[str, Tensor], Tensor]:
    """Each layer's input and the logits of the masked model on a zero input (two examples: BatchNorm
    on batch statistics needs more than one value per channel)."""
    seen: dict[str, Tensor] = {}
    handles = [net.get_submodule(ly.name).register_forward_pre_hook(
        lambda m, args, n=ly.name: seen.__setitem__(n, args[0])) for ly in layers]
    try:
        with torch.no_grad():
            logits = net(torch.zeros(2, *input_shape))
    finally:
        for h in handles:
            h.remove()
    return seen, logits[0]


def _apply(module: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    if isinstance(module, nn.Conv2d):
        return F.conv2d(x, weight, None, module.stride, module.padding, module.dilation)
    return F.linear(x, weight)


def _compact_layer(module: nn.Module, x: Tensor, keep: Tensor, index: Optional[Tensor], rows: Tensor) -> nn.Module:
    """``module`` (masked) on its kept inputs and ``rows``; what its dropped inputs contribute on
    ``x`` (constants, or zero through masked weights into the rows that matter) is folded in."""
    if len(rows) == 0:
        return nn.Identity()   # its only readers read nothing kept of it: they are Constants
    weight = module.weight[rows]
    bias = module.bias[rows] if module.bias is not None else weight.new_zeros(len(rows))
    dropped = x[:1] * (~keep).to(x.dtype).reshape(1, -1, *[1] * (x.dim() - 2))
    folded = _apply(module, dropped, weight)[0]
    if not keep.any():
        return Constant(folded + bias.reshape(-1, *[1] * (folded.dim() - 1)))
    weight = weight[:, keep]
    if isinstance(module, nn.Linear):
        return GatherLinear(weight, bias + folded, index)
    uniform = bool((folded == folded[:, :1, :1]).all())
    return GatherConv2d(module, weight, bias + folded[:, 0, 0] if uniform else bias, index,
                        None if uniform else folded)


def _sliced_norm(bn: _BatchNorm, idx: Tensor) -> nn.Module:
    if len(idx) == 0:
        return nn.Identity()
    out = type(bn)(len(idx), bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    state = {k: (v if v.dim() == 0 else v[idx]) for k, v in bn.state_dict().items()}
    out.load_state_dict(state)
    return out


def _replace(net: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent), child, module)


def compact(model: nn.Module, mask: Mask, input_shape) -> tuple[nn.Module, dict]:
    """A dense model computing what ``model`` under ``mask`` computes, on the CPU in float32, in
    evaluation mode, and what was kept (see the module docstring). ``input_shape``: (C, H, W)."""
    p = plan(model)
    net = _masked_copy(model, mask)
    kept = kept_units(p, model, mask, input_shape)
    inputs, logits = _layer_inputs(net, p.layers, input_shape)
    if not kept[p.layers[-1].src].any():
        return Constant(logits), _info(p, kept, collapsed=True)
    for ly in p.layers:
        keep, index = _inputs(p, kept, ly.src)
        module = net.get_submodule(ly.name)
        rows = torch.arange(module.weight.shape[0]) if ly.dst is None else kept[ly.dst].nonzero().squeeze(1)
        _replace(net, ly.name, _compact_layer(module, inputs[ly.name], keep, index, rows))
    for name, group in p.norms:
        _replace(net, name, _sliced_norm(net.get_submodule(name), kept[group].nonzero().squeeze(1)))
    return net.eval(), _info(p, kept, collapsed=False)


def _info(p: Plan, kept: dict[str, Tensor], collapsed: bool) -> dict:
    """What was kept: per layer its kept outputs and inputs (of how many), and the collapse line."""
    layers = []
    for ly in p.layers:
        out = kept.get(ly.dst) if ly.dst is not None else None
        layers.append({"layer": ly.name, "kept_inputs": int(kept[ly.src].sum()), "inputs": kept[ly.src].numel(),
                       **({} if out is None else {"kept_outputs": int(out.sum()), "outputs": out.numel()})})
    first = p.layers[0].src
    return {"collapsed": collapsed, "layers": layers,
            "input_features": {"kept": int(kept[first].sum()), "of": kept[first].numel()},
            "message": ("collapsed: no kept weight lies on an input→output path; the compact model "
                        "returns the ticket's constant logits") if collapsed else None}

