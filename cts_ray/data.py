"""Data sets by name, loaded once into tensors on the compute device (airbench style).

``DATASETS`` maps a name to a ``DatasetInfo`` whose ``loader(root, download)`` returns CPU tensors
(x float32 in [0, 1], shape (N, C, H, W); y int64). ``load(cfg, device)`` reads them (cached per
process), takes the configured subsets, moves them to the device and normalises them there.
``DeviceData.train_batches`` shuffles with a seeded CPU generator and augments on the device, so a
seed gives the same batches on CPU and CUDA. No DataLoader, no worker processes, no PIL.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import ConfigError


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: Optional[int]         # None (image_folder): from the folder, like the next four
    input_shape: Optional[tuple[int, int, int]]  # (C, H, W)
    needs_root: bool                   # False only for digits (bundled with scikit-learn)
    augment: Optional[bool]            # default augmentation (flip + pad-4 crop); image_folder: 32x32 RGB
    loader: Optional[Callable]         # (root, download) -> (train_x, train_y, test_x, test_y) on CPU
    mean: Optional[tuple[float, ...]]  # per-channel normalisation constants
    std: Optional[tuple[float, ...]]
    files: Optional[Callable] = None   # root -> [(a needed file, or its alternatives), ...]


# ---------------------------------------------------------------- loaders (CPU tensors)

def _digits(root=None, download=False):
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


def _read_idx_gz(path: Path) -> Tensor:
    """An IDX file (MNIST's format) of uint8 values, gzipped as in the official release."""
    data = gzip.decompress(path.read_bytes())
    assert data[2] == 0x08, f"{path}: not a uint8 IDX file"
    nd = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(nd)]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=4 + 4 * nd).view(*shape)


def _mnist_like(cls_name: str):
    """MNIST, FashionMNIST, KMNIST: torchvision's ``.data`` (uint8 N x 28 x 28) and ``.targets``.

    torchvision 0.29 reads only the extracted raw files (``raw/train-images-idx3-ubyte``); when a
    folder holds just the official ``.gz`` files (with their md5s; e.g. a read-only shared copy
    where torchvision cannot extract them) they are read here directly, without writing anything.
    """
    def loader(root, download=False):
        import torchvision.datasets as tvd
        from torchvision.datasets.utils import check_integrity
        cls = getattr(tvd, cls_name)
        files = _mnist_files(cls_name)(root)                  # (extracted, .gz) per resource
        gz = [g for _, g in files]
        extracted = all(e.is_file() for e, _ in files)
        if not extracted and all(check_integrity(str(p), md5) for p, (_, md5) in zip(gz, cls.resources)):
            x_tr, y_tr, x_te, y_te = (_read_idx_gz(p) for p in gz)  # resources order: train x, y, test x, y
        else:
            tr, te = cls(root, train=True, download=download), cls(root, train=False, download=download)
            x_tr, y_tr, x_te, y_te = tr.data, tr.targets, te.data, te.targets
        x = lambda d: d.to(torch.float32).div_(255).unsqueeze(1)
        return x(x_tr), y_tr.long(), x(x_te), y_te.long()
    return loader


def _mnist_files(cls_name: str):
    """The raw files the loader reads, each either extracted or as the release's ``.gz``."""
    def files(root):
        import torchvision.datasets as tvd
        raw = Path(root) / cls_name / "raw"
        return [(raw / n.removesuffix(".gz"), raw / n) for n, _ in getattr(tvd, cls_name).resources]
    return files


def _cifar_files(cls_name: str):
    def files(root):
        import torchvision.datasets as tvd
        cls = getattr(tvd, cls_name)
        folder = Path(root) / cls.base_folder
        return [(folder / n,) for n, _ in [*cls.train_list, *cls.test_list]] + [(folder / cls.meta["filename"],)]
    return files


def missing_file(name: str, root: str) -> Optional[Path]:
    """The first file (relative to ``root``) that data set's loader needs and ``root`` lacks (None:
    all there). A check of names only, cheap enough to run before a sweep starts; the loader still
    verifies contents."""
    folder = Path(root).expanduser()
    for choices in DATASETS[name].files(folder):
        if not any(p.is_file() for p in choices):
            return choices[0].relative_to(folder)
    return None


def _cifar(cls_name: str):
    """CIFAR-10/100: torchvision's ``.data`` (uint8 N x 32 x 32 x 3 numpy) and ``.targets``."""
    def loader(root, download=False):
        import torchvision.datasets as tvd
        cls = getattr(tvd, cls_name)
        tr, te = cls(root, train=True, download=download), cls(root, train=False, download=download)
        x = lambda d: torch.from_numpy(d).permute(0, 3, 1, 2).to(torch.float32).div_(255).contiguous()
        y = lambda t: torch.tensor(t, dtype=torch.int64)
        return x(tr.data), y(tr.targets), x(te.data), y(te.targets)
    return loader


DATASETS: dict[str, DatasetInfo] = {
    # digits mean/std: computed once from its (fixed) training split, pixels/16.
    "digits": DatasetInfo(10, (1, 8, 8), False, False, _digits, (0.3054,), (0.3761,)),
    "mnist": DatasetInfo(10, (1, 28, 28), True, False, _mnist_like("MNIST"), (0.1307,), (0.3081,),
                         _mnist_files("MNIST")),
    "fashion_mnist": DatasetInfo(10, (1, 28, 28), True, False, _mnist_like("FashionMNIST"),
                                 (0.2860,), (0.3530,), _mnist_files("FashionMNIST")),
    "kmnist": DatasetInfo(10, (1, 28, 28), True, False, _mnist_like("KMNIST"), (0.1918,), (0.3483,),
                          _mnist_files("KMNIST")),
    "cifar10": DatasetInfo(10, (3, 32, 32), True, True, _cifar("CIFAR10"),
                           (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), _cifar_files("CIFAR10")),
    "cifar100": DatasetInfo(100, (3, 32, 32), True, True, _cifar("CIFAR100"),
                            (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), _cifar_files("CIFAR100")),
    # The user's own images (image_folder.py): classes, shape and mean/std come from the folder.
    "image_folder": DatasetInfo(None, None, True, None, None, None, None),
}


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
                      drop_last: bool = True) -> Iterator[tuple[Tensor, Tensor]]:
        """One epoch in a seeded order. ``generator`` is a CPU generator: the permutation is drawn on
        CPU and moved to the device, so a seed gives the same order on CPU and CUDA."""
        augment = self.augment if augment is None else augment
        order = torch.randperm(self.n_train, generator=generator).to(self.device)
        for i in range(self.steps_per_epoch(batch_size, drop_last)):
            idx = order[i * batch_size:(i + 1) * batch_size]
            x = self.train_x[idx]
            yield (augment_batch(x, generator) if augment else x), self.train_y[idx]

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
