"""Device choice, seeding and the device a run records (its code and library versions: versions.py)."""
from __future__ import annotations

import hashlib
import platform
from typing import TYPE_CHECKING

import torch

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import ResourcesConfig


def select_device(res: ResourcesConfig) -> torch.device:
    if res.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("resources.device: 'cuda' requested but no CUDA device is visible; "
                          "choose one of: auto, cpu")
    if res.device == "cpu" or (res.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda")


def configure(res: ResourcesConfig) -> torch.device:
    """Apply resource settings to this process and return the compute device."""
    if res.threads:
        torch.set_num_threads(res.threads)
    # Sparse nets drive Adam moments of starved weights into denormals, which are slow on CPU.
    torch.set_flush_denormal(True)
    device = select_device(res)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def cpu_copy(x):
    """A snapshot on the CPU (tensors copied, in dicts, lists and tuples) that later in-place
    updates of the originals (weights, θ, optimiser moments) cannot change."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", copy=True)
    if isinstance(x, dict):
        return {k: cpu_copy(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(cpu_copy(v) for v in x)
    return x


def derive_seed(seed: int, tag: str) -> int:
    """Independent streams per purpose (init, data order, noise...) from one user seed."""
    digest = hashlib.sha256(f"{seed}:{tag}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generator(seed: int, tag: str, device="cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(seed, tag))


def use_amp(res: ResourcesConfig, device: torch.device) -> bool:
    return bool(res.amp) and device.type == "cuda"


def device_string(device: torch.device) -> str:
    """The compute device as torch names it: ``cpu``, ``cuda:0``."""
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


# Below this many parameters one torch thread is fastest on CPU: the per-op work is too small to
# split, and on a shared machine extra threads only contend (digits: 6.5 s with 1 thread against
# 51 s with the default on a loaded 2-core machine; README "Single experiments").
SMALL_MODEL_PARAMS = 1_000_000


def default_threads(params: int) -> int:
    """Torch threads for ``resources.threads: null``: 1 for small models, else at most 4 of those
    available (in a sweep trial: its CPUs)."""
    return 1 if params < SMALL_MODEL_PARAMS else max(1, min(4, torch.get_num_threads()))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()
