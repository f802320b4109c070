"""Folder data sets: the user's image files on disk, never downloaded, in three layouts.

- ``image_folder``: torchvision's ImageFolder layout, ``train/<class>/`` and ``test/<class>/``.
- ``tiny_imagenet``: the official ``tiny-imagenet-200/`` release: ``wnids.txt``,
  ``train/<wnid>/images/*.JPEG``, ``val/images/*.JPEG`` labelled by ``val/val_annotations.txt``
  (``test/`` is unlabelled and ignored).
- ``imagenet``: ILSVRC-2012 as ``train/<wnid>/`` and ``val/<wnid>/`` (val re-sorted into class
  folders, as the usual ``valprep.sh`` does).

``scan`` lists a folder as a ``Listing``: classes sorted (torchvision's class indices), and per split
("test" is val for the two ImageNets) the image paths by class then file name, their labels, and a
stamp over every path, size and mtime (a changed, added or removed file changes it; keying on stat
data costs one directory scan, not a read of every image). The listing is compact (a list of str
and an ``array('i')`` per split: ~100 bytes a file) because streaming trials hold it in every
process. ``check`` is the pre-flight check config validation runs for every trial, so it scans and
opens only the headers of the first and last image of every class in each split: seconds at
ImageNet's size. Every refusal is one line, ``data.root: <the first problem>; expected <what>``.
"""
from __future__ import annotations

import bisect
import functools
import hashlib
import json
import os
from array import array
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from .errors import ConfigError

NAMES = ("image_folder", "tiny_imagenet", "imagenet")
EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
SPLITS = ("train", "test")   # a listing's splits; "test" is the folder val/ for the ImageNets
CACHE_VERSION = 1            # the decoded cache's format (image_folder.py): part of every key
EXPECTED = {
    "image_folder": "train/<class>/ and test/<class>/ image folders (torchvision's ImageFolder layout)",
    "tiny_imagenet": "the official tiny-imagenet-200/ layout (wnids.txt, train/<wnid>/images/*.JPEG, "
                     "val/images/*.JPEG and val/val_annotations.txt)",
    "imagenet": "ILSVRC-2012 as train/<wnid>/*.JPEG and val/<wnid>/*.JPEG class folders",
}
OFFICIAL = {   # the releases' counts; a folder that differs (e.g. a subset) is noted, never refused
    "tiny_imagenet": {"classes": 200, "train": 100_000, "test": 10_000},
    "imagenet": {"classes": 1000, "train": 1_281_167, "test": 50_000},
}
VAL_NOTES = "val/val_annotations.txt"


def _bad(msg: str) -> ConfigError:
    return ConfigError(f"data.root: {msg}")


@dataclass(frozen=True, eq=False)
class Listing:
    root: Path
    classes: tuple[str, ...]
    paths: dict    # "train"/"test" -> list[str], paths relative to root, by class then file name
    labels: dict   # "train"/"test" -> array('i') of class indices, aligned with paths
    stamp: str     # sha256 hex over every (split, path, size, mtime_ns) and the classes

    def key(self, image_size: Optional[int]) -> str:
        blob = json.dumps([CACHE_VERSION, image_size, self.stamp], separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def count(self, split: str) -> int:
        return len(self.paths[split])

    def span(self, split: str, label: int) -> tuple[int, int]:
        """The [start, stop) indices of class ``label`` in ``split`` (paths are sorted by class)."""
        labels = self.labels[split]
        return bisect.bisect_left(labels, label), bisect.bisect_right(labels, label)


class _Rows:
    """A listing as it is scanned: paths and labels per split, and the running stamp."""

    def __init__(self, classes) -> None:
        self.classes = tuple(classes)
        self.paths = {s: [] for s in SPLITS}
        self.labels = {s: array("i") for s in SPLITS}
        self.hash = hashlib.sha256(json.dumps(self.classes).encode())

    def add(self, split: str, label: int, rows: list) -> None:
        """``rows``: one class's (path, size, mtime_ns), sorted by path."""
        self.paths[split].extend(r[0] for r in rows)
        self.labels[split].extend(array("i", [label]) * len(rows))
        self.hash.update("".join(f"{split}\0{p}\0{s}\0{m}\n" for p, s, m in rows).encode())

    def listing(self, root: Path) -> Listing:
        return Listing(root, self.classes, self.paths, self.labels, self.hash.hexdigest())


# ---------------------------------------------------------------- scanning

def _entries(folder: Path) -> list:
    return sorted((e for e in os.scandir(folder) if not e.name.startswith(".")), key=lambda e: e.name)


def _images(folder: Path, rel: str, ignore: tuple = ()) -> list:
    """(path relative to root, size, mtime_ns) of every image in ``folder``, sorted; names ending in
    ``ignore`` are skipped, anything else that is not an image file is refused."""
    rows = []
    for e in _entries(folder):
        if ignore and e.name.endswith(ignore):
            continue
        path = f"{rel}/{e.name}"
        if e.is_dir():
            raise _bad(f"{path} is a folder; expected only image files in a class folder")
        if not e.name.lower().endswith(EXTENSIONS):
            raise _bad(f"{path} is not an image; expected image files ({', '.join(EXTENSIONS)})")
        st = e.stat()
        rows.append((path, st.st_size, st.st_mtime_ns))
    return rows


def _class_folders(root: Path, split: str, name: str) -> list[str]:
    expected = EXPECTED[name]
    if not (root / split).is_dir():
        raise _bad(f"{str(root)!r} has no {split}/ folder; expected {expected}")
    entries = _entries(root / split)
    loose = [e.name for e in entries if not e.is_dir()]
    if loose and name == "imagenet" and split == "val" and loose[0].lower().endswith(EXTENSIONS):
        raise _bad(f"val/{loose[0]} is a loose image: ImageNet's val/ is still flat; expected it re-sorted "
                   "into val/<wnid>/ class folders (e.g. with the usual valprep.sh)")
    if loose:
        raise _bad(f"{split}/{loose[0]} is not a class folder; expected {expected}")
    if not entries:
        raise _bad(f"{split}/ has no class folders; expected {expected}")
    return [e.name for e in entries]


def _listed(folders: list[Path], root: Path, ignore: tuple = ()) -> Iterator[list]:
    """``_images`` of each folder, in order, listed by threads: a file's stat waits on the disk (on a
    network filesystem ~0.1 ms, minutes for ImageNet one at a time), not on Python."""
    def one(folder: Path):
        try:
            return _images(folder, folder.relative_to(root).as_posix(), ignore)
        except Exception as e:   # raised below, in folder order, as a plain loop would
            return e
    # Every folder is listed before the first is yielded: a generator that held the pool while its
    # caller raised kept the threads until garbage collection, whose shutdown could hang the suite.
    with ThreadPoolExecutor(min(16, len(folders)) or 1) as pool:
        results = list(pool.map(one, folders))
    for found in results:
        if isinstance(found, Exception):
            raise found
        yield found


def _scan_class_folders(root: Path, name: str) -> Listing:
    """image_folder and imagenet: one class folder per class in both splits' folders."""
    folders = ("train", "test") if name == "image_folder" else ("train", "val")
    classes = {f: _class_folders(root, f, name) for f in folders}
    for a, b in (folders, folders[::-1]):
        extra = sorted(set(classes[a]) - set(classes[b]))
        if extra:
            raise _bad(f"class {extra[0]!r} is in {a}/ but not in {b}/; expected the same class folders in both")
    rows = _Rows(classes["train"])
    for split, folder in zip(SPLITS, folders):
        listed = _listed([root / folder / cls for cls in rows.classes], root)
        for label, (cls, found) in enumerate(zip(rows.classes, listed)):
            if not found:
                raise _bad(f"{folder}/{cls} has no images; expected at least one image per class")
            rows.add(split, label, found)
    return rows.listing(root)


def _wnids(root: Path) -> tuple[str, ...]:
    path = root / "wnids.txt"
    if not path.is_file():
        raise _bad(f"{str(root)!r} has no wnids.txt; expected {EXPECTED['tiny_imagenet']}")
    wnids = path.read_text().split()
    if not wnids:
        raise _bad("wnids.txt is empty; expected one wnid (class) per line")
    return tuple(sorted(set(wnids)))


def _scan_tiny(root: Path) -> Listing:
    rows = _Rows(_wnids(root))
    train = _class_folders(root, "train", "tiny_imagenet")
    missing = sorted(set(rows.classes) - set(train))
    if missing:
        raise _bad(f"wnids.txt lists {missing[0]!r} but there is no train/{missing[0]}/ folder; expected "
                   "train/<wnid>/images/ for every wnid in wnids.txt")
    extra = sorted(set(train) - set(rows.classes))
    if extra:
        raise _bad(f"train/{extra[0]}/ is not in wnids.txt; expected one train/<wnid>/ folder per wnid listed")
    folders = [root / "train" / wnid / "images" for wnid in rows.classes]
    lost = next((f for f in folders if not f.is_dir()), None)
    if lost is not None:
        raise _bad(f"train/{lost.parent.name}/ has no images/ folder; expected train/<wnid>/images/*.JPEG")
    listed = _listed(folders, root, ignore=("_boxes.txt",))   # boxes: part of the release
    for label, (wnid, found) in enumerate(zip(rows.classes, listed)):
        if not found:
            raise _bad(f"train/{wnid}/images has no images; expected at least one image per class")
        rows.add("train", label, found)
    for label, found in enumerate(_tiny_val(root, rows.classes)):
        rows.add("test", label, found)
    return rows.listing(root)


def _tiny_val(root: Path, classes: tuple[str, ...]) -> list[list]:
    """val/images/ split by class as val/val_annotations.txt labels it (file, wnid, box per line)."""
    if not (root / "val" / "images").is_dir():
        raise _bad(f"{str(root)!r} has no val/images/ folder; expected {EXPECTED['tiny_imagenet']}")
    if not (root / VAL_NOTES).is_file():
        raise _bad(f"{str(root)!r} has no {VAL_NOTES}; expected {EXPECTED['tiny_imagenet']}")
    unlabelled = {r[0]: r for r in _images(root / "val" / "images", "val/images")}
    label_of = {w: i for i, w in enumerate(classes)}
    by_class = [[] for _ in classes]
    for n, line in enumerate((root / VAL_NOTES).read_text().splitlines(), 1):
        fields = [f.strip() for f in line.split("\t")]
        if not line.strip():
            continue
        if len(fields) < 2:
            raise _bad(f"{VAL_NOTES} line {n} is {line.strip()!r}; expected file<TAB>wnid<TAB>box")
        path, wnid = f"val/images/{fields[0]}", fields[1]
        if wnid not in label_of:
            raise _bad(f"{VAL_NOTES} line {n} names wnid {wnid!r}, which is not in wnids.txt; expected "
                       "the wnids of wnids.txt only")
        if path not in unlabelled:
            raise _bad(f"{VAL_NOTES} line {n} names {path}, which is missing or named twice; expected one "
                       "line per image in val/images/")
        by_class[label_of[wnid]].append(unlabelled.pop(path))
    if unlabelled:
        raise _bad(f"{min(unlabelled)} has no line in {VAL_NOTES}; expected one line per image in val/images/")
    empty = next((w for w, found in zip(classes, by_class) if not found), None)
    if empty is not None:
        raise _bad(f"val/ has no images of class {empty!r}; expected at least one image per class")
    return [sorted(found) for found in by_class]


SCANS: dict[str, Callable[[Path], Listing]] = {
    "image_folder": lambda root: _scan_class_folders(root, "image_folder"),
    "tiny_imagenet": _scan_tiny,
    "imagenet": lambda root: _scan_class_folders(root, "imagenet"),
}


def scan(name: str, root) -> Listing:
    """The folder's listing in layout ``name``, or a ConfigError naming the first thing wrong with it."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise _bad(f"folder {str(root)!r} does not exist; expected {EXPECTED[name]}")
    return SCANS[name](root)


# ---------------------------------------------------------------- the pre-flight check

def header(path: Path) -> tuple[tuple[int, int], str]:
    from PIL import Image
    with Image.open(path) as im:   # lazy: reads the header only
        return im.size, im.mode


def describe(size_mode) -> str:
    (w, h), mode = size_mode
    return f"{w}x{h} {mode}"


def sample(listing: Listing) -> list[str]:
    """The first and last image of every class in each split: what the check opens."""
    out = []
    for split in SPLITS:
        for label in range(len(listing.classes)):
            start, stop = listing.span(split, label)
            out += [listing.paths[split][start], listing.paths[split][stop - 1]]
    return list(dict.fromkeys(out))


def check(name: str, root, image_size: Optional[int] = None) -> None:
    """The pre-flight check (module docstring): raises a one-line ConfigError for a bad folder."""
    root = Path(root).expanduser()
    _check(name, str(root), image_size, _folder_stamp(name, root))


def _watched(name: str, root: Path) -> list[Path]:
    """The folders (and label files) whose mtimes change when an image is added, removed or renamed."""
    if name == "tiny_imagenet":
        train = root / "train"
        wnids = [Path(e.path) / "images" for e in os.scandir(train) if e.is_dir()] if train.is_dir() else []
        return [root, root / "wnids.txt", train, *wnids, root / "val", root / "val" / "images", root / VAL_NOTES]
    splits = [root / s for s in (("train", "test") if name == "image_folder" else ("train", "val"))]
    return [root, *splits, *(Path(e.path) for s in splits if s.is_dir() for e in os.scandir(s) if e.is_dir())]


def _folder_stamp(name: str, root: Path):
    """mtimes of what ``_watched`` names, so a sweep checks a folder once per process, not per trial."""
    try:
        return tuple(sorted((str(p), p.stat().st_mtime_ns) for p in _watched(name, root) if p.exists()))
    except OSError:
        return None


@functools.lru_cache(maxsize=32)
def _check(name: str, root: str, image_size: Optional[int], stamp) -> None:
    listing = scan(name, root)
    seen = {}
    for rel in sample(listing):
        try:
            seen[rel] = header(listing.root / rel)
        except (OSError, ValueError, SyntaxError) as e:   # PIL's errors for a file it cannot read
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise _bad(f"{rel} is not an image ({why}); expected image files only") from None
    # the two ImageNets hold sizes and modes that vary (CMYK, greyscale): always resized to RGB
    if name == "image_folder" and image_size is None and len(set(seen.values())) > 1:
        (a, sa), (b, sb) = [next((r, v) for r, v in seen.items() if v == x) for x in list(dict.fromkeys(seen.values()))[:2]]
        raise _bad(f"images differ in size or mode ({a} is {describe(sa)}, {b} is {describe(sb)}); "
                   "expected one size and mode, or set data.image_size")


# ---------------------------------------------------------------- provenance

def notes(name: str, listing: Listing) -> dict:
    """What a run's folder held, against the official release where there is one (a subset is fine)."""
    counts = {"classes": len(listing.classes), "train": listing.count("train"), "test": listing.count("test")}
    out = {"layout": name, **counts, "stamp": listing.stamp}
    if name in OFFICIAL:
        official = OFFICIAL[name]
        out["official"] = official
        out["differs"] = [k for k in counts if counts[k] != official[k]]   # []: the whole release
    return out
