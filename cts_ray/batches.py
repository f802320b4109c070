"""What the training loop, the searches and evaluation read from a data set (``Batches``), in
memory (``data.DeviceData``) or streamed from files (``stream.StreamData``) alike, and the
augmentations both apply to a batch on its device.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


# ---------------------------------------------------------------- augmentation

def _rows(x: Tensor, part) -> tuple[int, slice]:
    """(how many samples to draw random numbers for, which of them are ``x``'s rows): ``part`` =
    (start, stop, total) when x is rows start:stop of a batch of total (a data-parallel worker's
    shard), so every shard applies what the whole batch would."""
    return (x.shape[0], slice(None)) if part is None else (part[2], slice(part[0], part[1]))


def augment_batch(x: Tensor, generator: torch.Generator, pad: int = 4, part=None) -> Tensor:
    """Random horizontal flip (p=0.5) and reflect-pad-``pad`` random crop, per sample, vectorised.

    The random numbers come from the CPU ``generator`` and are then moved to ``x.device``, so a
    seed gives the same augmentation on CPU and CUDA (``part``: ``_rows``).
    """
    n, _, h, w = x.shape
    drawn, sel = _rows(x, part)
    flip = (torch.rand(drawn, generator=generator)[sel] < 0.5).to(x.device)
    dy, dx = torch.randint(0, 2 * pad + 1, (2, drawn), generator=generator)[:, sel].to(x.device)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect").permute(0, 2, 3, 1)  # (N, H+2p, W+2p, C)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]          # (N, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]          # (N, 1, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded[batch, rows, cols].permute(0, 3, 1, 2).contiguous()             # (N, C, H, W)


def _hsv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """RGB in [0, 1] (N, 3, H, W) -> hue in [0, 1), saturation, value (each (N, H, W))."""
    r, g, b = x.unbind(1)
    v, _ = x.max(1)
    c = v - x.min(1).values
    safe = torch.where(c > 0, c, torch.ones_like(c))
    h = torch.where(v == r, (g - b) / safe, torch.where(v == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    h = torch.where(c > 0, (h / 6) % 1, torch.zeros_like(h))
    return h, torch.where(v > 0, c / torch.where(v > 0, v, torch.ones_like(v)), torch.zeros_like(v)), v


def _rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    k = lambda n: (n + h * 6) % 6
    f = lambda n: v - v * s * (torch.minimum(k(n), 4 - k(n)).clamp(0, 1))
    return torch.stack([f(5), f(3), f(1)], 1)


def augment_colour_crop(x: Tensor, generator: torch.Generator, scale=(0.6, 1.0), ratio=(0.8, 1.25),
                        jitter=(0.4, 0.4, 0.4, 0.1), part=None) -> Tensor:
    """The authors' Tiny-ImageNet augmentation (TLAB data/tiny_imagenet.py) on images in [0, 1]:
    horizontal flip, a random-resized crop back to the input size (area ``scale``, aspect ``ratio``,
    10 tries then the whole image) and colour jitter (brightness, contrast, saturation, hue, in that
    order), per sample, vectorised; random numbers from the CPU ``generator`` as ``augment_batch``."""
    n, c, h, w = x.shape
    drawn, sel = _rows(x, part)
    flip = (torch.rand(drawn, generator=generator) < 0.5)[sel]
    area = torch.empty(drawn, 10).uniform_(*scale, generator=generator)[sel]
    aspect = torch.exp(torch.empty(drawn, 10).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator))[sel]
    cw, ch = torch.round(torch.sqrt(area * aspect) * w), torch.round(torch.sqrt(area / aspect) * h)
    ok = (cw <= w) & (ch <= h)
    first = torch.where(ok.any(1), ok.float().argmax(1), -1)
    pick = lambda t, full: torch.where(first >= 0, t.gather(1, first.clamp(min=0)[:, None])[:, 0], float(full))
    cw, ch = pick(cw, w), pick(ch, h)
    top = torch.floor(torch.rand(drawn, generator=generator)[sel] * (h - ch + 1))
    left = torch.floor(torch.rand(drawn, generator=generator)[sel] * (w - cw + 1))
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = torch.where(flip, -cw / w, cw / w)
    theta[:, 0, 2] = (2 * left + cw) / w - 1
    theta[:, 1, 1] = ch / h
    theta[:, 1, 2] = (2 * top + ch) / h - 1
    grid = F.affine_grid(theta.to(x.device), [n, c, h, w], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    b, k, s = (torch.empty(drawn).uniform_(1 - j, 1 + j, generator=generator)[sel].to(x.device).view(-1, 1, 1, 1)
               for j in jitter[:3])
    hue = torch.empty(drawn).uniform_(-jitter[3], jitter[3], generator=generator)[sel].to(x.device).view(-1, 1, 1)
    x = (x * b).clamp_(0, 1)
    if c != 3:
        return ((x - x.mean((1, 2, 3), keepdim=True)) * k + x.mean((1, 2, 3), keepdim=True)).clamp_(0, 1)
    grey = lambda t: (0.299 * t[:, 0] + 0.587 * t[:, 1] + 0.114 * t[:, 2]).unsqueeze(1)
    m = grey(x).mean((1, 2, 3), keepdim=True)
    x = (k * x + (1 - k) * m).clamp_(0, 1)
    x = (s * x + (1 - s) * grey(x)).clamp_(0, 1)
    hh, ss, vv = _hsv(x)
    return _rgb((hh + hue) % 1, ss, vv)


AUGMENTATIONS = {"crop_flip": augment_batch, "colour_crop": augment_colour_crop}


def test_batch_size(input_shape) -> int:
    """Evaluation batch size, one rule for both paths (BatchNorm on batch statistics depends on it):
    1000 images up to 64 px, 250 above (a 224 px batch of 1000 is 600 MB)."""
    return 1000 if max(input_shape[1:]) <= 64 else 250


# ---------------------------------------------------------------- device data

class Batches:
    """What the training loop, the searches and evaluation read, for data in memory (``DeviceData``)
    and streamed from files (``stream.StreamData``) alike. Subclasses set n_train, n_test, device,
    num_classes, input_shape, augment, augmentation, mean and std."""
    streamed = False

    def steps_per_epoch(self, batch_size: int, drop_last: bool = True) -> int:
        full = self.n_train // batch_size
        return full if drop_last and full > 0 else -(-self.n_train // batch_size)

    def finish(self, x: Tensor, generator: Optional[torch.Generator], augment: bool, part=None) -> Tensor:
        """A batch as the model takes it. uint8 pixels (streamed, or kept raw in memory) are scaled,
        augmented and then normalised; float ones are normalised already. Flips and crops move pixels
        only, so either order gives the same tensor. ``part``: x is a shard (``_rows``)."""
        raw = x.dtype == torch.uint8
        if raw:
            x = x.float().div_(255)
        if augment:
            x = AUGMENTATIONS[self.augmentation](x, generator, part=part)
        if raw:
            mean, std = self._norm(x.device)
            x = (x - mean) / std
        return x

    def _norm(self, device) -> tuple[Tensor, Tensor]:
        """mean and std as (C, 1, 1) tensors on ``device``, made once: not a host-to-device copy a step."""
        cached = getattr(self, "_norms", {})
        if device not in cached:
            cached[device] = tuple(torch.tensor(v, device=device).view(-1, 1, 1) for v in (self.mean, self.std))
            self._norms = cached
        return cached[device]

    @staticmethod
    def shard_of(batch_size: int, shard) -> tuple[int, int]:
        """Rows [start, stop) of every global batch that data-parallel worker ``shard`` = (rank,
        world) takes: contiguous, equal parts, so a global batch holds the same examples whatever
        the number of workers."""
        rank, world = shard
        if batch_size % world:
            raise ValueError(f"training.batch_size {batch_size} is not a multiple of the {world} workers")
        part = batch_size // world
        return rank * part, (rank + 1) * part

    def test_ranges(self, batch_size: int, shard=None) -> Iterator[tuple[int, int]]:
        """Rows [start, stop) of each test batch of ``batch_size`` that worker ``shard`` = (rank,
        world) evaluates: near-equal contiguous parts (a test batch need not divide), empty ones
        skipped (evaluation's only collective is the sum after the last batch)."""
        for i in range(0, self.n_test, batch_size):
            stop = min(i + batch_size, self.n_test)
            if shard is None:
                yield i, stop
                continue
            rank, world = shard
            start, end = i + (stop - i) * rank // world, i + (stop - i) * (rank + 1) // world
            if end > start:
                yield start, end

    def in_order(self, batch_size: int) -> Iterator[Tensor]:
        """Every training example once, in index order, not augmented (the CTS teacher's pass)."""
        for i in range(0, self.n_train, batch_size):
            yield self.examples(torch.arange(i, min(i + batch_size, self.n_train)))[0]
