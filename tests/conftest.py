"""Shared test setup. Real data only: digits (bundled with scikit-learn) and MNIST from the
project's shared folder beside the checkout (as in CI)."""
import os
import socket
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"
REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".venv" / "bin"


@pytest.fixture(scope="session")
def mnist_root() -> str:
    # Not a skip: MNIST is part of the test environment, and its absence is a setup error.
    assert (SHARED_DATA / "MNIST" / "raw").is_dir(), f"MNIST missing under {SHARED_DATA}"
    return str(SHARED_DATA)


@pytest.fixture(autouse=True, scope="session")
def _threads():
    torch.set_num_threads(2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A head raylet (2 CPUs, 1 logical GPU) and a worker raylet (2 CPUs), started once."""
    temp = tmp_path_factory.mktemp("ray")
    port = _free_port()
    # A local test cluster on loopback: no token auth (Ray 2.60's `ray start` otherwise expects a
    # token shared by all nodes and drivers).
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    ray = str(BIN / "ray")
    common = ["--num-cpus=2", "--disable-usage-stats", "--include-dashboard=false"]
    subprocess.run([ray, "start", "--head", f"--port={port}", "--num-gpus=1", f"--temp-dir={temp}",
                    "--node-ip-address=127.0.0.1", *common[:2]], check=True, env=env, capture_output=True)
    address = f"127.0.0.1:{port}"
    subprocess.run([ray, "start", f"--address={address}", "--num-gpus=0", "--node-ip-address=127.0.0.1",
                    *common[:2]], check=True, env=env, capture_output=True)
    yield address
    subprocess.run([ray, "stop", "--force"], env=env, capture_output=True)
    os.environ.pop("RAY_AUTH_MODE", None)


def _sweep_file(tmp_path, name, body: dict) -> Path:
    f = tmp_path / f"{name}.yaml"
    f.write_text(yaml.safe_dump({"name": name, "storage": str(tmp_path / "sweeps"), **body}))
    return f


def _run(args, tmp_path, timeout=600, env=None):
    p = subprocess.run([str(BIN / "cts-ray"), "sweep", *map(str, args)], capture_output=True, text=True,
                       cwd=tmp_path, timeout=timeout, env={**os.environ, **(env or {})})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p
