"""Folder data sets streamed from their files: read and decoded by DataLoader worker processes
while the model trains (``data.stream``), for sets too big to hold decoded (ImageNet: ~190 GB).

The order and the augmentation are those of the in-memory path (``data.DeviceData``): one seed
gives the permutation, drawn on CPU exactly as there, so a seed gives the same examples per epoch
in either path, and a resumed run (at an epoch boundary) continues as an uninterrupted one.
Fixed-size images (image folders, Tiny-ImageNet, ImageNet at ``data.image_size``) are decoded to
uint8 in the workers and augmented per batch on the device by the same functions as in memory
(``Batches.finish``). ImageNet at its recipe's 224 px is cropped in the workers, from the whole
image: a random-resized crop and flip per example (its random numbers come from one number per
epoch and the example's index, so they do not depend on the number of workers), or for
evaluation the shorter side resized to 256 and the centre 224 x 224.

Engine (bench/data.py measures it): torch's DataLoader with fork-started worker processes decoding
with PIL; a batch is a list of indices the main process chose, so sharding a global batch across
data-parallel workers is a slice of that list.
"""
from __future__ import annotations

import math
import os
from typing import Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from . import image_folder
from .batches import Batches, test_batch_size
from .errors import DataFileError

RECIPE_SIZE, RESIZE = 224, 256        # ImageNet: train crops and evaluation centre crops (TLAB data/imagenet.py)
RRC_SCALE, RRC_RATIO = (0.1, 1.0), (0.8, 1.25)   # TLAB's ImageNet random-resized crop (torchvision: 0.08)


# ---------------------------------------------------------------- decoding (in the workers)

def _crop_box(w: int, h: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A random-resized crop's box (left, top, right, bottom): 10 tries at an area and aspect drawn
    from RRC_SCALE and RRC_RATIO, then the centre crop of the allowed aspect nearest the image's."""
    lo, hi = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
    for _ in range(10):
        area = w * h * rng.uniform(*RRC_SCALE)
        aspect = math.exp(rng.uniform(lo, hi))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            return left, top, left + cw, top + ch
    aspect = min(max(w / h, RRC_RATIO[0]), RRC_RATIO[1])
    cw, ch = (round(h * aspect), h) if w / h > aspect else (w, round(w / aspect))
    return (w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch


def _recipe(path: str, seed: Optional[int], index: int) -> np.ndarray:
    """ImageNet's 224 px input: the random-resized crop and flip (``seed`` an epoch's number) or the
    evaluation centre crop (``seed`` None). JPEGs are decoded at the smallest DCT scale that keeps
    the needed resolution (PIL's draft), as fast ImageNet loaders do."""
    from PIL import Image
    with Image.open(path) as im:
        w, h = im.size
        if seed is None:
            short = min(w, h)
            im.draft("RGB", (math.ceil(w * RESIZE / short), math.ceil(h * RESIZE / short)))
            im = im.convert("RGB")
            w2, h2 = im.size
            nw, nh = (RESIZE, int(RESIZE * h2 / w2)) if w2 <= h2 else (int(RESIZE * w2 / h2), RESIZE)
            im = im.resize((nw, nh), Image.BILINEAR)
            top, left = int(round((nh - RECIPE_SIZE) / 2)), int(round((nw - RECIPE_SIZE) / 2))
            im = im.crop((left, top, left + RECIPE_SIZE, top + RECIPE_SIZE))
        else:
            rng = np.random.default_rng([seed, index])
            box = _crop_box(w, h, rng)
            im.draft("RGB", (math.ceil(w * RECIPE_SIZE / (box[2] - box[0])),
                             math.ceil(h * RECIPE_SIZE / (box[3] - box[1]))))
            sx, sy = im.size[0] / w, im.size[1] / h   # draft may have scaled the image down
            im = im.convert("RGB").resize((RECIPE_SIZE, RECIPE_SIZE), Image.BILINEAR,
                                          box=(box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy))
            if rng.random() < 0.5:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
        return np.asarray(im, dtype=np.uint8)


class Files(torch.utils.data.Dataset):
    """A split's files; item ``(index, seed)`` -> (uint8 C x H x W, label), or a one-line problem
    (the main process raises it: an exception raised in a worker arrives wrapped in a traceback)."""

    def __init__(self, root: str, paths: list, labels, size: Optional[int], expect):
        self.root, self.paths, self.labels, self.size, self.expect = root, paths, labels, size, expect

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key):
        index, seed = key
        rel = self.paths[index]
        path = os.path.join(self.root, rel)
        if self.size is None and self.expect is None:   # ImageNet's recipe
            try:
                a = _recipe(path, seed, index)
            except (OSError, ValueError, SyntaxError) as e:
                return f"{rel} cannot be decoded ({image_folder.first_line(e)}); expected a readable image"
        else:
            a = image_folder.decode_image(self.root, rel, self.size, self.expect)
            if isinstance(a, str):
                return a
        return torch.from_numpy(np.array(a)).permute(2, 0, 1), int(self.labels[index])   # PIL arrays are read-only


def _checked(batch):
    """A collated batch, or the one-line DataFileError its problem means."""
    if isinstance(batch, str):
        raise DataFileError(f"data.root: {batch}; fix or replace it, then resume (the run's saved epochs are kept)")
    return batch


def _collate(items: list):
    bad = next((i for i in items if isinstance(i, str)), None)
    if bad is not None:
        return bad
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.int64)


# ---------------------------------------------------------------- the data object

class _Keys:
    """A DataLoader batch sampler made as it is read (a list of an ImageNet epoch's keys would
    hold 1.28 M tuples in memory)."""

    def __init__(self, make, length: int):
        self.make, self.length = make, length

    def __iter__(self):
        return iter(self.make())

    def __len__(self) -> int:
        return self.length


def _ranges(n: int, batch_size: int) -> _Keys:
    starts = range(0, n, batch_size)
    return _Keys(lambda: ([(i, None) for i in range(s, min(s + batch_size, n))] for s in starts), len(starts))


def _fixed_mmap_threshold() -> None:
    """glibc raises its mmap threshold each time a large block is freed, so the per-step batch
    buffers come from the heap, which then keeps every freed one: a streamed epoch grew this
    process by ~1 MB a step (bench data). A fixed 1 MB threshold maps them and hands them back."""
    import ctypes
    import ctypes.util
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(-3, 1 << 20)   # M_MMAP_THRESHOLD
    except (OSError, AttributeError):   # not glibc: nothing to fix
        pass


class StreamData(Batches):
    """``Batches`` over files: the listing's paths and labels of both splits (after the subsets),
    decoded as they are used by ``workers`` processes (0: in this process)."""
    streamed = True

    def __init__(self, root: str, train: tuple[list, Tensor], test: tuple[list, Tensor], size: Optional[int],
                 expect, device, workers: int, num_classes: int, input_shape, augment: bool,
                 augmentation: str, mean, std):
        self.root, self.size, self.expect, self.workers = root, size, expect, workers
        (self.train_paths, self.train_y), (self.test_paths, self.test_y) = train, test
        self._device = torch.device(device)
        self.num_classes, self.input_shape, self.augment = num_classes, tuple(input_shape), augment
        self.augmentation, self.mean, self.std = augmentation, tuple(mean), tuple(std)
        self.recipe = size is None and expect is None   # ImageNet's 224 px crops, made in the workers
        _fixed_mmap_threshold()

    n_train = property(lambda self: len(self.train_paths))
    n_test = property(lambda self: len(self.test_paths))
    device = property(lambda self: self._device)

    def _files(self, split: str) -> Files:
        paths, labels = (self.train_paths, self.train_y) if split == "train" else (self.test_paths, self.test_y)
        return Files(self.root, paths, labels, self.size, self.expect)

    def _load(self, split: str, keys: list) -> Iterator[tuple[Tensor, Tensor]]:
        """Decoded batches of ``keys`` (lists of (index, seed)), in order, on the device."""
        files = self._files(split)
        cuda = self._device.type == "cuda"
        loader = torch.utils.data.DataLoader(
            files, batch_sampler=keys, num_workers=self.workers, collate_fn=_collate, pin_memory=cuda,
            prefetch_factor=4 if self.workers else None,
            multiprocessing_context="fork" if self.workers else None)
        for batch in loader:
            x, y = _checked(batch)
            yield x.to(self._device, non_blocking=cuda), y.to(self._device, non_blocking=cuda)

    def train_batches(self, batch_size: int, generator: torch.Generator, augment: Optional[bool] = None,
                      drop_last: bool = True, indices: bool = False, shard=None) -> Iterator[tuple[Tensor, ...]]:
        """One epoch, as ``DeviceData.train_batches``: the same permutation from ``generator``, the
        same augmentation draws after it (per batch on the device, or one number for the workers);
        ``shard``: only this worker's rows of each global batch are read."""
        augment = self.augment if augment is None else augment
        order = torch.randperm(self.n_train, generator=generator)
        seed = int(torch.randint(2 ** 62, (1,), generator=generator)) if augment and self.recipe else None
        steps = self.steps_per_epoch(batch_size, drop_last)
        start, stop = self.shard_of(batch_size, shard) if shard else (0, batch_size)
        wholes = [order[i * batch_size:(i + 1) * batch_size] for i in range(steps)]
        chunks = [w[start:stop] for w in wholes]
        keys = _Keys(lambda: ([(i, seed) for i in chunk.tolist()] for chunk in chunks), steps)
        for whole, idx, (x, y) in zip(wholes, chunks, self._load("train", keys)):
            part = (start, start + len(idx), len(whole)) if shard else None
            x = self.finish(x, generator, augment and not self.recipe, part)
            yield (x, y, idx.to(self._device)) if indices else (x, y)

    def test_batches(self, batch_size: Optional[int] = None, shard=None) -> Iterator[tuple[Tensor, Tensor]]:
        """The test set in order; ``shard``: only this worker's rows of each batch are read."""
        ranges = list(self.test_ranges(batch_size or test_batch_size(self.input_shape), shard))
        keys = _Keys(lambda: ([(i, None) for i in range(s, e)] for s, e in ranges), len(ranges))
        for x, y in self._load("test", keys):
            yield self.finish(x, None, False), y

    def examples(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Training examples ``idx``, not augmented (decoded here, in this process)."""
        files = self._files("train")
        x, y = _checked(_collate([files[(int(i), None)] for i in idx.cpu()]))
        return self.finish(x.to(self._device), None, False), y.to(self._device)

    def in_order(self, batch_size: int) -> Iterator[Tensor]:
        for x, _ in self._load("train", _ranges(self.n_train, batch_size)):
            yield self.finish(x, None, False)
