"""cts_ray.data on real data: scikit-learn's digits, MNIST from ../shared/datasets, and CIFAR-10/100
folders written here in torchvision's on-disk format (tiny, so only the md5 check is bypassed)."""
import gzip
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cts_ray import data as D
from cts_ray.config import ConfigError, DataConfig

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- digits

def test_digits_read_without_scikit_learn_are_its_load_digits_and_split():
    """read_digits reads scikit-learn's file and the kept split (digits_split.py): the same tensors,
    in the same order, as load_digits and its stratified train_test_split (seed 0), which it once
    called; this fails when scikit-learn changes either."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    tr, te = train_test_split(np.arange(len(d.target)), test_size=360, random_state=0, stratify=d.target)
    x = torch.tensor(d.images, dtype=torch.float32).div_(16).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.int64)
    expected = (x[tr], y[tr], x[te], y[te])
    assert all(torch.equal(a, b) for a, b in zip(D.read_digits(), expected))


def test_digits_shapes_split_and_normalisation():
    d = D.load(DataConfig(name="digits"))
    assert d.train_x.shape == (1437, 1, 8, 8) and d.test_x.shape == (360, 1, 8, 8)
    assert (d.n_train, d.n_test, d.num_classes, d.input_shape) == (1437, 360, 10, (1, 8, 8))
    assert d.train_x.dtype == torch.float32 and d.train_y.dtype == torch.int64
    assert set(d.train_y.tolist()) == set(range(10)) and not d.augment
    assert abs(d.train_x.mean().item()) < 1e-3 and abs(d.train_x.std().item() - 1) < 1e-3
    D._load_cpu.cache_clear()  # a fresh read gives the same fixed split
    again = D.load(DataConfig(name="digits"))
    assert torch.equal(d.train_x, again.train_x) and torch.equal(d.test_y, again.test_y)


def test_subsets_and_augment_option():
    d = D.load(DataConfig(name="digits", subset=100, test_subset=50, augment="on"))
    assert (d.n_train, d.n_test, d.augment) == (100, 50, True)
    full = D.load(DataConfig(name="digits"))
    assert torch.equal(d.test_x, full.test_x[:50])
    assert torch.equal(D.load(DataConfig(name="digits", subset=100)).train_x, d.train_x)
    with pytest.raises(ConfigError, match="^data.subset"):
        D.load(DataConfig(name="digits", subset=5000))


# ---------------------------------------------------------------- MNIST (real files)

@pytest.fixture(scope="module")
def mnist():
    return D.load(DataConfig(name="mnist", root=str(SHARED)))


def test_mnist_real(mnist):
    assert mnist.train_x.shape == (60000, 1, 28, 28) and mnist.test_x.shape == (10000, 1, 28, 28)
    assert mnist.train_y.min() == 0 and mnist.train_y.max() == 9 and mnist.num_classes == 10
    assert mnist.train_y[:8].tolist() == [5, 0, 4, 1, 9, 2, 1, 3]  # the well-known first labels
    assert abs(mnist.train_x.mean().item()) < 0.01 and abs(mnist.train_x.std().item() - 1) < 0.01
    sub = D.load(DataConfig(name="mnist", root=str(SHARED), subset=1000))
    assert sub.n_train == 1000 and sub.n_test == 10000
    assert torch.equal(sub.train_x, D.load(DataConfig(name="mnist", root=str(SHARED), subset=1000)).train_x)
    assert D._load_cpu.cache_info().hits >= 2  # read from disk once


def test_mnist_gz_reader_matches_torchvision(tmp_path, mnist):
    # The shared copy holds only the official .gz files; torchvision 0.29 reads the extracted ones.
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in (SHARED / "MNIST" / "raw").glob("*-ubyte.gz"):  # torchvision checks all four exist
        with gzip.open(gz) as src, open(raw / gz.stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    import torchvision
    tv_train, tv_test = (torchvision.datasets.MNIST(str(tmp_path), train=t, download=False) for t in (True, False))
    assert torch.equal(mnist.train_y, tv_train.targets) and torch.equal(mnist.test_y, tv_test.targets)
    mean, std = D.DATASETS["mnist"].mean[0], D.DATASETS["mnist"].std[0]
    pixels = lambda x: ((x * std + mean) * 255).round().to(torch.uint8).squeeze(1)
    assert torch.equal(pixels(mnist.train_x), tv_train.data) and torch.equal(pixels(mnist.test_x), tv_test.data)


@pytest.mark.parametrize("root", ["empty", "missing", None])
def test_missing_root_is_config_error(tmp_path, root):
    root = {"empty": str(tmp_path), "missing": str(tmp_path / "nope"), None: None}[root]
    with pytest.raises(ConfigError, match="^data.root") as e:
        D.load(DataConfig(name="mnist", root=root))
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- batches

def test_train_batches_order_coverage_and_drop_last():
    d = D.load(DataConfig(name="digits"))  # 1437 training examples
    ys = lambda seed, **kw: [y for _, y in d.train_batches(100, gen(seed), **kw)]
    a, b, c = ys(1), ys(1), ys(2)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))
    assert len(a) == d.steps_per_epoch(100) == 14 and all(len(y) == 100 for y in a)
    xs = torch.cat([x for x, _ in d.train_batches(100, gen(3), drop_last=False)])
    assert d.steps_per_epoch(100, drop_last=False) == 15 and len(xs) == 1437
    # every example exactly once: sort both sets of rows and compare
    key = lambda t: t.flatten(1)[torch.from_numpy(np.lexsort(t.flatten(1).numpy().T[::-1].copy()))]
    assert torch.equal(key(xs), key(d.train_x))
    # batch bigger than the data: drop_last keeps the one incomplete batch
    assert [len(y) for _, y in d.train_batches(5000, gen(0))] == [1437] and d.steps_per_epoch(5000) == 1
    x, y = next(d.train_batches(64, gen(0)))
    assert x.device == d.device and y.device == d.device
    assert [len(y) for _, y in d.test_batches(100)] == [100, 100, 100, 60]
    assert torch.equal(torch.cat([x for x, _ in d.test_batches(100)]), d.test_x)


def test_train_batches_augment_flag():
    d = D.load(DataConfig(name="digits", augment="on"))
    plain = next(d.train_batches(64, gen(0), augment=False))
    aug = next(d.train_batches(64, gen(0)))
    assert torch.equal(plain[1], aug[1]) and not torch.equal(plain[0], aug[0])


# ---------------------------------------------------------------- augmentation

def _windows(p, h, w):
    """All h x w windows of padded images p (N, C, H+8, W+8): (N, 81, C*h*w)."""
    n, c = p.shape[:2]
    return F.unfold(p, (h, w)).view(n, c * h * w, -1).transpose(1, 2)


def test_augment_batch_is_a_window_of_the_reflect_padded_image():
    n, c, h, w = 64, 3, 8, 10
    # distinct column and row values, so every window and its mirror are distinguishable
    x = (torch.arange(w) + 100 * torch.arange(h)[:, None] + 10_000 * torch.arange(c)[:, None, None]).float()
    x = (x + 1_000_000 * torch.arange(n)[:, None, None, None]).contiguous()
    out = D.augment_batch(x, gen(0))
    assert out.shape == x.shape
    assert torch.equal(out, D.augment_batch(x, gen(0)))
    assert not torch.equal(out, D.augment_batch(x, gen(1)))
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    plain = (_windows(padded, h, w) == out.flatten(1)[:, None]).all(-1).any(-1)
    mirrored = (_windows(padded, h, w) == out.flip(-1).flatten(1)[:, None]).all(-1).any(-1)
    assert (plain | mirrored).all()
    assert mirrored.any() and plain.any()  # both flipped and unflipped samples, p = 0.5
    assert (mirrored & plain).sum() == 0   # columns are distinct, so never both
    centred = (out == x).flatten(1).all(1)
    assert centred.float().mean() < 0.2    # offsets vary per sample (1/81 chance of no shift/no flip)


def test_augment_batch_random_images_not_identity():
    x = torch.rand(32, 3, 32, 32, generator=gen(5))
    out = D.augment_batch(x, gen(0))
    assert out.shape == x.shape and out.dtype == x.dtype and not torch.equal(out, x)


# ---------------------------------------------------------------- CIFAR (torchvision's real parser)

def _write_cifar(root: Path, hundred: bool, rng: np.random.Generator):
    """A tiny folder in torchvision's CIFAR layout (the release's pickles are dicts with str keys
    after Python 2 -> 3 latin1 unpickling, which is what torchvision indexes)."""
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    label_key, k = ("fine_labels", 100) if hundred else ("labels", 10)
    files = (["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]) + (["test"] if hundred else ["test_batch"])
    written = {}
    for name in files:
        n = 7 if "test" in name else 5
        x, y = rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, k, n).tolist()
        (folder / name).write_bytes(pickle.dumps({"data": x, label_key: y}, protocol=2))
        written[name] = (x, y)
    meta = {"fine_label_names": [f"c{i}" for i in range(k)]} if hundred else {"label_names": [f"c{i}" for i in range(k)]}
    (folder / ("meta" if hundred else "batches.meta")).write_bytes(pickle.dumps(meta, protocol=2))
    train = [written[f] for f in files[:-1]]
    return (np.concatenate([x for x, _ in train]), sum((y for _, y in train), []), *written[files[-1]])


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_from_torchvision_layout(tmp_path, monkeypatch, name):
    import torchvision.datasets.cifar as tv_cifar
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: Path(path).is_file())
    train_x, train_y, test_x, test_y = _write_cifar(tmp_path, name == "cifar100", np.random.default_rng(0))
    d = D.load(DataConfig(name=name, root=str(tmp_path)))
    D._load_cpu.cache_clear()  # tmp_path folders are one-off
    info = D.DATASETS[name]
    assert d.augment is True and d.num_classes == (100 if name == "cifar100" else 10)
    assert d.train_x.shape == (len(train_y), 3, 32, 32) and d.test_x.shape == (7, 3, 32, 32)
    assert d.train_y.tolist() == train_y and d.test_y.tolist() == test_y
    undo = lambda t: ((t * torch.tensor(info.std).view(3, 1, 1) + torch.tensor(info.mean).view(3, 1, 1)) * 255)
    assert torch.equal(undo(d.train_x).round().to(torch.uint8).flatten(1), torch.from_numpy(train_x))
    assert torch.equal(undo(d.test_x).round().to(torch.uint8).flatten(1), torch.from_numpy(test_x))


def test_cifar_missing_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="^data.root: .* has no cifar10 data"):
        D.load(DataConfig(name="cifar10", root=str(tmp_path)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu_for_a_seed():
    cpu, gpu = D.load(DataConfig(name="digits", augment="on")), D.load(DataConfig(name="digits", augment="on"), "cuda")
    assert gpu.train_x.is_cuda and torch.allclose(gpu.train_x.cpu(), cpu.train_x, atol=1e-6)
    for (xc, yc), (xg, yg) in zip(cpu.train_batches(128, gen(7)), gpu.train_batches(128, gen(7))):
        assert xg.is_cuda and torch.equal(yc, yg.cpu()) and torch.allclose(xc, xg.cpu(), atol=1e-6)
