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

import fcntl
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import ConfigError
from .layouts import SPLITS, Listing
from .layouts import _check  # noqa: F401  the check's per-process cache (tests clear it)
from .layouts import check as _layout_check, describe as _describe, header as _header, scan as _layout_scan
from .storage import save_torch

POOL_MIN_FILES = 4096     # below this a process pool costs more than it saves


def _bad(msg: str) -> ConfigError:
    return ConfigError(f"data.root: {msg}")


def scan(root) -> Listing:
    """The folder's listing (layouts.py), or a ConfigError naming the first thing wrong with it."""
    return _layout_scan("image_folder", root)


def check(root, image_size: Optional[int] = None) -> None:
    """The pre-flight check (layouts.py): raises a one-line ConfigError for a bad folder."""
    _layout_check("image_folder", root, image_size)


# ---------------------------------------------------------------- images

def _decode_chunk(root: str, rels: list, image_size: Optional[int], expect) -> np.ndarray | str:
    """Decode ``rels`` into one uint8 array (N, H, W, C), or return a one-line problem."""
    from PIL import Image
    out = []
    for rel in rels:
        try:
            with Image.open(os.path.join(root, rel)) as im:
                if image_size is None:
                    if (im.size, im.mode) != expect:
                        return (f"{rel} is {_describe((im.size, im.mode))}, others {_describe(expect)}; expected "
                                "one size and mode, or set data.image_size")
                    im = im.convert("L" if im.mode in ("L", "1") else "RGB")
                else:
                    im = im.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
                a = np.asarray(im, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError) as e:   # PIL's decoding errors
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            return f"{rel} cannot be decoded ({why}); expected a readable image"
        out.append(a[:, :, None] if a.ndim == 2 else a)
    return np.stack(out)


# ---------------------------------------------------------------- decoded cache

def cache_dir() -> Path:
    base = os.environ.get("CTS_RAY_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "cts-ray"
    return Path(base).expanduser() / "image_folder"


def cache_path(key: str) -> Path:
    return cache_dir() / f"{key}.pt"


@dataclass
class Arrays:
    """A decoded image folder: uint8 images (N, C, H, W), int64 labels, the training split's
    per-channel mean/std of pixels / 255."""
    train_x: "torch.Tensor"   # noqa: F821
    train_y: "torch.Tensor"   # noqa: F821
    test_x: "torch.Tensor"    # noqa: F821
    test_y: "torch.Tensor"    # noqa: F821
    classes: tuple
    mean: tuple
    std: tuple


def _decode_all(listing: Listing, image_size: Optional[int]) -> dict:
    import torch
    first = listing.paths["train"][0]
    try:
        expect = _header(listing.root / first)
    except (OSError, ValueError, SyntaxError) as e:
        raise _bad(f"{first} is not an image ({e}); expected image files only") from None
    out = {}
    for split in SPLITS:
        rels = listing.paths[split]
        chunks = [rels[i:i + 1024] for i in range(0, len(rels), 1024)]
        args = (str(listing.root), image_size, expect)
        workers = min(os.cpu_count() or 1, 8)
        if len(rels) >= POOL_MIN_FILES and workers > 1:
            import multiprocessing
            # fork, not spawn: spawn re-runs a caller's unguarded script in every worker. The forked
            # workers only run numpy and PIL, never the torch threads this process may hold.
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
                parts = list(pool.map(_decode_chunk, *zip(*[(args[0], c, *args[1:]) for c in chunks])))
        else:
            parts = [_decode_chunk(args[0], c, *args[1:]) for c in chunks]
        bad = next((p for p in parts if isinstance(p, str)), None)
        if bad is not None:
            raise _bad(bad)
        x = torch.from_numpy(np.concatenate(parts)).permute(0, 3, 1, 2).contiguous()
        out[f"{split}_x"] = x
        out[f"{split}_y"] = torch.from_numpy(np.asarray(listing.labels[split], dtype=np.int64))
    out["mean"], out["std"] = channel_stats(out["train_x"])
    return out


def channel_stats(x) -> tuple[list, list]:
    """Per-channel mean and (population) std of uint8 images / 255, accumulated in float64."""
    import torch
    s = torch.zeros(x.shape[1], dtype=torch.float64)
    s2 = torch.zeros_like(s)
    for i in range(0, len(x), 4096):
        c = x[i:i + 4096].to(torch.float64).div_(255)
        s += c.sum((0, 2, 3))
        s2 += c.square().sum((0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / n
    return mean.tolist(), (s2 / n - mean.square()).sqrt().tolist()


def decode_once(root, image_size: Optional[int] = None, on_start=lambda n: None) -> Optional[int]:
    """The sweep driver's pre-flight: decode every image of the folder into the decode cache the
    trials read, unless a cache for its current files exists; ``on_start(n)`` hears the number of
    images before they are decoded. Returns that number (None: cached already); a damaged image is
    a one-line ConfigError naming it. Keeps nothing in memory (the driver runs Ray next)."""
    listing = scan(root)
    key = listing.key(image_size)
    if cache_path(key).is_file():
        return None   # decoded before: every image in it was read
    n = sum(listing.count(split) for split in SPLITS)
    on_start(n)
    _read_or_decode(listing, image_size, key)
    return n


_LOADED: dict = {}   # key -> Arrays: read once per process, like every data set


def load(root, image_size: Optional[int] = None) -> Arrays:
    listing = scan(root)
    key = listing.key(image_size)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = _read_or_decode(listing, image_size, key)
    return _LOADED[key]


def _read_or_decode(listing: Listing, image_size: Optional[int], key: str) -> Arrays:
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
            state = _decode_all(listing, image_size)
            save_torch(state, path)
    return Arrays(state["train_x"], state["train_y"], state["test_x"], state["test_y"], listing.classes,
                  tuple(state["mean"]), tuple(state["std"]))
