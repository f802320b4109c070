"""Small real folders in the ImageNets' release layouts, written from CIFAR-10-JPEG (helpers for tests,
not a test module). Deterministic: the same arguments write the same bytes. With ``odd`` each split
holds ImageNet's odd files: a CMYK JPEG, a greyscale JPEG and a PNG named .JPEG, each the first
image (by name) of a class, so the pre-flight check's sample opens them."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import SHARED_DATA

CIFAR = SHARED_DATA / "CIFAR-10-JPEG"
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# WordNet ids for CIFAR's classes: their sorted order differs from CIFAR's, as class indices must show
WNIDS = ("n02691156", "n02958343", "n01503061", "n02121808", "n02430045", "n02084071", "n01639765",
         "n02374451", "n04194289", "n04490091")
ODD = ("cmyk", "grey", "png")
LINKS_PER_FILE = 60_000


def _source(split: str, c: int, i: int) -> Image.Image:
    folder = CIFAR / split / CIFAR_CLASSES[c]
    with Image.open(folder / f"{i:04d}.jpg") as im:
        return im.convert("RGB")


def _write(path: Path, im: Image.Image, kind: str = "rgb") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "png":
        im.save(path, "PNG")                        # a PNG named .JPEG, as ImageNet holds one
    else:
        im.convert({"rgb": "RGB", "cmyk": "CMYK", "grey": "L"}[kind]).save(path, "JPEG", quality=90)


def _odd_kinds(groups: list[list[Path]], odd: bool) -> dict[Path, str]:
    """Odd kind k goes to the first file (by name) of class k mod the number of classes."""
    if not odd:
        return {}
    out = {}
    for k, kind in enumerate(ODD):
        files = sorted(groups[k % len(groups)])
        out[files[(k // len(groups)) % len(files)]] = kind
    return out


def make_tiny_imagenet(dst, classes: int = 4, train_per_class: int = 6, val_per_class: int = 3,
                       size: int = 64, odd: bool = True) -> Path:
    """``dst/tiny-imagenet-200/`` as the official release lays it out (wnids.txt, train/<wnid>/images/
    with <wnid>_boxes.txt beside, val/images/ + val/val_annotations.txt, an unlabelled test/)."""
    root = Path(dst) / "tiny-imagenet-200"
    wnids = WNIDS[:classes]
    (root / "train").mkdir(parents=True)
    (root / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    train = [[root / "train" / w / "images" / f"{w}_{i}.JPEG" for i in range(train_per_class)] for w in wnids]
    n_val = classes * val_per_class
    val = [[root / "val" / "images" / f"val_{k}.JPEG" for k in range(c, n_val, classes)] for c in range(classes)]
    for groups, split in ((train, "train"), (val, "test")):
        kinds = _odd_kinds(groups, odd)
        for c, files in enumerate(groups):
            for i, path in enumerate(files):
                _write(path, _source(split, c, i).resize((size, size), Image.BILINEAR), kinds.get(path, "rgb"))
    for c, w in enumerate(wnids):
        boxes = "".join(f"{p.name}\t0\t0\t{size - 1}\t{size - 1}\n" for p in train[c])
        (root / "train" / w / f"{w}_boxes.txt").write_text(boxes)
    label = {p.name: wnids[c] for c, files in enumerate(val) for p in files}
    (root / "val" / "val_annotations.txt").write_text(
        "".join(f"val_{k}.JPEG\t{label[f'val_{k}.JPEG']}\t0\t0\t{size - 1}\t{size - 1}\n" for k in range(n_val)))
    _write(root / "test" / "images" / "test_0.JPEG", _source("test", 0, 999).resize((size, size)))
    return root


def make_imagenet(dst, classes: int = 4, train_per_class: int = 6, val_per_class: int = 3,
                  sizes: tuple[int, int] = (40, 96), odd: bool = True) -> Path:
    """``dst/imagenet/`` as ILSVRC-2012 after the usual val re-sort: train/<wnid>/<wnid>_<i>.JPEG and
    val/<wnid>/ILSVRC2012_val_<k>.JPEG, each image resized to its own size (``sizes`` per side)."""
    root = Path(dst) / "imagenet"
    wnids = WNIDS[:classes]
    rng = np.random.default_rng(0)
    train = [[root / "train" / w / f"{w}_{i}.JPEG" for i in range(train_per_class)] for w in wnids]
    val = [[root / "val" / w / f"ILSVRC2012_val_{c + classes * j + 1:08d}.JPEG" for j in range(val_per_class)]
           for c, w in enumerate(wnids)]
    for groups, split in ((train, "train"), (val, "test")):
        kinds = _odd_kinds(groups, odd)
        for c, files in enumerate(groups):
            for i, path in enumerate(files):
                w, h = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, 2))
                _write(path, _source(split, c, i).resize((w, h), Image.BILINEAR), kinds.get(path, "rgb"))
    return root


def link_imagenet(dst, classes: int, train_per_class: int, val_per_class: int, sources: list[Path]) -> Path:
    """A large ImageNet-layout tree of hard links to copies of a few ``sources`` (scan speed and
    memory); each copy takes at most LINKS_PER_FILE links (ext4 allows 65,000)."""
    root, spare = Path(dst) / "imagenet", Path(dst) / "sources"
    spare.mkdir(parents=True)
    n = 0
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                source = spare / f"{n // LINKS_PER_FILE}-{n % len(sources)}.JPEG"
                if not source.exists():
                    shutil.copyfile(sources[n % len(sources)], source)
                os.link(source, folder / f"n{c:08d}_{i}.JPEG")
                n += 1
    return root
