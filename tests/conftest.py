"""Shared test setup. Real data only: digits (bundled with scikit-learn) and MNIST from the
project's shared folder beside the checkout (as in CI)."""
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mnist_root() -> str:
    # Not a skip: MNIST is part of the test environment, and its absence is a setup error.
    assert (SHARED_DATA / "MNIST" / "raw").is_dir(), f"MNIST missing under {SHARED_DATA}"
    return str(SHARED_DATA)


@pytest.fixture(autouse=True, scope="session")
def _threads():
    torch.set_num_threads(2)
