"""The folder data sets' layouts (layouts.py) on small real folders written from CIFAR-10-JPEG
(tests/folders.py): what a scan lists, each refusal in one line, the pre-flight check's sample (the
odd files ImageNet holds pass it), its per-process cache, and the provenance notes."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tracemalloc
from array import array
from pathlib import Path

import pytest

from conftest import BIN, REPO
from folders import CIFAR, WNIDS, link_imagenet, make_imagenet, make_tiny_imagenet
from cts_ray import config as C
from cts_ray import image_folder as I
from cts_ray import layouts as L


@pytest.fixture(autouse=True)
def _fresh_check_cache():
    L._check.cache_clear()
    yield
    L._check.cache_clear()


@pytest.fixture
def tiny(tmp_path) -> Path:
    return make_tiny_imagenet(tmp_path, classes=4, train_per_class=6, val_per_class=3)


@pytest.fixture
def imagenet(tmp_path) -> Path:
    return make_imagenet(tmp_path, classes=4, train_per_class=6, val_per_class=3)


def config(name: str, root, *more):
    return C.load(None, [f"data.name={name}", f"data.root={root}", *more])


# ---------------------------------------------------------------- what a scan lists

def _by_class(listing: L.Listing, split: str) -> list[list[str]]:
    return [[p for p, y in zip(listing.paths[split], listing.labels[split]) if y == c]
            for c in range(len(listing.classes))]


@pytest.mark.parametrize("name", ["tiny_imagenet", "imagenet"])
def test_scan_lists_sorted_classes_counts_and_labels(name, tiny, imagenet):
    root = tiny if name == "tiny_imagenet" else imagenet
    listing = L.scan(name, root)
    assert listing.classes == tuple(sorted(WNIDS[:4])) != WNIDS[:4]     # torchvision's indices: sorted wnids
    assert (listing.count("train"), listing.count("test")) == (24, 12)
    for split in L.SPLITS:
        labels = listing.labels[split]
        assert isinstance(labels, array) and labels.typecode == "i" and list(labels) == sorted(labels)
        assert [len(files) for files in _by_class(listing, split)] == [6 if split == "train" else 3] * 4
        assert all(files == sorted(files) for files in _by_class(listing, split))
        assert all((root / p).is_file() for p in listing.paths[split])
    assert not any(p.endswith("_boxes.txt") or p.startswith("test/") for p in listing.paths["train"] + listing.paths["test"])
    train = _by_class(listing, "train")
    folder = "train/{}/images/" if name == "tiny_imagenet" else "train/{}/"
    assert all(p.startswith(folder.format(w)) for w, files in zip(listing.classes, train) for p in files)


def test_tiny_imagenet_val_is_labelled_by_its_annotations(tiny):
    listing = L.scan("tiny_imagenet", tiny)
    wnid_of = dict(line.split("\t")[:2] for line in (tiny / "val" / "val_annotations.txt").read_text().splitlines())
    for path, label in zip(listing.paths["test"], listing.labels["test"]):
        assert path.startswith("val/images/") and listing.classes[label] == wnid_of[path.removeprefix("val/images/")]


def test_image_folder_scan_is_the_layouts_scan():
    ours, theirs = I.scan(CIFAR), L.scan("image_folder", CIFAR)
    assert ours.classes == theirs.classes and ours.stamp == theirs.stamp and ours.paths == theirs.paths
    assert (ours.count("train"), ours.count("test")) == (50000, 10000)
    assert ours.paths["train"][0] == "train/airplane/0000.jpg" and ours.labels["test"][-1] == 9


def test_stamp_and_key_follow_every_file(imagenet):
    first = L.scan("imagenet", imagenet)
    assert first.key(None) != first.key(64) and first.key(None) == L.scan("imagenet", imagenet).key(None)
    path = imagenet / first.paths["test"][5]
    os.utime(path, ns=(1, 1))                                   # same names, one mtime changed
    assert L.scan("imagenet", imagenet).stamp != first.stamp
    shutil.copy(path, path.with_name("extra.JPEG"))
    assert L.scan("imagenet", imagenet).count("test") == 13


# ---------------------------------------------------------------- refusals, one line each

def _annotations(root: Path, edit) -> None:
    f = root / "val" / "val_annotations.txt"
    f.write_text("".join(f"{line}\n" for line in edit(f.read_text().splitlines())))


TINY_DAMAGE = [
    ("no-wnids", lambda r: os.remove(r / "wnids.txt"), r"has no wnids.txt; expected the official tiny-imagenet-200/"),
    ("wnid-without-train", lambda r: shutil.rmtree(r / "train" / WNIDS[1]),
     rf"wnids.txt lists '{WNIDS[1]}' but there is no train/{WNIDS[1]}/ folder"),
    ("train-not-in-wnids", lambda r: (r / "train" / "n99999999" / "images").mkdir(parents=True),
     r"train/n99999999/ is not in wnids.txt"),
    ("annotation-of-missing-file", lambda r: os.remove(r / "val" / "images" / "val_3.JPEG"),
     r"val/val_annotations.txt line 4 names val/images/val_3.JPEG, which is missing"),
    ("annotation-with-unknown-wnid",
     lambda r: _annotations(r, lambda lines: [lines[0].replace(WNIDS[0], "n12345678"), *lines[1:]]),
     r"val/val_annotations.txt line 1 names wnid 'n12345678', which is not in wnids.txt"),
    ("val-image-without-annotation", lambda r: _annotations(r, lambda lines: lines[:-1]),
     r"val/images/val_11.JPEG has no line in val/val_annotations.txt"),
    ("empty-train-class", lambda r: [os.remove(p) for p in (r / "train" / WNIDS[2] / "images").iterdir()],
     rf"train/{WNIDS[2]}/images has no images"),
    ("empty-val-class", lambda r: _annotations(r, lambda lines: [line.replace(WNIDS[3], WNIDS[0]) for line in lines]),
     rf"val/ has no images of class '{WNIDS[3]}'"),
    ("non-image", lambda r: (r / "train" / WNIDS[0] / "images" / "notes.txt").write_text("x"),
     rf"train/{WNIDS[0]}/images/notes.txt is not an image"),
    ("unreadable-header", lambda r: (r / "train" / WNIDS[0] / "images" / f"{WNIDS[0]}_0.JPEG").write_bytes(b"junk"),
     rf"train/{WNIDS[0]}/images/{WNIDS[0]}_0.JPEG is not an image \("),
]
IMAGENET_DAMAGE = [
    ("flat-val", lambda r: shutil.copy(next((r / "val" / WNIDS[0]).iterdir()), r / "val" / "ILSVRC2012_val_00000099.JPEG"),
     r"val/ILSVRC2012_val_00000099.JPEG is a loose image: ImageNet's val/ is still flat; expected it re-sorted into "
     r"val/<wnid>/ class folders \(e.g. with the usual valprep.sh\)"),
    ("class-only-in-train", lambda r: shutil.copytree(r / "train" / WNIDS[0], r / "train" / "n99999999"),
     r"class 'n99999999' is in train/ but not in val/"),
    ("class-only-in-val", lambda r: shutil.rmtree(r / "train" / WNIDS[3]), rf"class '{WNIDS[3]}' is in val/ but not in train/"),
    ("empty-class", lambda r: [os.remove(p) for p in (r / "val" / WNIDS[1]).iterdir()], rf"val/{WNIDS[1]} has no images"),
    ("non-image", lambda r: (r / "val" / WNIDS[2] / "readme.md").write_text("x"), rf"val/{WNIDS[2]}/readme.md is not an image"),
    ("no-val", lambda r: shutil.rmtree(r / "val"), r"has no val/ folder; expected ILSVRC-2012"),
]


def _refused(name: str, root: Path, message: str) -> str:
    with pytest.raises(C.ConfigError, match=r"^data.root: .*" + message) as e:
        config(name, root)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("damage,message", [d[1:] for d in TINY_DAMAGE], ids=[d[0] for d in TINY_DAMAGE])
def test_bad_tiny_imagenet_folders_are_refused_in_one_line(tiny, damage, message):
    damage(tiny)
    _refused("tiny_imagenet", tiny, message)


@pytest.mark.parametrize("damage,message", [d[1:] for d in IMAGENET_DAMAGE], ids=[d[0] for d in IMAGENET_DAMAGE])
def test_bad_imagenet_folders_are_refused_in_one_line(imagenet, damage, message):
    damage(imagenet)
    _refused("imagenet", imagenet, message)


@pytest.mark.parametrize("name,damage,says", [
    ("tiny_imagenet", TINY_DAMAGE[3][1], "val/images/val_3.JPEG, which is missing"),
    ("imagenet", IMAGENET_DAMAGE[0][1], "val/ILSVRC2012_val_00000099.JPEG is a loose image"),
], ids=["tiny-missing-val-file", "imagenet-flat-val"])
def test_cts_ray_run_exits_2_with_the_one_line(name, damage, says, tiny, imagenet, tmp_path):
    root = tiny if name == "tiny_imagenet" else imagenet
    damage(root)
    out = tmp_path / "out"
    p = subprocess.run([str(BIN / "cts-ray"), "run", str(REPO / "configs" / "digits.yaml"), "--out", str(out),
                        "--set", f"data.name={name}", "--set", f"data.root={root}"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert lines[0].startswith("cts-ray: error: data.root: ") and says in lines[0], lines[0]
    assert not out.exists() or not any(out.iterdir())


def test_config_rules_for_the_folder_data_sets(imagenet):
    with pytest.raises(C.ConfigError, match=r"^data.root: required for data.name=tiny_imagenet; expected a folder "
                                            r"holding the official tiny-imagenet-200/ layout"):
        C.load(None, ["data.name=tiny_imagenet"])
    with pytest.raises(C.ConfigError, match=r"^data.download: true is impossible for data.name=imagenet"):
        config("imagenet", imagenet, "data.download=true")
    with pytest.raises(C.ConfigError, match=r"^data.image_size: applies to the folder data sets only \(image_folder, "
                                            r"tiny_imagenet, imagenet\), not digits"):
        C.load(None, ["data.image_size=32"])
    with pytest.raises(C.ConfigError, match=r"^data.root: folder '/nonexistent/imagenet' does not exist"):
        config("imagenet", "/nonexistent/imagenet")
    assert config("imagenet", imagenet, "data.image_size=32").data.image_size == 32


# ---------------------------------------------------------------- the pre-flight check

def _count_headers(monkeypatch) -> list[str]:
    opened = []
    real = L.header
    monkeypatch.setattr(L, "header", lambda path: opened.append(path) or real(path))
    return opened


@pytest.mark.parametrize("name", ["tiny_imagenet", "imagenet"])
def test_odd_files_pass_and_the_check_opens_only_its_sample(name, tiny, imagenet, monkeypatch):
    from PIL import Image
    root = tiny if name == "tiny_imagenet" else imagenet
    opened = _count_headers(monkeypatch)
    config(name, root)                                          # CMYK, greyscale, PNG-as-.JPEG, sizes varied
    assert len(opened) == 2 * 2 * 4                              # first and last of 4 classes, both splits
    kinds = set()
    for path in opened:
        with Image.open(path) as im:
            kinds.add((im.format, im.mode))
    assert {("JPEG", "CMYK"), ("JPEG", "L"), ("PNG", "RGB"), ("JPEG", "RGB")} <= kinds
    assert all(Path(p).suffix == ".JPEG" for p in opened)
    config(name, root)
    assert len(opened) == 16                                    # once per process while the folders stand
    folder = root / L.scan(name, root).paths["train"][0].rsplit("/", 1)[0]
    shutil.copy(opened[0], folder / "zz_added.JPEG")           # a new file: checked again
    config(name, root)
    assert len(opened) == 32


def test_image_folder_keeps_one_size_and_mode_unless_resized(tmp_path):
    root = make_imagenet(tmp_path, classes=2, train_per_class=2, val_per_class=2, odd=False)
    (root / "val").rename(root / "test")
    with pytest.raises(C.ConfigError, match=r"^data.root: images differ in size or mode"):
        config("image_folder", root)
    assert config("image_folder", root, "data.image_size=16").data.image_size == 16


# ---------------------------------------------------------------- size and notes

def test_a_listing_is_compact(tmp_path):
    """~100 bytes a file (a str and an int32 label): ImageNet's 1.28 M files in ~130 MB per process."""
    root = link_imagenet(tmp_path, classes=100, train_per_class=180, val_per_class=20,
                         sources=sorted((CIFAR / "train" / "cat").iterdir())[:4])
    tracemalloc.start()
    try:
        listing = L.scan("imagenet", root)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert listing.count("train") + listing.count("test") == 20_000
    assert held < 20_000 * 120, held


def test_notes_compare_with_the_official_release(tiny, imagenet):
    n = L.notes("tiny_imagenet", L.scan("tiny_imagenet", tiny))
    assert n["official"] == {"classes": 200, "train": 100_000, "test": 10_000}
    assert (n["classes"], n["train"], n["test"], n["differs"]) == (4, 24, 12, ["classes", "train", "test"])
    n = L.notes("imagenet", L.scan("imagenet", imagenet))
    assert n["official"] == {"classes": 1000, "train": 1_281_167, "test": 50_000} and n["stamp"]
    whole = L.Listing(Path("/x"), tuple(f"n{i:08d}" for i in range(200)), {"train": [""] * 100_000, "test": [""] * 10_000},
                      {"train": array("i"), "test": array("i")}, "0")
    assert L.notes("tiny_imagenet", whole)["differs"] == []
    assert "official" not in L.notes("image_folder", L.scan("image_folder", CIFAR))


def test_layouts_imports_no_torch():
    code = "import sys, cts_ray.layouts; print('torch' in sys.modules)"
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.stdout.strip() == "False", p.stderr
