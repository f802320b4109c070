"""``data.name: image_folder`` on real images: CIFAR-10-JPEG from ../shared/datasets (counts, classes
and channel statistics against its SOURCES.md; a real ResNet-20 CTS ticket through `cts-ray run`),
and tiny folders written here for every way a folder can be bad.

The decoded cache goes to one temporary folder for the session ($CTS_RAY_CACHE), so CIFAR-10-JPEG
is decoded once per test session (~15 s on an idle core, the slowest step here) and read back from
the cache afterwards, as a sweep's trials do."""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import BIN, REPO, SHARED_DATA
from cts_ray import config as C
from cts_ray import data as D
from cts_ray import image_folder as I

CIFAR = SHARED_DATA / "CIFAR-10-JPEG"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN, STD = (0.4913, 0.4821, 0.4465), (0.2452, 0.2428, 0.2606)   # SOURCES.md, training split


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """Each module's own decoded cache, also seen by the `cts-ray run` subprocess."""
    old = os.environ.get("CTS_RAY_CACHE")
    os.environ["CTS_RAY_CACHE"] = str(tmp_path_factory.mktemp("cts-ray-cache"))
    I._LOADED.clear()
    I._check.cache_clear()
    yield Path(os.environ["CTS_RAY_CACHE"])
    I._LOADED.clear()
    I._check.cache_clear()
    if old is None:
        os.environ.pop("CTS_RAY_CACHE")
    else:
        os.environ["CTS_RAY_CACHE"] = old


def config(root, *more):
    return C.load(None, ["data.name=image_folder", f"data.root={root}", *more])


# ---------------------------------------------------------------- CIFAR-10-JPEG (real)

def test_cifar10_jpeg_counts_classes_and_channel_statistics(cache):
    assert CIFAR.is_dir(), f"CIFAR-10-JPEG missing under {SHARED_DATA}"
    cfg = config(CIFAR)                                        # the pre-flight check passes
    d = D.load(cfg.data)
    assert (d.n_train, d.n_test, d.num_classes, d.input_shape, d.augment) == (50000, 10000, 10, (3, 32, 32), True)
    assert torch.bincount(d.train_y).tolist() == [5000] * 10 and torch.bincount(d.test_y).tolist() == [1000] * 10
    assert torch.bincount(d.test_y[:500]).min() > 25        # test order shuffled: the first 500 hold every class
    arrays = I.load(CIFAR)
    assert arrays.classes == CLASSES and arrays.train_x.dtype == torch.uint8
    for ours, theirs in zip(d.mean, MEAN):
        assert abs(ours - theirs) < 1e-4
    for ours, theirs in zip(d.std, STD):
        assert abs(ours - theirs) < 1e-4
    assert torch.allclose(d.train_x.mean((0, 2, 3)), torch.zeros(3), atol=1e-3)   # normalised with them
    assert torch.allclose(d.train_x.std((0, 2, 3)), torch.ones(3), atol=1e-3)
    # the first training image of class 0 is that JPEG, decoded
    first = np.array(Image.open(CIFAR / "train" / "airplane" / sorted(os.listdir(CIFAR / "train" / "airplane"))[0]))
    assert torch.equal(arrays.train_x[0], torch.from_numpy(first).permute(2, 0, 1))
    # cached outside the data folder, and read back identically
    assert [p.suffix for p in (cache / "image_folder").glob("*.pt")] == [".pt"]
    I._LOADED.clear()
    again = I.load(CIFAR)
    assert torch.equal(again.test_x, arrays.test_x) and again.mean == arrays.mean


def test_resnet20_cts_ticket_on_cifar10_jpeg_through_cts_ray_run(tmp_path, cache):
    out = tmp_path / "run"
    args = ["run", str(REPO / "configs" / "cifar10_resnet20.yaml"), "--out", str(out), "--quiet",
            "--set", "data.name=image_folder", "--set", f"data.root={CIFAR}",
            "--set", "data.subset=512", "--set", "data.test_subset=500", "--set", "training.epochs=4",
            "--set", "training.milestones=[2, 3]", "--set", "search.rewind_epochs=1",
            "--set", "resources.device=cpu", "--set", "resources.threads=2"]
    p = subprocess.run([str(BIN / "cts-ray"), *args], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "CTS_RAY_CACHE": str(cache)})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert (s["dataset"], s["model"], s["method"]) == ("image_folder", "resnet20", "cts")
    assert s["prunable_weights"] == 291376                      # 3x3 shortcuts, the authors' ResNet-20
    assert s["kept_weights"] == round(0.0074 * 291376) and abs(s["achieved_density"] - 0.0074) < 1e-5
    assert s["data"]["train_examples"] == 512 and s["data"]["test_examples"] == 500
    assert all(abs(a - b) < 1e-4 for a, b in zip(s["data"]["mean"], MEAN))
    assert 0 <= s["test_accuracy"] <= 1 and s["search_seconds"] > 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records] == ["dense"] + ["search"] * 2 + ["retrain"] * 3
    state = torch.load(out / "search_point.pt", weights_only=True)
    assert not any("running" in k for k in state)               # batchnorm: batch
    assert state["blocks.3.shortcut.0.weight"].shape == (32, 16, 3, 3)
    from cts_ray import pipeline
    r = pipeline.evaluate_run(out)   # `cts-ray eval`: the model rebuilt with the run's batchnorm and shortcut
    assert abs(r["test_accuracy"] - s["test_accuracy"]) <= 1 / 500, (r, s["test_accuracy"])


# ---------------------------------------------------------------- bad folders, one line each

def png(path: Path, size=(8, 8), mode="RGB", seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def good(root: Path, n=3) -> Path:
    for s, split in enumerate(("train", "test")):
        for c, name in enumerate(("a", "b")):
            for i in range(n):
                png(root / split / name / f"{i}.png", seed=100 * s + 10 * c + i)
    return root


def test_a_good_tiny_folder_loads(tmp_path):
    d = D.load(config(good(tmp_path / "ok")).data)
    assert (d.n_train, d.n_test, d.num_classes, d.input_shape, d.augment) == (6, 6, 2, (3, 8, 8), False)
    assert d.train_y.tolist() == [0, 0, 0, 1, 1, 1] and sorted(d.test_y.tolist()) == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("damage,message", [
    (lambda r: os.rename(r / "test", r / "tests"), r"has no test/ folder"),
    (lambda r: png(r / "train" / "c" / "0.png"), r"class 'c' is in train/ but not in test/"),
    (lambda r: [os.remove(p) for p in (r / "test" / "b").iterdir()], r"test/b has no images"),
    (lambda r: (r / "train" / "a" / "notes.txt").write_text("x"), r"train/a/notes.txt is not an image"),
    (lambda r: (r / "train" / "a" / "0.png").write_bytes(b"not a png"), r"train/a/0.png is not an image"),
    (lambda r: png(r / "train" / "b" / "2.png", size=(9, 8)), r"images differ in size or mode"),
    (lambda r: png(r / "test" / "a" / "0.png", mode="L"), r"images differ in size or mode"),
    (lambda r: (r / "train" / "loose.png").write_bytes(b""), r"train/loose.png is not a class folder"),
])
def test_bad_folders_are_refused_before_any_work_in_one_line(tmp_path, damage, message):
    root = good(tmp_path / "bad")
    damage(root)
    with pytest.raises(C.ConfigError, match=r"^data.root: .*" + message) as e:
        config(root)
    assert "\n" not in str(e.value)


def test_image_size_accepts_mixed_sizes_and_modes(tmp_path):
    root = good(tmp_path / "mixed")
    png(root / "train" / "b" / "2.png", size=(9, 5))
    png(root / "test" / "a" / "0.png", mode="L")
    d = D.load(config(root, "data.image_size=4").data)
    assert d.input_shape == (3, 4, 4) and d.n_train == 6


def test_what_the_check_does_not_sample_the_loader_names_in_one_line(tmp_path):
    # The check opens the first and last image of each class; the loader decodes all and names the rest.
    root = good(tmp_path / "late")
    png(root / "train" / "a" / "1.png", size=(9, 8))
    cfg = config(root)                                          # passes the pre-flight check
    with pytest.raises(C.ConfigError, match=r"^data.root: train/a/1.png is 9x8 RGB, others 8x8 RGB") as e:
        D.load(cfg.data)
    assert "\n" not in str(e.value)
    png(root / "train" / "a" / "1.png")                         # right size, then cut short
    (root / "train" / "a" / "1.png").write_bytes((root / "train" / "a" / "1.png").read_bytes()[:60])
    with pytest.raises(C.ConfigError, match=r"^data.root: train/a/1.png cannot be decoded"):
        D.load(config(root).data)


def test_cache_is_keyed_by_content_and_never_written_into_the_data_folder(tmp_path, cache):
    root = good(tmp_path / "keyed")
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    first = I.load(root)
    png(root / "test" / "b" / "1.png", seed=999)                # new content (size and mtime change key)
    os.utime(root / "test" / "b" / "1.png", ns=(1, 1))
    second = I.load(root)
    assert not torch.equal(first.test_x, second.test_x)
    assert torch.equal(second.test_x[4], torch.from_numpy(np.array(Image.open(root / "test" / "b" / "1.png"))).permute(2, 0, 1))
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    assert I.scan(root).key(None) != I.scan(root).key(4)
    assert not list((cache / "image_folder").glob("*.tmp-*"))   # written by rename only
