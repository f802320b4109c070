"""``data.name: image_folder``: any data set in torchvision's ImageFolder layout,
``root/train/<class>/<image>`` and ``root/test/<class>/<image>`` (classes = folder names, sorted).

``check(root, image_size)`` is the pre-flight check that config validation runs (for every trial
of a sweep, before Ray starts), so it must be quick on 60,000 files: it lists the folders (the
layout, the class sets of both splits, no empty class, image extensions only) and opens the
headers of the first and last image of every class (size and mode). Opening every header costs
about as much as decoding every image (both are dominated by opening the file: ~15 s for CIFAR-10
on one core), so that is left to the loader, which decodes everything once and names, in one line,
any file the check could not see (a corrupt image, one of another size or mode).

``load(root, image_size)`` decodes every image once (a process pool when there are many) into
uint8 tensors plus the training split's channel mean/std, and caches them on disk outside the data
folder (which may be read-only): ``$CTS_RAY_CACHE/image_folder/<key>.pt`` (default
``~/.cache/cts-ray``). The key is a hash of every file's relative path, size and mtime (and
``image_size``): a changed, added or removed file gives a new key, and keying on stat data costs
one directory scan rather than reading 55 MB of images on every load. Writes go to a temporary
file renamed into place, under a lock file, so concurrent trials decode once and never read a
half-written cache.
"""
from __future__ import annotations

import collections
import fcntl
import functools
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from .errors import ConfigError
from .layouts import SPLITS, Listing
from .layouts import _check  # noqa: F401  the check's per-process cache (tests clear it)
from .layouts import NAMES as _LAYOUTS, _folder_stamp, check as _layout_check, describe as _describe, header as _header, scan as _layout_scan
from .storage import save_torch, write_text

POOL_MIN_FILES = 4096     # below this a process pool costs more than it saves
CHUNK = 1024              # images decoded (and summed for mean/std) at a time


def _bad(msg: str) -> ConfigError:
    return ConfigError(f"data.root: {msg}")


def scan(root) -> Listing:
    """The folder's listing (layouts.py), or a ConfigError naming the first thing wrong with it."""
    return _layout_scan("image_folder", root)


def check(root, image_size: Optional[int] = None) -> None:
    """The pre-flight check (layouts.py): raises a one-line ConfigError for a bad folder."""
    _layout_check("image_folder", root, image_size)


# ---------------------------------------------------------------- images

def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def decode_image(root: str, rel: str, size: Optional[int], expect) -> np.ndarray | str:
    """One image as uint8 (H, W, C), or a one-line problem: at ``size`` x ``size`` (RGB, bilinear),
    or as it is where ``expect`` is the folder's one (size, mode). The in-memory and the streamed
    path both decode with it, so they see the same pixels. PIL reads what real ImageNet holds
    (CMYK and greyscale JPEGs, a PNG named .JPEG) by content, not by name."""
    from PIL import Image
    try:
        with Image.open(os.path.join(root, rel)) as im:
            if size is None:
                if (im.size, im.mode) != expect:
                    return (f"{rel} is {_describe((im.size, im.mode))}, others {_describe(expect)}; expected "
                            "one size and mode, or set data.image_size")
                im = im.convert("L" if im.mode in ("L", "1") else "RGB")
            else:
                im = im.convert("RGB")
                im = im if im.size == (size, size) else im.resize((size, size), Image.BILINEAR)
            a = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as e:   # PIL's decoding errors
        return f"{rel} cannot be decoded ({first_line(e)}); expected a readable image"
    return a[:, :, None] if a.ndim == 2 else a


def _decode_chunk(root: str, rels: list, size: Optional[int], expect) -> np.ndarray | str:
    """Decode ``rels`` into one uint8 array (N, H, W, C), or return a one-line problem."""
    out = []
    for rel in rels:
        a = decode_image(root, rel, size, expect)
        if isinstance(a, str):
            return a
        out.append(a)
    return np.stack(out)


def _decoded_chunks(root: Path, rels: list, size: Optional[int], expect) -> Iterator[np.ndarray]:
    """``rels`` decoded, CHUNK at a time as uint8 arrays (n, H, W, C), in order; a process pool when
    there are many. A damaged image is a one-line ConfigError naming it."""
    chunks = [rels[i:i + CHUNK] for i in range(0, len(rels), CHUNK)]
    workers = min(os.cpu_count() or 1, 8)
    if len(rels) >= POOL_MIN_FILES and workers > 1:
        import multiprocessing
        # fork, not spawn: spawn re-runs a caller's unguarded script in every worker. The forked
        # workers only run numpy and PIL, never the torch threads this process may hold.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            ahead: collections.deque = collections.deque()   # 2 chunks a worker in flight: memory stays flat
            for c in chunks:
                ahead.append(pool.submit(_decode_chunk, str(root), c, size, expect))
                if len(ahead) > 2 * workers:
                    yield from _checked([ahead.popleft().result()])
            yield from _checked(f.result() for f in ahead)
    else:
        yield from _checked(_decode_chunk(str(root), c, size, expect) for c in chunks)


def _checked(parts) -> Iterator[np.ndarray]:
    for p in parts:
        if isinstance(p, str):
            raise _bad(p)
        yield p


# ---------------------------------------------------------------- a folder data set

FOLDERS = _LAYOUTS   # the folder data sets: the user's files, never downloaded
NATIVE = {"tiny_imagenet": 64}   # decoded at this size when data.image_size is null
STATS_ALL = 50_000               # streamed image folders: mean/std over every training image up to
STATS_SAMPLE = 10_000            # this many, else over a seeded sample of this many


@dataclass(frozen=True, eq=False)
class Folder:
    """A folder data set as a run uses it: its listing, the size its images decode at (None:
    ImageNet's recipe, 224 px crops of whole images, streamed only) or the one (size, mode) all
    its images have (``expect``, an image folder without data.image_size)."""
    name: str
    listing: Listing
    size: Optional[int]
    expect: Optional[tuple]

    @property
    def classes(self) -> tuple:
        return self.listing.classes

    def count(self, split: str) -> int:
        return self.listing.count(split)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        if self.expect is not None:
            (w, h), mode = self.expect
            return (1 if mode in ("L", "1") else 3, h, w)
        return (3, self.size or 224, self.size or 224)

    @property
    def augment(self) -> bool:
        """data.augment: auto. The ImageNets always (their recipes); an image folder at 32 x 32 RGB."""
        return self.name != "image_folder" or self.input_shape == (3, 32, 32)

    @property
    def augmentation(self) -> str:
        """The batches' augmentation (``batches.AUGMENTATIONS``): the authors' colour one on Tiny-ImageNet."""
        return "colour_crop" if self.name == "tiny_imagenet" else "crop_flip"

    @property
    def raw(self) -> bool:
        """Held as uint8 pixels, normalised per batch: colour jitter needs pixel values."""
        return self.augmentation == "colour_crop"

    def key(self) -> str:
        return self.listing.key(self.size)

    def decoded_bytes(self) -> float:
        """What holding it decoded would take (float32 on the device; uint8 for Tiny-ImageNet, whose
        colour augmentation needs pixels); ImageNet at 224 px cannot be held (infinite)."""
        if self.size is None and self.expect is None:
            return float("inf")
        c, h, w = self.input_shape
        return (self.count("train") + self.count("test")) * c * h * w * (1 if self.raw else 4)

    def stats(self) -> tuple[tuple, tuple]:
        """Normalisation mean/std: the ImageNets' published constants (datasets.py); an image
        folder's own training images' (every one up to STATS_ALL, as the in-memory path computes
        them; else a seeded sample), kept beside the decoded cache."""
        from .datasets import DATASETS
        if self.name != "image_folder":
            return DATASETS[self.name].mean, DATASETS[self.name].std
        path = cache_path(self.key()).with_suffix(".stats.json")
        try:
            saved = json.loads(path.read_text())
            return tuple(saved["mean"]), tuple(saved["std"])
        except (OSError, ValueError, KeyError):
            pass
        import torch
        rels = self.listing.paths["train"]
        if len(rels) > STATS_ALL:
            pick = torch.randperm(len(rels), generator=torch.Generator().manual_seed(0))[:STATS_SAMPLE]
            rels = [rels[i] for i in sorted(pick.tolist())]
        mean, std = channel_stats(_decoded_chunks(self.listing.root, rels, self.size, self.expect))
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps({"mean": mean, "std": std}))
        return tuple(mean), tuple(std)

    def decoded(self) -> "Arrays":
        """Every image decoded (read once per process, from the disk cache when there is one)."""
        if self.size is None and self.expect is None:
            raise ConfigError("data.stream: off cannot hold imagenet at its recipe's 224 px crops (the whole "
                              "set decoded is ~190 GB); expected auto or on, or set data.image_size")
        key = self.key()
        if key not in _LOADED:
            _LOADED.clear()
            _LOADED[key] = _read_or_decode(self, key)
        f = _LOADED[key]
        if self.name == "image_folder":
            return f
        mean, std = self.stats()
        return Arrays(f.train_x, f.train_y, f.test_x, f.test_y, f.classes, mean, std)


@functools.lru_cache(maxsize=16)
def _folder(name: str, root: str, image_size: Optional[int], stamp) -> Folder:
    listing = _layout_scan(name, root)
    size = image_size or NATIVE.get(name)
    expect = None
    if size is None and name == "image_folder":
        first = listing.paths["train"][0]
        try:
            expect = _header(listing.root / first)
        except (OSError, ValueError, SyntaxError) as e:
            raise _bad(f"{first} is not an image ({first_line(e)}); expected image files only") from None
    return Folder(name, listing, size, expect)


def folder(name: str, root, image_size: Optional[int] = None, rescan: bool = False) -> Folder:
    """The folder data set ``name`` at ``root``. Kept while its folders' mtimes stand, which a file
    rewritten in place does not change: ``rescan`` (each data.load) lists it again."""
    if rescan:
        _folder.cache_clear()
    root = Path(root).expanduser()
    return _folder(name, str(root), image_size, _folder_stamp(name, root))


def decoded_bytes(name: str, root, image_size: Optional[int] = None) -> float:
    return folder(name, root, image_size).decoded_bytes()


BUDGET_SHARE = 0.25   # of the trial's share of the device's memory (README "Streaming")


def host_budget(cpus: Optional[float] = None) -> int:
    """Bytes a CPU trial holding ``cpus`` CPUs may hold decoded data in: BUDGET_SHARE of the node's
    RAM over the trials its CPUs can run at once."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(BUDGET_SHARE * total * (min(1.0, cpus / (os.cpu_count() or 1)) if cpus else 1))


def streams(data, budget: Callable[[], int]) -> bool:
    """Whether ``data`` (a folder data set's DataConfig) streams: data.stream, and for auto whether its
    decoded set outgrows ``budget()`` bytes."""
    if data.stream != "auto":
        return data.stream == "on"
    return decoded_bytes(data.name, data.root, data.image_size) > budget()


def streams_on_host(data, resources) -> bool:
    """``streams`` for a CPU trial on this node (``host_budget``)."""
    return streams(data, lambda: host_budget(resources.cpus))


# ---------------------------------------------------------------- decoded cache

def cache_dir() -> Path:
    base = os.environ.get("CTS_RAY_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "cts-ray"
    return Path(base).expanduser() / "image_folder"


def cache_path(key: str) -> Path:
    return cache_dir() / f"{key}.pt"


@dataclass
class Arrays:
    """A decoded folder: uint8 images (N, C, H, W), int64 labels, the per-channel mean/std of
    pixels / 255 (an image folder's training split's; the ImageNets' published ones)."""
    train_x: "torch.Tensor"   # noqa: F821
    train_y: "torch.Tensor"   # noqa: F821
    test_x: "torch.Tensor"    # noqa: F821
    test_y: "torch.Tensor"    # noqa: F821
    classes: tuple
    mean: tuple
    std: tuple


def _decode_all(f: Folder) -> dict:
    import torch
    out = {}
    for split in SPLITS:
        x = np.concatenate(list(_decoded_chunks(f.listing.root, f.listing.paths[split], f.size, f.expect)))
        out[f"{split}_x"] = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        out[f"{split}_y"] = torch.from_numpy(np.asarray(f.listing.labels[split], dtype=np.int64))
    x = out["train_x"].permute(0, 2, 3, 1)
    out["mean"], out["std"] = channel_stats(x[i:i + CHUNK].numpy() for i in range(0, len(x), CHUNK))
    return out


def channel_stats(chunks) -> tuple[list, list]:
    """Per-channel mean and (population) std of uint8 images / 255 given as (n, H, W, C) chunks,
    accumulated in float64 chunk by chunk (the same chunks give the same bits, held or streamed)."""
    s = s2 = 0.0
    n = 0
    for c in chunks:   # exact integer sums per chunk (a chunk's squares fit int64 easily)
        flat = c.reshape(-1, c.shape[-1]).astype(np.int64)
        s, s2, n = s + flat.sum(0), s2 + np.einsum("pc,pc->c", flat, flat), n + flat.shape[0]
    mean = s / (255 * n)
    return mean.tolist(), np.sqrt(s2 / (255 * 255 * n) - np.square(mean)).tolist()


def decode_once(name: str, root, image_size: Optional[int] = None, on_start=lambda n: None) -> Optional[int]:
    """The sweep driver's pre-flight: decode every image of the folder into the decode cache the
    trials read, unless a cache for its current files exists; ``on_start(n)`` hears the number of
    images before they are decoded. Returns that number (None: cached already); a damaged image is
    a one-line ConfigError naming it. Keeps nothing in memory (the driver runs Ray next)."""
    f = folder(name, root, image_size)
    key = f.key()
    if cache_path(key).is_file():
        return None   # decoded before: every image in it was read
    n = sum(f.count(split) for split in SPLITS)
    on_start(n)
    _read_or_decode(f, key)
    return n


_LOADED: dict = {}   # key -> Arrays: read once per process, like every data set


def load(root, image_size: Optional[int] = None, name: str = "image_folder") -> Arrays:
    return folder(name, root, image_size, rescan=True).decoded()


def _read_or_decode(f: Folder, key: str) -> Arrays:
    import torch
    path = cache_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)    # one decoder per key; the others wait, then read its file
        state = None
        if path.is_file():
            try:
                state = torch.load(path, weights_only=True)
            except Exception:               # a damaged cache file is rebuilt, never trusted
                state = None
        if state is None:
            state = _decode_all(f)
            save_torch(state, path)
            write_text(path.with_suffix(".stats.json"), json.dumps({"mean": state["mean"], "std": state["std"]}))
    return Arrays(state["train_x"], state["train_y"], state["test_x"], state["test_y"], f.listing.classes,
                  tuple(state["mean"]), tuple(state["std"]))
