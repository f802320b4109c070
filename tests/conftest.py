"""Shared test setup. Real data only: digits (bundled with scikit-learn) and MNIST from the
project's shared folder beside the checkout (as in CI)."""
import os
import signal
import socket
import subprocess
import time
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


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of small passes (fastest there, and steady on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Ports Ray takes by default for its own components (dashboard, its agent's HTTP server, Redis, Ray
# Client, workers): a head started on one of these fails with "port … used by other components".
_RAY_PORTS = {8265, 52365, 6379, 10001, *range(10002, 20000)}


def _free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _RAY_PORTS:
            return port


def _ray_start(args, env) -> None:
    p = subprocess.run([str(BIN / "ray"), "start", *args], env=env, capture_output=True, text=True)
    assert p.returncode == 0, f"ray start {' '.join(args)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A head raylet (1 CPU, 1 logical GPU) and a worker raylet (1 CPU), started once. One logical CPU
    each: this machine has two cores, and each trial process more than two would only add its start
    (torch's import, seconds) without running sooner."""
    temp = tmp_path_factory.mktemp("ray")
    port = _free_port()
    # A local test cluster on loopback: no token auth (Ray 2.60's `ray start` otherwise expects a
    # token shared by all nodes and drivers).
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--num-cpus=1", "--disable-usage-stats", "--node-ip-address=127.0.0.1"]
    address = f"127.0.0.1:{port}"
    try:   # stopped even when the second raylet fails to start
        _ray_start(["--head", f"--port={port}", "--num-gpus=1", f"--temp-dir={temp}", *common], env)
        _ray_start([f"--address={address}", "--num-gpus=0", *common], env)
        yield address
    finally:
        _stop_cluster(temp)
    os.environ.pop("RAY_AUTH_MODE", None)


def _stop_cluster(temp) -> None:
    """Stop this test cluster only (not `ray stop`, which would also end any other Ray on the
    machine): its daemons name its temp folder on their command lines; workers are their children."""
    procs = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        procs[int(d.name)] = (ppid, str(temp) in cmd)
    if not procs:   # no /proc (not Linux): fall back to stopping every Ray on the machine
        subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True)
        return
    doomed = {pid for pid, (_, ours) in procs.items() if ours}
    while True:   # and all their descendants
        more = {pid for pid, (ppid, _) in procs.items() if ppid in doomed} - doomed
        if not more:
            break
        doomed |= more
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in doomed:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 2   # a raylet whose GCS is going ignores SIGTERM; a test cluster needs no grace
        while sig == signal.SIGTERM and time.time() < deadline and any(map(_running, doomed)):
            time.sleep(0.2)


def _running(pid: int) -> bool:
    """Not yet exited: a zombie has exited (a container's PID 1 may never reap Ray's daemons)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _sweep_file(tmp_path, name, body: dict) -> Path:
    f = tmp_path / f"{name}.yaml"
    f.write_text(yaml.safe_dump({"name": name, "storage": str(tmp_path / "sweeps"), **body}))
    return f


def _damage_dense_run(sweep_file: Path, point: dict) -> Path:
    """Put a file torch cannot load where the sweep's trial at ``point`` finds its cached dense run,
    so the trial fails as it starts (every rank of it); returns the file."""
    from cts_ray.cache import DenseCache
    from cts_ray.config import from_dict
    from cts_ray.sweep import spec as spec_mod
    spec = spec_mod.load(sweep_file)
    cache = DenseCache(spec.root.parent / "_cache" / "dense")
    damaged = cache.root / cache.key(from_dict(spec.trial_raw(point))) / "dense.pt"
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"not a torch file")
    return damaged


def _run(args, tmp_path, timeout=600, env=None, code=0):
    """`cts-ray sweep ARGS`, which must exit with ``code``."""
    p = subprocess.run([str(BIN / "cts-ray"), "sweep", *map(str, args)], capture_output=True, text=True,
                       cwd=tmp_path, timeout=timeout, env={**os.environ, **(env or {})})
    assert p.returncode == code, p.stdout[-3000:] + p.stderr[-3000:]
    return p


# ---------------------------------------------------------------- data roots for validation only

WNIDS = ("n01443537", "n01629819")   # two classes of each fake folder data set


def _jpegs(paths, size) -> None:
    from PIL import Image
    for i, p in enumerate(paths):
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (40 * i % 256, 90, 160)).save(p, "JPEG")


def fake_data_root(name: str, root: Path) -> Path:
    """A folder that passes data set ``name``'s pre-flight check without its real data: CIFAR's file
    names (empty files: the check reads names, the loader contents), or Tiny-ImageNet's and ImageNet's
    official layouts with two classes of two small real JPEGs each."""
    if name == "tiny_imagenet":   # wnids.txt, train/<wnid>/images/, val/images/ + val_annotations.txt
        root.mkdir(parents=True, exist_ok=True)
        (root / "wnids.txt").write_text("".join(f"{w}\n" for w in WNIDS))
        _jpegs([root / "train" / w / "images" / f"{w}_{i}.JPEG" for w in WNIDS for i in range(2)], (64, 64))
        val = [f"val_{i}.JPEG" for i in range(2 * len(WNIDS))]
        _jpegs([root / "val" / "images" / v for v in val], (64, 64))
        (root / "val" / "val_annotations.txt").write_text(
            "".join(f"{v}\t{WNIDS[i % len(WNIDS)]}\t0\t0\t63\t63\n" for i, v in enumerate(val)))
    elif name == "imagenet":      # train/<wnid>/*.JPEG, val/<wnid>/*.JPEG (val re-sorted)
        _jpegs([root / split / w / f"{w}_{split}_{i}.JPEG" for split in ("train", "val") for w in WNIDS
                for i in range(2)], (80, 60))
    else:
        from cts_ray.datasets import DATASETS
        for choices in DATASETS[name].files(root):
            choices[0].parent.mkdir(parents=True, exist_ok=True)
            choices[0].touch()
    return root


def flat_config(path: Path) -> dict:
    """A config or sweep file as {dotted key: value}: a sweep's base config with its ``set`` applied."""
    from cts_ray.config import flatten
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if "base" not in raw and "grid" not in raw and "set" not in raw:
        return flatten(raw)
    flat = flat_config(path.parent / raw["base"]) if raw.get("base") else {}
    return {**flat, **(raw.get("set") or {})}


def pending_in_this_build(flat: dict):
    """Why a config cannot validate in this build: a data set, model or model key that issue 25's
    parallel parts add and this build does not have yet; None when it can."""
    import dataclasses
    from cts_ray import names
    from cts_ray.config import ModelConfig
    from cts_ray.datasets import DATASETS
    data, model = flat.get("data.name", "digits"), flat.get("model.name", "mlp_digits")
    keys = {f"model.{f.name}" for f in dataclasses.fields(ModelConfig)}
    missing = [*([f"data set {data}"] if data not in DATASETS else []),
               *([f"model {model}"] if model not in names.MODELS else []),
               *sorted(k for k in flat if k.startswith("model.") and k not in keys)]
    return f"{', '.join(missing)} not in this build yet (issue 25)" if missing else None
