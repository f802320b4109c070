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
import hashlib
import math
import pickle
import zlib
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
    check: Optional[Callable] = None   # root -> None: validates contents cheaply (ConfigError), as the loader does
    notes: Optional[Callable] = None   # root -> per-file provenance (which file was read, its md5)


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


# MNIST-family files are trusted by content, not by checksum: a valid IDX file loads whether it is
# extracted or gzipped by any tool (md5s that differ from the official release are only noted in
# the run's provenance). The pre-flight check (``check_root``) and the loader run the same
# validation, ``_mnist_check``: it reads headers and, for truncation, the gzip trailer (ISIZE, the
# uncompressed length mod 2**32) or the file size, so it is cheap; only the loader reads it all.

@dataclass(frozen=True)
class IdxFile:
    """A validated IDX file of unsigned bytes: where it is, whether gzipped, the shape it holds."""
    path: Path
    gz: bool
    shape: tuple[int, ...]

    @property
    def offset(self) -> int:   # header: magic (4 bytes) and one 4-byte big-endian size per dimension
        return 4 + 4 * len(self.shape)

    @property
    def size(self) -> int:
        return self.offset + math.prod(self.shape)


def _gz_length(path: Path) -> int:
    """Uncompressed length of a whole gzip stream (every member); raises EOFError when truncated."""
    n = 0
    with gzip.open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            n += len(chunk)
    return n


def _idx_header(path: Path, what: str) -> IdxFile:
    """Check ``path`` is a complete IDX file of unsigned bytes (gzip detected by its magic bytes)
    without reading its data; errors say what is wrong with ``what`` (the file's name for users)."""
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    try:
        with (gzip.open if gz else open)(path, "rb") as f:
            head = f.read(4)
            ok = len(head) == 4 and head[:3] == b"\0\0\x08" and 1 <= head[3] <= 4
            dims = f.read(4 * head[3]) if ok else b""
    except EOFError:
        raise ConfigError(f"data.root: {what} is truncated (its gzip stream ends inside the IDX header)") from None
    except (OSError, zlib.error) as e:
        raise ConfigError(f"data.root: {what} is not a readable gzip file ({type(e).__name__}: {e})") from None
    if not ok:
        raise ConfigError(f"data.root: {what} is not an IDX file of unsigned bytes (starts with {head.hex()!r}; "
                          "expected magic 0x0000080N)")
    if len(dims) < 4 * head[3]:
        raise ConfigError(f"data.root: {what} is truncated (its IDX header is incomplete)")
    idx = IdxFile(path, gz, tuple(int.from_bytes(dims[i:i + 4], "big") for i in range(0, len(dims), 4)))
    if gz:
        with open(path, "rb") as f:
            f.seek(-4, 2)
            isize = int.from_bytes(f.read(4), "little")
        try:   # the trailer disagrees: several gzip members, or a cut-off stream; measure it
            length = idx.size if isize == idx.size % 2 ** 32 else _gz_length(path)
        except (EOFError, OSError, zlib.error):
            raise ConfigError(f"data.root: {what} is truncated (its gzip stream ends early; expected "
                              f"{idx.size} bytes for shape {list(idx.shape)})") from None
    else:
        length = path.stat().st_size
    if length < idx.size:
        raise ConfigError(f"data.root: {what} is truncated ({length} of the {idx.size} bytes its header announces "
                          f"for shape {list(idx.shape)})")
    if length > idx.size:
        raise ConfigError(f"data.root: {what} has {length - idx.size} bytes beyond the {idx.size} its header "
                          f"announces for shape {list(idx.shape)}")
    return idx


def _read_idx(idx: IdxFile) -> Tensor:
    """The data of a file ``_idx_header`` validated, as a uint8 tensor of its shape."""
    try:
        data = gzip.decompress(idx.path.read_bytes()) if idx.gz else idx.path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:   # e.g. a CRC error: damaged inside, not cut short
        raise ConfigError(f"data.root: {idx.path} is damaged ({type(e).__name__}: {e})") from None
    if len(data) != idx.size:   # changed since it was checked
        raise ConfigError(f"data.root: {idx.path} holds {len(data)} bytes; its header announces {idx.size}")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=idx.offset).view(*idx.shape)


def _mnist_check(cls_name: str, root) -> list[IdxFile]:
    """The four files (train images, labels, test images, labels), each extracted or gzipped,
    validated: present, complete IDX files, 28 x 28 images, as many labels as images."""
    folder = Path(root).expanduser()
    found = []
    for choices in _mnist_files(cls_name)(folder):
        path = next((p for p in choices if p.is_file()), None)
        if path is None:
            raise ConfigError(f"data.root: {str(root)!r} has no {cls_name} in torchvision's layout "
                              f"(no {choices[0].relative_to(folder)}); expected the folder torchvision downloads "
                              "into (or data.download: true)")
        found.append(_idx_header(path, str(path.relative_to(folder))))
    for images, labels in (found[:2], found[2:]):
        name = lambda f: f.path.relative_to(folder)
        if len(images.shape) != 3 or images.shape[1:] != (28, 28):
            raise ConfigError(f"data.root: {name(images)} holds shape {list(images.shape)}; expected N x 28 x 28 images")
        if len(labels.shape) != 1 or labels.shape[0] != images.shape[0]:
            raise ConfigError(f"data.root: count mismatch: {name(labels)} holds shape {list(labels.shape)}, "
                              f"{name(images)} {images.shape[0]} images; expected one label per image")
    return found


def _mnist_like(cls_name: str):
    """MNIST, FashionMNIST, KMNIST: uint8 N x 28 x 28 images and labels, read from the IDX files
    (extracted or gzipped) in torchvision's layout, without writing anything (the folder may be
    a read-only shared copy). ``download`` lets torchvision fetch missing files first."""
    def loader(root, download=False):
        if download and any(not any(p.is_file() for p in c) for c in _mnist_files(cls_name)(Path(root))):
            import torchvision.datasets as tvd
            getattr(tvd, cls_name)(root, train=True, download=True)
        x_tr, y_tr, x_te, y_te = (_read_idx(f) for f in _mnist_check(cls_name, root))
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


def _mnist_provenance(cls_name: str):
    """Per file: which one was read and whether its md5 is the official release's (a difference,
    e.g. another gzip tool, is noted here, never refused)."""
    def notes(root):
        import torchvision.datasets as tvd
        official = dict(getattr(tvd, cls_name).resources)
        out = []
        for idx in _mnist_check(cls_name, root):
            md5 = hashlib.md5(idx.path.read_bytes()).hexdigest()
            out.append({"file": str(idx.path.relative_to(Path(root).expanduser())), "gzip": idx.gz, "md5": md5,
                        "official_md5": md5 == official[idx.path.name] if idx.path.name in official else None})
        return out
    return notes


def _mnist_family(cls_name: str, mean: float, std: float) -> DatasetInfo:
    return DatasetInfo(10, (1, 28, 28), True, False, _mnist_like(cls_name), (mean,), (std,), _mnist_files(cls_name),
                       functools.partial(_mnist_check, cls_name), _mnist_provenance(cls_name))


def _cifar_files(cls_name: str):
    def files(root):
        import torchvision.datasets as tvd
        cls = getattr(tvd, cls_name)
        folder = Path(root) / cls.base_folder
        return [(folder / n,) for n, _ in [*cls.train_list, *cls.test_list]] + [(folder / cls.meta["filename"],)]
    return files


def missing_file(name: str, root: str) -> Optional[Path]:
    """The first file (relative to ``root``) that data set's loader needs and ``root`` lacks (None:
    all there). A check of names only; ``check_root`` adds the data set's content check."""
    folder = Path(root).expanduser()
    for choices in DATASETS[name].files(folder):
        if not any(p.is_file() for p in choices):
            return choices[0].relative_to(folder)
    return None


def check_root(name: str, root: str) -> None:
    """The pre-flight check of a data folder (before a run or sweep starts): every file the loader
    needs is there and, where the data set has a content check, valid as the loader will read it."""
    if gap := missing_file(name, root):
        raise ConfigError(f"data.root: {root!r} has no {name} in torchvision's layout (no {gap}); "
                          "expected the folder torchvision downloads into (or data.download: true)")
    if DATASETS[name].check is not None:
        DATASETS[name].check(root)


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
    "mnist": _mnist_family("MNIST", 0.1307, 0.3081),
    "fashion_mnist": _mnist_family("FashionMNIST", 0.2860, 0.3530),
    "kmnist": _mnist_family("KMNIST", 0.1918, 0.3483),
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
