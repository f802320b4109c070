"""What the sweep driver checks after validation and before Ray starts: every image of every folder
data set the trials hold in memory is decoded once, here, into the decode cache the trials then read
(``image_folder.decode_once``); folders the trials stream (``data.stream``) are not. A damaged image is refused once, in one line naming the file,
instead of failing every trial separately after Ray has started.

On a cluster the cache is the driver's (``$CTS_RAY_CACHE``, default ``~/.cache/cts-ray``): trials on
other nodes decode again unless ``CTS_RAY_CACHE`` points at storage every node shares.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

from .. import config as C
from ..image_folder import FOLDERS, streams_on_host
from .spec import SweepSpec, probes


def image_folders(spec: SweepSpec) -> list[tuple[str, str, Optional[int]]]:
    """(data set, root, image_size) of each folder data set the sweep's trials hold in memory (grid
    points, and the edges of ``sample`` distributions), each once. Whether a trial streams under
    ``data.stream: auto`` is judged by this node's memory (a GPU trial's may differ: then the
    decoded cache is unused)."""
    data_keys = [k for k in [*spec.grid, *spec.sample] if k.startswith("data.")]
    standins = probes({k: v for k, v in spec.sample.items() if k in data_keys})   # the same for every point
    seen: dict = {}
    for point in spec.grid_points() or [{}]:
        for probe in standins:
            values = {**point, **probe}
            ident = tuple(repr(values.get(k)) for k in data_keys)
            if ident not in seen:
                cfg = C.from_dict(spec.trial_raw(values))
                seen[ident] = cfg.data, cfg.resources
    held = [(d, r) for d, r in seen.values() if d.name in FOLDERS and not streams_on_host(d, r)]
    return list(dict.fromkeys((d.name, d.root, d.image_size) for d, _ in held))


def decode_images(spec: SweepSpec, say: Callable[[str], None] = print) -> None:
    """Decode every image folder of the sweep once (module docstring); ``say`` hears a line before
    and after each folder that has to be decoded (cold), nothing for one already in the cache."""
    from ..image_folder import decode_once
    for name, root, image_size in image_folders(spec):
        start = time.perf_counter()
        n = decode_once(name, root, image_size, lambda n: say(f"image folder {root}: decoding and checking {n:,} images "
                                                         "once, before any trial starts"))
        if n is not None:
            say(f"image folder {root}: {n:,} images decoded in {time.perf_counter() - start:.1f} s "
                "(cached for the trials)")
