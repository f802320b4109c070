"""Data sets loaded once into tensors on the compute device (airbench style).

``DATASETS`` (``datasets.py``, torch-free) maps a name to a ``DatasetInfo`` whose
``loader(root, download)`` calls one of the readers below, which return CPU tensors (x float32 in
[0, 1], shape (N, C, H, W); y int64). ``load(cfg, device)`` reads them (cached per process), takes
the configured subsets, moves them to the device and normalises them there.
``DeviceData.train_batches`` shuffles with a seeded CPU generator and augments on the device, so a
seed gives the same batches on CPU and CUDA. No DataLoader, no worker processes, no PIL.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .datasets import DATASETS, IdxFile, mnist_check, mnist_files
from .errors import ConfigError


# ---------------------------------------------------------------- loaders (CPU tensors)

def read_digits(root=None, download=False):
    """scikit-learn's 8x8 digits, values 0..16; a fixed stratified split (360 test), seed 0."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).div_(16).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(torch.arange(len(y)).numpy(), test_size=360,
                                           random_state=0, stratify=d.target)
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def _read_idx(idx: IdxFile) -> Tensor:
    """The data of a file ``mnist_check`` validated, as a uint8 tensor of its shape."""
    try:
        data = gzip.decompress(idx.path.read_bytes()) if idx.gz else idx.path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:   # e.g. a CRC error: damaged inside, not cut short
        raise ConfigError(f"data.root: {idx.path} is damaged ({type(e).__name__}: {e})") from None
    if len(data) != idx.size:   # changed since it was checked
        raise ConfigError(f"data.root: {idx.path} holds {len(data)} bytes; its header announces {idx.size}")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=idx.offset).view(*idx.shape)


def read_mnist(cls_name: str, root, download=False):
    """MNIST, FashionMNIST, KMNIST: uint8 N x 28 x 28 images and labels, read from the IDX files
    (extracted or gzipped) in torchvision's layout, without writing anything (the folder may be
    a read-only shared copy). ``download`` lets torchvision fetch missing files first."""
    if download and any(not any(p.is_file() for p in c) for c in mnist_files(cls_name)(Path(root))):
        import torchvision.datasets as tvd
        getattr(tvd, cls_name)(root, train=True, download=True)
    x_tr, y_tr, x_te, y_te = (_read_idx(f) for f in mnist_check(cls_name, root))
    x = lambda d: d.to(torch.float32).div_(255).unsqueeze(1)
    return x(x_tr), y_tr.long(), x(x_te), y_te.long()


def read_cifar(cls_name: str, root, download=False):
    """CIFAR-10/100: torchvision's ``.data`` (uint8 N x 32 x 32 x 3 numpy) and ``.targets``."""
    import torchvision.datasets as tvd
    cls = getattr(tvd, cls_name)
    tr, te = cls(root, train=True, download=download), cls(root, train=False, download=download)
    x = lambda d: torch.from_numpy(d).permute(0, 3, 1, 2).to(torch.float32).div_(255).contiguous()
    y = lambda t: torch.tensor(t, dtype=torch.int64)
    return x(tr.data), y(tr.targets), x(te.data), y(te.targets)


@functools.lru_cache(maxsize=None)
def _load_cpu(name: str, root: Optional[str], download: bool):
    """The loader's CPU tensors, read from disk once per process. Callers must not modify them."""
    info = DATASETS[name]
    if not info.needs_root:
        return info.loader(None, False)
    if root is None:
        raise ConfigError(f"data.root: None; {name} needs the folder holding its data in torchvision's layout")
    try:
        return info.loader(root, download)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
        why = (str(e).strip().splitlines() or [""])[0]
        hint = "" if download else " or set data.download: true"
        raise ConfigError(f"data.root: {root!r} has no {name} data in torchvision's layout; point it at the "
                          f"folder torchvision downloads into{hint} ({type(e).__name__}: {why})") from None


@functools.lru_cache(maxsize=None)
def _digest(name: str, root: Optional[str], download: bool, image_size: Optional[int] = None) -> str:
    """A content digest of the data set as loaded (every tensor's bytes), once per process."""
    if name == "image_folder":
        from . import image_folder
        f = image_folder.load(root, image_size)
        tensors = (f.train_x, f.train_y, f.test_x, f.test_y)
    else:
        tensors = _load_cpu(name, root, download)
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().numpy().data)
    return h.hexdigest()[:16]


def provenance(cfg, data: "DeviceData") -> dict:
    """What a run's data was (``cfg`` a ``DataConfig``): name, source, content digest, split sizes as
    used (after subsets), input shape, classes, the channel mean/std it was normalised with and,
    where the data set has them, per-file notes (an md5 differing from the official release)."""
    info = DATASETS[cfg.name]
    root = None if cfg.root is None else str(cfg.root)
    out = {"name": cfg.name, "source": str(Path(root).expanduser().resolve()) if info.needs_root else
           "sklearn.datasets.load_digits", "digest": _digest(cfg.name, root, bool(cfg.download), cfg.image_size),
           "train_examples": data.n_train, "test_examples": data.n_test, "input_shape": list(data.input_shape),
           "num_classes": data.num_classes, "mean": list(data.mean), "std": list(data.std)}
    if info.notes is not None and root is not None:
        out["files"] = info.notes(root)
    return out


# ---------------------------------------------------------------- augmentation

def augment_batch(x: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """Random horizontal flip (p=0.5) and reflect-pad-``pad`` random crop, per sample, vectorised.

    The random numbers come from the CPU ``generator`` and are then moved to ``x.device``, so a
    seed gives the same augmentation on CPU and CUDA.
    """
    n, _, h, w = x.shape
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=generator).to(x.device)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect").permute(0, 2, 3, 1)  # (N, H+2p, W+2p, C)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]          # (N, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]          # (N, 1, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded[batch, rows, cols].permute(0, 3, 1, 2).contiguous()             # (N, C, H, W)


# ---------------------------------------------------------------- device data

@dataclass
class DeviceData:
    """A data set's tensors on one device, x normalised; batches are slices of them."""
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    input_shape: tuple[int, int, int]
    augment: bool
    mean: tuple = ()    # the normalisation constants x was normalised with (recorded in the run)
    std: tuple = ()

    @property
    def n_train(self) -> int:
        return len(self.train_y)

    @property
    def n_test(self) -> int:
        return len(self.test_y)

    @property
    def device(self) -> torch.device:
        return self.train_x.device

    def steps_per_epoch(self, batch_size: int, drop_last: bool = True) -> int:
        full = self.n_train // batch_size
        return full if drop_last and full > 0 else -(-self.n_train // batch_size)

    def train_batches(self, batch_size: int, generator: torch.Generator, augment: Optional[bool] = None,
                      drop_last: bool = True, indices: bool = False) -> Iterator[tuple[Tensor, ...]]:
        """One epoch in a seeded order. ``generator`` is a CPU generator: the permutation is drawn on
        CPU and moved to the device, so a seed gives the same order on CPU and CUDA. ``indices``: also
        yield each batch's example indices."""
        augment = self.augment if augment is None else augment
        order = torch.randperm(self.n_train, generator=generator).to(self.device)
        for i in range(self.steps_per_epoch(batch_size, drop_last)):
            idx = order[i * batch_size:(i + 1) * batch_size]
            x = self.train_x[idx]
            x = augment_batch(x, generator) if augment else x
            yield (x, self.train_y[idx], idx) if indices else (x, self.train_y[idx])

    def test_batches(self, batch_size: int = 1000) -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(0, self.n_test, batch_size):
            yield self.test_x[i:i + batch_size], self.test_y[i:i + batch_size]


def load(cfg, device: torch.device | str = "cpu") -> DeviceData:
    """``cfg`` is a ``DataConfig``. The training subset is a fixed seed-0 permutation's first N
    examples (independent of the run seed); the test subset is the first N test examples."""
    if cfg.name not in DATASETS:
        raise ConfigError(f"data.name: {cfg.name!r} is not one of {sorted(DATASETS)}")
    info = DATASETS[cfg.name]
    root = None if cfg.root is None else str(cfg.root)
    if cfg.name == "image_folder":   # uint8 images; normalised by its training split's mean/std
        from . import image_folder
        f = image_folder.load(cfg.root, cfg.image_size)
        # Folders list the test images class by class: a fixed shuffle makes first-N test subsets and
        # test batches (BatchNorm on batch statistics normalises per batch) mixed, like CIFAR's.
        mixed = torch.randperm(len(f.test_y), generator=torch.Generator().manual_seed(0))
        train_x, train_y, test_x, test_y = f.train_x, f.train_y, f.test_x[mixed], f.test_y[mixed]
        info = dataclasses.replace(info, num_classes=len(f.classes), input_shape=tuple(train_x.shape[1:]),
                                   augment=tuple(train_x.shape[1:]) == (3, 32, 32), mean=f.mean, std=f.std)
    else:
        train_x, train_y, test_x, test_y = _load_cpu(cfg.name, root, bool(cfg.download))
    if cfg.subset is not None:
        if cfg.subset > len(train_y):
            raise ConfigError(f"data.subset: {cfg.subset} exceeds the {len(train_y)} training examples of {cfg.name}")
        keep = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(0))[:cfg.subset]
        train_x, train_y = train_x[keep], train_y[keep]
    if cfg.test_subset is not None:
        if cfg.test_subset > len(test_y):
            raise ConfigError(f"data.test_subset: {cfg.test_subset} exceeds the {len(test_y)} test examples of {cfg.name}")
        test_x, test_y = test_x[:cfg.test_subset], test_y[:cfg.test_subset]
    mean = torch.tensor(info.mean, device=device).view(-1, 1, 1)
    std = torch.tensor(info.std, device=device).view(-1, 1, 1)
    def norm(x: Tensor) -> Tensor:
        x = x.to(device)
        return ((x if x.is_floating_point() else x.float().div_(255)) - mean) / std   # uint8 moved as uint8
    augment = {"auto": info.augment, "on": True, "off": False}[cfg.augment]
    return DeviceData(norm(train_x), train_y.to(device), norm(test_x), test_y.to(device),
                      info.num_classes, info.input_shape, augment, tuple(info.mean), tuple(info.std))
