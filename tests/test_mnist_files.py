"""MNIST-family folders are trusted by content: real IDX files written here (tiny), gzipped by
different tools and settings or extracted, damaged in the ways that happen (cut short, counts that
disagree, another format). The pre-flight check (what `cts-ray run`/`sweep` runs before any work)
and the loader (what every trial runs) must agree on each folder, and say what is wrong."""
import gzip
import io
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
import torch

from cts_ray import data as D
from cts_ray.config import ConfigError, DataConfig, from_dict

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def idx(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic 0x00000800 + ndim, big-endian sizes, the data."""
    return bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape) + array.tobytes()


def arrays(n_train=20, n_test=10, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_train, dtype=np.uint8),
            rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_test, dtype=np.uint8)]


def gz_python(level=9, mtime=0, name=""):
    def pack(data: bytes) -> bytes:
        buf = io.BytesIO()
        with gzip.GzipFile(filename=name, mode="wb", compresslevel=level, fileobj=buf, mtime=mtime) as f:
            f.write(data)
        return buf.getvalue()
    return pack


def gz_cli(*flags):
    return lambda data: subprocess.run(["gzip", "-c", *flags], input=data, capture_output=True, check=True).stdout


def gz_two_members(data: bytes) -> bytes:   # as `cat a.gz b.gz` or some parallel compressors write
    half = len(data) // 2
    return gzip.compress(data[:half]) + gzip.compress(data[half:])


@dataclass
class Case:
    name: str
    pack: Callable = gz_python()       # bytes -> file content
    extracted: tuple = ()              # which files (indices) are stored extracted, without .gz
    damage: Optional[Callable] = None  # (index, content) -> content
    arrays: Callable = arrays
    error: Optional[str] = None        # what both the check and the loader say (None: both load)


def cut(which, keep):
    return lambda i, b: b[:keep(len(b))] if i == which else b


CASES = [
    Case("gzip-python-level9"),
    Case("gzip-python-level1-mtime-filename", gz_python(level=1, mtime=1234567890, name="x.idx")),
    Case("gzip-cli-9", gz_cli("-9")),
    Case("gzip-cli-1-no-name", gz_cli("-1", "-n")),
    Case("gzip-two-members", gz_two_members),
    Case("extracted", extracted=(0, 1, 2, 3)),
    Case("mixed-extracted-and-gzip", extracted=(0, 3)),
    Case("plain-bytes-under-gz-name", lambda b: b),
    Case("missing-file", damage=lambda i, b: None if i == 3 else b, error="no KMNIST/raw/t10k-labels-idx1-ubyte"),
    Case("gzip-truncated", damage=cut(0, lambda n: n - 200), error="train-images-idx3-ubyte.gz is truncated"),
    Case("gzip-truncated-in-header", damage=cut(1, lambda n: 12), error="train-labels-idx1-ubyte.gz is truncated"),
    Case("extracted-truncated", extracted=(2,), damage=cut(2, lambda n: n - 1),
         error="t10k-images-idx3-ubyte is truncated"),
    Case("extracted-trailing-bytes", extracted=(1,), damage=lambda i, b: b + b"\0" * 5 if i == 1 else b,
         error="5 bytes beyond"),
    Case("label-count-mismatch",
         arrays=lambda: [a[:-1] if i == 1 else a for i, a in enumerate(arrays())], error="count mismatch"),
    Case("not-idx", damage=lambda i, b: gzip.compress(b"\x89PNG\r\n\x1a\n" + b"\0" * 64) if i == 2 else b,
         error="not an IDX file"),
    Case("idx-of-floats", damage=lambda i, b: gzip.compress(b"\0\0\x0d\x01" + (4).to_bytes(4, "big") + b"\0" * 16)
         if i == 3 else b, error="not an IDX file"),
    Case("images-not-28x28", arrays=lambda: [np.zeros((20, 27, 28), np.uint8), *arrays()[1:]],
         error="expected N x 28 x 28"),
    Case("gzip-garbage", damage=lambda i, b: b"\x1f\x8b" + b"\xff" * 40 if i == 0 else b,
         error="not a readable gzip file"),
]


def make_folder(root: Path, case: Case) -> list[np.ndarray]:
    raw = root / "KMNIST" / "raw"
    raw.mkdir(parents=True)
    data = case.arrays()
    for i, (name, array) in enumerate(zip(NAMES, data)):
        content, path = (idx(array), raw / name) if i in case.extracted else (case.pack(idx(array)), raw / f"{name}.gz")
        content = case.damage(i, content) if case.damage else content
        if content is not None:
            path.write_bytes(content)
    return data


def _outcome(fn) -> Optional[str]:
    try:
        fn()
        return None
    except ConfigError as e:
        assert "\n" not in str(e) and str(e).startswith("data.root: "), e
        return str(e)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_preflight_check_and_loader_agree(tmp_path, case):
    data = make_folder(tmp_path, case)
    raw = {"data": {"name": "kmnist", "root": str(tmp_path)}, "model": {"name": "lenet_300_100"}}
    checked = _outcome(lambda: from_dict(raw))                       # the pre-flight check
    loaded = _outcome(lambda: D.DATASETS["kmnist"].loader(str(tmp_path)))   # what a trial runs
    if case.error is None:
        assert checked is None and loaded is None, (checked, loaded)
        x_tr, y_tr, x_te, y_te = D.DATASETS["kmnist"].loader(str(tmp_path))
        assert torch.equal((x_tr * 255).round().to(torch.uint8).squeeze(1), torch.from_numpy(data[0]))
        assert torch.equal(y_tr, torch.from_numpy(data[1]).long()) and torch.equal(y_te, torch.from_numpy(data[3]).long())
        assert x_te.shape == (10, 1, 28, 28)
    else:
        assert checked is not None and case.error in checked, checked
        assert loaded is not None and case.error in loaded, loaded


def test_recompressed_mnist_loads_and_its_checksums_are_noted(tmp_path):
    """The real MNIST release re-gzipped by another tool (md5s differ from torchvision's): the same
    pixels and labels, and the run's provenance says which files differ from the official release."""
    official = D.load(DataConfig(name="mnist", root=str(SHARED)))
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in sorted((SHARED / "MNIST" / "raw").glob("*.gz")):
        with gzip.open(gz) as src:
            (raw / gz.name).write_bytes(gz_cli("-1", "-n")(src.read()))
    cfg = DataConfig(name="mnist", root=str(tmp_path))
    from_dict({"data": {"name": "mnist", "root": str(tmp_path)}, "model": {"name": "lenet_300_100"}})
    again = D.load(cfg)
    assert torch.equal(official.train_x, again.train_x) and torch.equal(official.test_y, again.test_y)
    notes = D.provenance(cfg, again)
    assert notes["digest"] == D.provenance(DataConfig(name="mnist", root=str(SHARED)), official)["digest"]
    assert (notes["train_examples"], notes["test_examples"]) == (60000, 10000)
    assert [f["official_md5"] for f in notes["files"]] == [False] * 4
    assert all(f["official_md5"] for f in D.provenance(DataConfig(name="mnist", root=str(SHARED)), official)["files"])
