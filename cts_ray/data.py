"""Data sets loaded once into tensors on the compute device (airbench style).

``DATASETS`` (``datasets.py``, torch-free) maps a name to a ``DatasetInfo`` whose
``loader(root, download)`` calls one of the readers below, which return CPU tensors (x float32 in
[0, 1], shape (N, C, H, W); y int64). ``load(cfg, device)`` reads them (cached per process), takes
the configured subsets, moves them to the device and normalises them there.
``DeviceData.train_batches`` shuffles with a seeded CPU generator and augments on the device, so a
seed gives the same batches on CPU and CUDA. No DataLoader, no worker processes, no PIL.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import Tensor

from . import image_folder
from .batches import Batches, augment_batch, test_batch_size  # noqa: F401  augment_batch: data's API
from .datasets import DATASETS, IdxFile, mnist_check, mnist_files
from .errors import ConfigError


# ---------------------------------------------------------------- loaders (CPU tensors)

def read_digits(root=None, download=False):
    """scikit-learn's 8x8 digits, values 0..16, read from the file it bundles without importing it
    (that costs each trial process ~1.8 s); its fixed stratified split, 360 test (digits_split.py)."""
    import importlib.util

    import numpy as np

    from .digits_split import ORDER
    package = importlib.util.find_spec("sklearn").submodule_search_locations[0]
    table = np.loadtxt(Path(package) / "datasets" / "data" / "digits.csv.gz", delimiter=",")
    x = torch.tensor(table[:, :-1], dtype=torch.float32).view(-1, 1, 8, 8).div_(16)
    y = torch.tensor(table[:, -1], dtype=torch.int64)
    order = torch.tensor(ORDER)
    train_idx, test_idx = order[:-360], order[-360:]
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
    if name in image_folder.FOLDERS:
        f = image_folder.folder(name, root, image_size).decoded()
        tensors = (f.train_x, f.train_y, f.test_x, f.test_y)
    else:
        tensors = _load_cpu(name, root, download)
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().numpy().data)
    return h.hexdigest()[:16]


def provenance(cfg, data: Batches) -> dict:
    """What a run's data was (``cfg`` a ``DataConfig``): name, source, content digest (streamed: a
    digest of the files' names, sizes and mtimes, as decoding everything is what streaming avoids),
    whether it streamed, split sizes as used (after subsets), input shape, classes, the channel
    mean/std it was normalised with and, where the data set has them, notes on its files (an md5
    differing from the official release; counts against the official ones)."""
    info = DATASETS[cfg.name]
    root = None if cfg.root is None else str(cfg.root)
    digest = (f"files-{image_folder.folder(cfg.name, root, cfg.image_size).listing.stamp[:16]}" if data.streamed
              else _digest(cfg.name, root, bool(cfg.download), cfg.image_size))
    out = {"name": cfg.name, "source": str(Path(root).expanduser().resolve()) if info.needs_root else
           "sklearn.datasets.load_digits", "digest": digest, "streamed": data.streamed,
           "train_examples": data.n_train, "test_examples": data.n_test, "input_shape": list(data.input_shape),
           "num_classes": data.num_classes, "mean": list(data.mean), "std": list(data.std)}
    if info.notes is not None and root is not None:
        out["files"] = info.notes(root)
    elif cfg.name in image_folder.FOLDERS:
        from . import layouts
        out["files"] = layouts.notes(cfg.name, image_folder.folder(cfg.name, root, cfg.image_size).listing)
    return out


@dataclass
class DeviceData(Batches):
    """A data set's tensors on one device; batches are slices of them. x is normalised float32, or
    uint8 where the augmentation needs pixel values (``colour_crop``), normalised per batch."""
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    input_shape: tuple[int, int, int]
    augment: bool
    mean: tuple = ()    # the normalisation constants x was normalised with (recorded in the run)
    std: tuple = ()
    augmentation: str = "crop_flip"   # a key of AUGMENTATIONS

    @property
    def n_train(self) -> int:
        return len(self.train_y)

    @property
    def n_test(self) -> int:
        return len(self.test_y)

    @property
    def device(self) -> torch.device:
        return self.train_x.device

    def train_batches(self, batch_size: int, generator: torch.Generator, augment: Optional[bool] = None,
                      drop_last: bool = True, indices: bool = False, shard=None) -> Iterator[tuple[Tensor, ...]]:
        """One epoch in a seeded order. ``generator`` is a CPU generator: the permutation is drawn on
        CPU and moved to the device, so a seed gives the same order on CPU and CUDA. ``indices``: also
        yield each batch's example indices. ``shard`` = (rank, world): this worker's rows of every
        global batch of ``batch_size`` (``shard_of``), augmented as in the whole batch."""
        augment = self.augment if augment is None else augment
        order = torch.randperm(self.n_train, generator=generator).to(self.device)
        start, stop = self.shard_of(batch_size, shard) if shard else (0, batch_size)
        for i in range(self.steps_per_epoch(batch_size, drop_last)):
            whole = order[i * batch_size:(i + 1) * batch_size]
            idx = whole[start:stop]
            part = (start, start + len(idx), len(whole)) if shard else None
            x = self.finish(self.train_x[idx], generator, augment, part)
            yield (x, self.train_y[idx], idx) if indices else (x, self.train_y[idx])

    def test_batches(self, batch_size: Optional[int] = None, shard=None) -> Iterator[tuple[Tensor, Tensor]]:
        """The test set in order; ``shard``: this worker's rows of each batch (``test_ranges``)."""
        for i, j in self.test_ranges(batch_size or test_batch_size(self.input_shape), shard):
            yield self.finish(self.test_x[i:j], None, False), self.test_y[i:j]

    def examples(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Training examples ``idx``, not augmented."""
        idx = idx.to(self.device)
        return self.finish(self.train_x[idx], None, False), self.train_y[idx]


def memory_budget(device, resources=None) -> int:
    """Bytes a trial may hold its decoded data set in (``data.stream: auto``): a quarter of its share
    of the device's memory. CUDA: the GPU's memory times ``resources.gpus`` (at most 1); CPU: the
    node's RAM over the trials its CPUs can hold at ``resources.cpus`` each."""
    device = torch.device(device)
    if device.type != "cuda":
        return image_folder.host_budget(None if resources is None else resources.cpus)
    share = min(resources.gpus, 1) if resources is not None and resources.gpus > 0 else 1
    return int(image_folder.BUDGET_SHARE * torch.cuda.get_device_properties(device).total_memory * share)


def loader_workers(cfg, resources=None) -> int:
    """``data.workers``, or one per CPU the trial holds (at least 1, at most 8)."""
    if cfg.workers is not None:
        return cfg.workers
    return min(8, max(1, int(resources.cpus))) if resources is not None else min(8, max(1, (os.cpu_count() or 2) - 1))


def streams(cfg, device, resources=None) -> bool:
    """Whether ``cfg`` (a DataConfig) streams: ``data.stream``, and for auto whether the decoded set
    would outgrow ``memory_budget``."""
    return cfg.name in image_folder.FOLDERS and image_folder.streams(cfg, lambda: memory_budget(device, resources))


def load(cfg, device: torch.device | str = "cpu", resources=None) -> Batches:
    """``cfg`` is a ``DataConfig``, ``resources`` the run's ResourcesConfig (the memory budget and
    loader workers of a streamed folder). The training subset is a fixed seed-0 permutation's first N
    examples (independent of the run seed); the test subset is the first N test examples."""
    if cfg.name not in DATASETS:
        raise ConfigError(f"data.name: {cfg.name!r} is not one of {sorted(DATASETS)}")
    if cfg.name in image_folder.FOLDERS:
        return _load_folder(cfg, device, resources)
    train_x, train_y, test_x, test_y = _load_cpu(cfg.name, None if cfg.root is None else str(cfg.root),
                                                 bool(cfg.download))
    train_x, train_y, test_x, test_y = _subsets(cfg, train_x, train_y, test_x, test_y)
    info = DATASETS[cfg.name]
    mean = torch.tensor(info.mean, device=device).view(-1, 1, 1)
    std = torch.tensor(info.std, device=device).view(-1, 1, 1)
    norm = lambda x: (x.to(device) - mean) / std
    augment = {"auto": info.augment, "on": True, "off": False}[cfg.augment]
    return DeviceData(norm(train_x), train_y.to(device), norm(test_x), test_y.to(device),
                      info.num_classes, info.input_shape, augment, tuple(info.mean), tuple(info.std))


def _subsets(cfg, train_x, train_y, test_x, test_y):
    """``data.subset`` (a fixed seed-0 permutation's first N) and ``data.test_subset`` (the first N)."""
    if cfg.subset is not None:
        if cfg.subset > len(train_y):
            raise ConfigError(f"data.subset: {cfg.subset} exceeds the {len(train_y)} training examples of {cfg.name}")
        keep = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(0))[:cfg.subset]
        train_x, train_y = train_x[keep], train_y[keep]
    if cfg.test_subset is not None:
        if cfg.test_subset > len(test_y):
            raise ConfigError(f"data.test_subset: {cfg.test_subset} exceeds the {len(test_y)} test examples of {cfg.name}")
        test_x, test_y = test_x[:cfg.test_subset], test_y[:cfg.test_subset]
    return train_x, train_y, test_x, test_y


def _load_folder(cfg, device, resources) -> Batches:
    """A folder data set (image_folder, tiny_imagenet, imagenet), in memory or streamed. Both paths
    take the same examples: folders list the test images class by class, so a fixed shuffle makes
    first-N test subsets and test batches (BatchNorm on batch statistics normalises per batch) mixed,
    like CIFAR's; the training subset is the same seed-0 permutation as every data set's."""
    folder = image_folder.folder(cfg.name, cfg.root, cfg.image_size, rescan=True)
    mixed = torch.randperm(folder.count("test"), generator=torch.Generator().manual_seed(0))
    augment = {"auto": folder.augment, "on": True, "off": False}[cfg.augment]
    facts = dict(num_classes=len(folder.classes), input_shape=folder.input_shape, augment=augment,
                 augmentation=folder.augmentation)
    if streams(cfg, device, resources):
        from .stream import StreamData
        train_i, test_i = torch.arange(folder.count("train")), mixed
        train_i, _, test_i, _ = _subsets(cfg, train_i, train_i, test_i, test_i)
        labels = {s: torch.tensor(folder.listing.labels[s], dtype=torch.int64) for s in ("train", "test")}
        pick = lambda s, i: ([folder.listing.paths[s][j] for j in i.tolist()], labels[s][i])
        mean, std = folder.stats()
        return StreamData(str(folder.listing.root), pick("train", train_i), pick("test", test_i), folder.size,
                          folder.expect, device, loader_workers(cfg, resources), mean=mean, std=std, **facts)
    f = folder.decoded()
    train_x, train_y, test_x, test_y = _subsets(cfg, f.train_x, f.train_y, f.test_x[mixed], f.test_y[mixed])
    data = DeviceData(train_x.to(device), train_y.to(device), test_x.to(device), test_y.to(device),
                      mean=tuple(f.mean), std=tuple(f.std), **facts)
    if not folder.raw:   # held normalised, as every other data set
        data.train_x, data.test_x = data.finish(data.train_x, None, False), data.finish(data.test_x, None, False)
    return data
