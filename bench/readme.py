"""Wall time of the README's two commands, `make quickstart` and `make test`, from the repo root."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

from .report import Row

ROOT = Path(__file__).resolve().parent.parent


def run(**_) -> list[Row]:
    rows = []
    for target in ("quickstart", "test"):
        t0 = time.perf_counter()
        rc = subprocess.run(["make", target], cwd=ROOT).returncode
        rows.append(Row(f"make {target}", time.perf_counter() - t0, "s",
                        target="exit 0", met="yes" if rc == 0 else f"no (exit {rc})"))
    return rows
