"""Data sets by name: what config validation and the pre-flight checks need, without torch.

``DATASETS`` maps a name to a ``DatasetInfo``: shape, classes, normalisation, the files its loader
reads and a cheap check of their contents. The loaders themselves (``data.py``, which needs torch)
are named here and imported on their first call, so validating a config or a sweep file imports
no torch.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import importlib
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .errors import ConfigError


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: Optional[int]         # None (folder data sets): from the folder; image_folder: the next four too
    input_shape: Optional[tuple[int, int, int]]  # (C, H, W)
    needs_root: bool                   # False only for digits (bundled with scikit-learn)
    augment: Optional[bool]            # default augmentation (flip + pad-4 crop); image_folder: 32x32 RGB
    loader: Optional[Callable]         # (root, download) -> (train_x, train_y, test_x, test_y) on CPU
    mean: Optional[tuple[float, ...]]  # per-channel normalisation constants
    std: Optional[tuple[float, ...]]
    files: Optional[Callable] = None   # root -> [(a needed file, or its alternatives), ...]
    check: Optional[Callable] = None   # root -> None: validates contents cheaply (ConfigError), as the loader does
    notes: Optional[Callable] = None   # root -> per-file provenance (which file was read, its md5)


def _reader(function: str, *args) -> Callable:
    """The loader ``data.<function>(*args, root, download)``, imported on its first call."""
    def loader(root=None, download=False):
        return getattr(importlib.import_module(f"{__package__}.data"), function)(*args, root, download)
    return loader


# torchvision's release files (its classes' ``resources``, ``train_list``, ``test_list``, ``meta``),
# copied so that the pre-flight check needs no torch; tests/test_light_imports.py checks they match.
MNIST_RESOURCES = {
    "MNIST": [("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
              ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
              ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
              ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c")],
    "FashionMNIST": [("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
                     ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
                     ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
                     ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310")],
    "KMNIST": [("train-images-idx3-ubyte.gz", "bdb82020997e1d708af4cf47b453dcf7"),
               ("train-labels-idx1-ubyte.gz", "e144d726b3acfaa3e44228e80efcd344"),
               ("t10k-images-idx3-ubyte.gz", "5c965bf0a639b31b8f53240b1b52f4d7"),
               ("t10k-labels-idx1-ubyte.gz", "7320c461ea6c1c855c0b718fb2a4b134")],
}
CIFAR_FILES = {   # torchvision class -> (its base_folder, the train files, test files and meta file)
    "CIFAR10": ("cifar-10-batches-py", ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                                        "data_batch_5", "test_batch", "batches.meta")),
    "CIFAR100": ("cifar-100-python", ("train", "test", "meta")),
}


# MNIST-family files are trusted by content, not by checksum: a valid IDX file loads whether it is
# extracted or gzipped by any tool (md5s that differ from the official release are only noted in
# the run's provenance). The pre-flight check (``check_root``) and the loader run the same
# validation, ``mnist_check``: it reads headers and, for truncation, the gzip trailer (ISIZE, the
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


def mnist_check(cls_name: str, root) -> list[IdxFile]:
    """The four files (train images, labels, test images, labels), each extracted or gzipped,
    validated: present, complete IDX files, 28 x 28 images, as many labels as images."""
    folder = Path(root).expanduser()
    found = []
    for choices in mnist_files(cls_name)(folder):
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


def mnist_files(cls_name: str):
    """The raw files the loader reads, each either extracted or as the release's ``.gz``."""
    def files(root):
        raw = Path(root) / cls_name / "raw"
        return [(raw / n.removesuffix(".gz"), raw / n) for n, _ in MNIST_RESOURCES[cls_name]]
    return files


def _mnist_provenance(cls_name: str):
    """Per file: which one was read and whether its md5 is the official release's (a difference,
    e.g. another gzip tool, is noted here, never refused)."""
    def notes(root):
        official = dict(MNIST_RESOURCES[cls_name])
        out = []
        for idx in mnist_check(cls_name, root):
            md5 = hashlib.md5(idx.path.read_bytes()).hexdigest()
            out.append({"file": str(idx.path.relative_to(Path(root).expanduser())), "gzip": idx.gz, "md5": md5,
                        "official_md5": md5 == official[idx.path.name] if idx.path.name in official else None})
        return out
    return notes


def _mnist_family(cls_name: str, mean: float, std: float) -> DatasetInfo:
    return DatasetInfo(10, (1, 28, 28), True, False, _reader("read_mnist", cls_name), (mean,), (std,),
                       mnist_files(cls_name), functools.partial(mnist_check, cls_name), _mnist_provenance(cls_name))


def _cifar_files(cls_name: str):
    def files(root):
        base_folder, names = CIFAR_FILES[cls_name]
        return [(Path(root) / base_folder / n,) for n in names]
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


DATASETS: dict[str, DatasetInfo] = {
    # digits mean/std: computed once from its (fixed) training split, pixels/16.
    "digits": DatasetInfo(10, (1, 8, 8), False, False, _reader("read_digits"), (0.3054,), (0.3761,)),
    "mnist": _mnist_family("MNIST", 0.1307, 0.3081),
    "fashion_mnist": _mnist_family("FashionMNIST", 0.2860, 0.3530),
    "kmnist": _mnist_family("KMNIST", 0.1918, 0.3483),
    "cifar10": DatasetInfo(10, (3, 32, 32), True, True, _reader("read_cifar", "CIFAR10"),
                           (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), _cifar_files("CIFAR10")),
    "cifar100": DatasetInfo(100, (3, 32, 32), True, True, _reader("read_cifar", "CIFAR100"),
                            (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), _cifar_files("CIFAR100")),
    # The user's own images (image_folder.py): classes, shape and mean/std come from the folder.
    "image_folder": DatasetInfo(None, None, True, None, None, None, None),
    # The ImageNets in their release layouts (layouts.py); classes from the folder (a subset is fine),
    # mean/std TLAB's (data/tiny_imagenet.py, data/imagenet.py).
    "tiny_imagenet": DatasetInfo(None, (3, 64, 64), True, True, None,
                                 (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
    "imagenet": DatasetInfo(None, (3, 224, 224), True, True, None, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
