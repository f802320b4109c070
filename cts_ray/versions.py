"""Which code and libraries produced a result (every row and summary records both). No torch: the
sweep driver records them too."""
from __future__ import annotations

import functools
import platform
import subprocess
from importlib import metadata
from pathlib import Path


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Package version plus the git commit (with -dirty) when run from a checkout."""
    from . import __version__
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


@functools.lru_cache(maxsize=1)
def library_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "numpy", "ray", "optuna", "mlflow", "pyarrow", "scikit-learn"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
