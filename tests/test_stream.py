"""Streamed folder data (``data.stream``) on real files: small folders in the three layouts written
from CIFAR-10-JPEG (tests/folders.py, ImageNet's odd files included). The streamed path must give
what the in-memory path gives — the same examples in the same order, the same augmentation, the
same evaluation — whatever the number of loader processes; a file that stops decoding fails the run
in one line naming it, and the run continues from its saved epochs once the file is fixed."""
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA
from cts_ray import config as C
from cts_ray import data as D
from cts_ray import image_folder as I
from cts_ray import models
from cts_ray.errors import DataFileError
from cts_ray.train import evaluate
from folders import make_imagenet, make_tiny_imagenet

CIFAR = SHARED_DATA / "CIFAR-10-JPEG"


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    old = os.environ.get("CTS_RAY_CACHE")
    os.environ["CTS_RAY_CACHE"] = str(tmp_path_factory.mktemp("cts-ray-cache"))
    I._LOADED.clear()
    yield
    I._LOADED.clear()
    os.environ.pop("CTS_RAY_CACHE") if old is None else os.environ.__setitem__("CTS_RAY_CACHE", old)


def _image_folder(dst: Path, classes=("bird", "cat", "ship"), train=12, test=6) -> Path:
    for split, n in (("train", train), ("test", test)):
        for c in classes:
            (dst / split / c).mkdir(parents=True)
            for i in range(n):
                shutil.copy(CIFAR / split / c / f"{i:04d}.jpg", dst / split / c / f"{i:04d}.jpg")
    return dst


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    base = tmp_path_factory.mktemp("layouts")
    return {"image_folder": (_image_folder(base / "folder"), None),
            "tiny_imagenet": (make_tiny_imagenet(base / "tiny", classes=3, train_per_class=8, val_per_class=4), None),
            "imagenet": (make_imagenet(base / "imagenet", classes=3, train_per_class=8, val_per_class=4), 32)}


def _data(name, root, image_size, stream, workers=2, subset=None):
    sets = [f"data.name={name}", f"data.root={root}", f"data.stream={stream}", f"data.workers={workers}"]
    sets += [f"data.image_size={image_size}"] if image_size else []
    sets += [f"data.subset={subset}"] if subset else []
    return D.load(C.load(None, sets).data)


def _epoch(d, seed, **kw):
    return list(d.train_batches(8, torch.Generator().manual_seed(seed), indices=True, **kw))


@pytest.mark.parametrize("name", ["image_folder", "tiny_imagenet", "imagenet"])
def test_streamed_batches_are_the_in_memory_ones(layouts, name):
    root, size = layouts[name]
    held, streamed = _data(name, root, size, "off"), _data(name, root, size, "on")
    assert not held.streamed and streamed.streamed
    assert (held.n_train, held.n_test, held.num_classes, held.input_shape, held.augment) == \
           (streamed.n_train, streamed.n_test, streamed.num_classes, streamed.input_shape, streamed.augment)
    assert held.mean == streamed.mean and held.std == streamed.std
    for seed in (0, 1):
        for kw in ({}, {"augment": False}):
            a, b = _epoch(held, seed, **kw), _epoch(streamed, seed, **kw)
            assert len(a) == len(b) == held.n_train // 8
            for (xa, ya, ia), (xb, yb, ib) in zip(a, b):
                assert torch.equal(ia, ib) and torch.equal(ya, yb) and torch.equal(xa, xb)
    ta, tb = list(held.test_batches()), list(streamed.test_batches())
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(ta, tb))
    # a data-parallel worker's rows of each test batch: the same on both paths, all of them over the ranks
    shards = [[list(d.test_batches(4, shard=(r, 2))) for d in (held, streamed)] for r in (0, 1)]
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for a, b in shards for (xa, ya), (xb, yb) in zip(a, b))
    assert sorted(torch.cat([y for a, _ in shards for _, y in a]).tolist()) == sorted(held.test_y.tolist())
    idx = torch.tensor([5, 0, 3])
    assert all(torch.equal(u, v) for u, v in zip(held.examples(idx), streamed.examples(idx)))
    model = models.from_config(C.ModelConfig(name="conv4"), held.input_shape, held.num_classes)
    assert evaluate(model, held) == evaluate(model, streamed)


def test_an_epoch_takes_every_example_once_in_the_seeded_order(layouts):
    root, _ = layouts["tiny_imagenet"]
    d = _data("tiny_imagenet", root, None, "on")   # 24 training images: 3 batches of 8
    for seed in (0, 1):
        seen = torch.cat([i for _, _, i in _epoch(d, seed)])
        assert sorted(seen.tolist()) == list(range(d.n_train))
        assert torch.equal(seen, torch.randperm(d.n_train, generator=torch.Generator().manual_seed(seed)))
    assert not torch.equal(*(torch.cat([i for _, _, i in _epoch(d, s)]) for s in (0, 1)))


def test_imagenet_recipe_crops_are_seeded_and_independent_of_the_workers(layouts):
    """ImageNet at its recipe's 224 px: random-resized crops made in the loader processes, from
    images of every size and ImageNet's odd files (CMYK, greyscale, a PNG named .JPEG)."""
    root, _ = layouts["imagenet"]
    one, two = _data("imagenet", root, None, "auto", workers=0), _data("imagenet", root, None, "auto", workers=2)
    assert one.streamed and one.input_shape == (3, 224, 224)   # auto: 224 px crops cannot be held
    a, b = _epoch(one, 0), _epoch(two, 0)
    assert all(torch.equal(xa, xb) and torch.equal(ia, ib) for (xa, _, ia), (xb, _, ib) in zip(a, b))
    assert a[0][0].shape == (8, 3, 224, 224) and a[0][0].dtype == torch.float32
    assert not torch.equal(a[0][0], _epoch(one, 1)[0][0])         # another epoch, other crops
    plain = _epoch(one, 0, augment=False)
    assert torch.equal(plain[0][2], a[0][2]) and not torch.equal(plain[0][0], a[0][0])
    t1, t2 = list(one.test_batches()), list(two.test_batches())
    assert t1[0][0].shape == (12, 3, 224, 224) and torch.equal(t1[0][0], t2[0][0])
    with pytest.raises(C.ConfigError, match="data.stream: off cannot hold imagenet"):
        _data("imagenet", root, None, "off")


def test_a_file_that_stops_decoding_fails_in_one_line_naming_it(layouts, tmp_path):
    root = make_tiny_imagenet(tmp_path, classes=2, train_per_class=8, val_per_class=2, odd=False)
    d = _data("tiny_imagenet", root, None, "on")
    bad = root / d.train_paths[3]
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(DataFileError) as e:
        _epoch(d, 0)
    msg = str(e.value)
    assert "\n" not in msg and d.train_paths[3] in msg and msg.startswith("data.root: ")


def _cfg(root, *more):
    return C.load(None, ["data.name=tiny_imagenet", f"data.root={root}", "data.stream=on", "data.workers=1",
                         "model.name=conv4", "training.epochs=3", "training.batch_size=8", "training.milestones=[]",
                         "training.dense_baseline=false", "training.lr=0.01", "search.point=init", *more])


def test_a_run_a_file_failed_continues_from_its_saved_epoch_once_the_file_is_fixed(tmp_path):
    """The file breaks after the first retraining epoch; the run fails in one line; with the file
    restored, resuming from the saved progress ends exactly where an unbroken run ends."""
    from cts_ray import pipeline
    root = make_tiny_imagenet(tmp_path / "data", classes=2, train_per_class=8, val_per_class=4, odd=False)
    cfg = _cfg(root, "search.method=snip")
    whole = pipeline.run(cfg, tmp_path / "whole", progress=False)
    victim = root / "train" / "n02691156" / "images" / "n02691156_2.JPEG"
    good = victim.read_bytes()
    saved = []

    def on_record(record, progress):
        if progress is not None:
            saved.append(pipeline.Progress.from_state(progress.to_state()))
            if record.get("phase") == "retrain" and record.get("epoch") == 1:
                victim.write_bytes(good[:40])   # cut short: it no longer decodes
    with pytest.raises(DataFileError, match="n02691156_2.JPEG"):
        pipeline.run(cfg, tmp_path / "broken", progress=False, on_record=on_record)
    victim.write_bytes(good)
    done = [r["epoch"] for r in saved[-1].records if r.get("phase") == "retrain"]
    assert done == [1]
    resumed = pipeline.run(cfg, tmp_path / "broken", overwrite=True, progress=False, resume=saved[-1])
    assert resumed["test_accuracy"] == whole["test_accuracy"] and resumed["mask_sha256"] == whole["mask_sha256"]


# ---------------------------------------------------------------- end to end: `cts-ray run` and a sweep

E2E = ["data.stream=on", "data.workers=1", "model.name=conv4", "training.epochs=2", "training.batch_size=8",
       "training.milestones=[]", "training.lr=0.01", "training.dense_baseline=false", "search.density=0.5",
       "search.ltr_fraction=0.3", "search.length=0.5", "resources.threads=1"]


@pytest.fixture(scope="module")
def small_layouts(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    return {"tiny_imagenet": [f"data.root={make_tiny_imagenet(base, classes=2, train_per_class=8, val_per_class=4)}"],
            "imagenet": [f"data.root={make_imagenet(base, classes=2, train_per_class=8, val_per_class=4)}",
                         "data.image_size=32"]}


@pytest.mark.parametrize("name,method", [("tiny_imagenet", "cts"), ("imagenet", "ltr"), ("imagenet", "snip")])
def test_cts_run_streams_each_layout_end_to_end(small_layouts, tmp_path, name, method):
    from conftest import BIN
    import json
    import subprocess
    sets = [f"data.name={name}", *small_layouts[name], *E2E, f"search.method={method}"]
    p = subprocess.run([str(BIN / "cts-ray"), "run", *sum((["--set", s] for s in sets), []), "--out",
                        str(tmp_path / "run"), "--quiet"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data"]["streamed"] is True and summary["data"]["digest"].startswith("files-")
    assert summary["data"]["num_classes"] == 2 and summary["method"] == method
    assert summary["data"]["files"]["official"]["classes"] in (200, 1000)
    assert 0 < summary["achieved_density"] <= 0.5 and summary["test_accuracy"] is not None


@pytest.mark.parametrize("name", ["tiny_imagenet", "imagenet"])
def test_a_sweep_of_cts_ltr_and_snip_streams_each_layout(ray_cluster, small_layouts, tmp_path, name):
    from conftest import _run, _sweep_file
    from cts_ray.sweep import tables
    sets = dict(s.split("=", 1) for s in [f"data.name={name}", *small_layouts[name], *E2E, "resources.cpus=1"])
    sets = {k: C.parse_override(f"{k}={v}")[1] for k, v in sets.items()}
    f = _sweep_file(tmp_path, f"stream_{name}", {"set": sets, "grid": {"search.method": ["cts", "ltr", "snip"]}})
    _run([f, "--address", ray_cluster, "--quiet"], tmp_path)
    trials = tables.read(tmp_path / "sweeps" / f"stream_{name}", "trials").to_pylist()
    assert sorted(t["method"] for t in trials) == ["cts", "ltr", "snip"]
    assert {t["status"] for t in trials} == {"finished"}


def test_a_streamed_trials_memory_does_not_grow_with_the_folder(tmp_path):
    """`bench data`'s bound (100,000 images within 150 MB of 10,000) at a fifth of the size: a
    `cts-ray run` streaming 20,000 images may peak at most 18,000 x 150 MB / 90,000 = 30 MB above
    one streaming 2,000 (the kernel's high-water mark of its RSS). Holding the decoded training set
    would cost 20,000 x 12 KB = 240 MB; before the fixed mmap threshold the heap kept ~1 MB a step.
    The folders' mean/std are computed first: at the bench's sizes that pass decodes 10,000 images
    for either folder (a sample beyond 50,000), here it would not."""
    import sys
    from conftest import REPO
    sys.path.insert(0, str(REPO))
    from bench import stream as bench_stream
    peaks = []
    for n in (2_000, 20_000):
        folder = bench_stream._folder(CIFAR, tmp_path / f"f{n}", n, 500)
        I.folder("image_folder", folder, None, rescan=True).stats()
        peaks.append(bench_stream.peak_rss(folder, tmp_path / f"run{n}")["main"])
    assert peaks[1] - peaks[0] <= 18_000 * bench_stream.RSS_TARGET_MB / 90_000, peaks


@pytest.mark.parametrize("name,stream", [("tiny_imagenet", "off"), ("tiny_imagenet", "on"), ("image_folder", "on"),
                                         ("imagenet", "on")])
def test_each_data_parallel_shard_is_its_rows_of_the_global_batch(layouts, name, stream):
    """A global batch is the same examples, augmented the same, whatever the number of workers."""
    root, size = layouts[name]
    d = _data(name, root, size if name != "imagenet" else None, stream)
    whole = _epoch(d, 3)
    for world in (2, 4):
        shards = [_epoch(d, 3, shard=(rank, world)) for rank in range(world)]
        for step, (x, y, i) in enumerate(whole):
            assert torch.equal(torch.cat([s[step][2] for s in shards]), i)
            assert torch.equal(torch.cat([s[step][1] for s in shards]), y)
            assert torch.allclose(torch.cat([s[step][0] for s in shards]), x, atol=1e-6)
    with pytest.raises(ValueError, match="not a multiple of the 3 workers"):
        next(d.train_batches(8, torch.Generator(), shard=(0, 3)))


def test_a_trial_a_data_file_failed_is_retried_from_its_saved_epochs():
    """`--retry-failed` drops a failed trial's saved progress, except where a data file failed it."""
    from cts_ray.sweep.resume import RETRY_FAILED, afresh
    rows = [{"trial_id": "a", "status": "error", "error": "RuntimeError: boom"},
            {"trial_id": "b", "status": "error", "error": "DataFileError: data.root: train/x.JPEG cannot be decoded"},
            {"trial_id": "c", "status": "diverged", "error": "retrain: training loss became nan"},
            {"trial_id": "d", "status": "finished", "error": None}]
    assert afresh(rows, RETRY_FAILED) == ["a", "c"]
