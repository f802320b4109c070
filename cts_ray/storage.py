"""Files that a full, read-only or vanished disk cannot leave half written, and the one line
(``errors.StorageError``) such a disk gives instead of a library's traceback.

``atomic(path)`` is the one way cts-ray writes a file that a reader may open while or after it is
written (tables, progress, tickets, masks, sweep.json, searcher state, caches): a temporary file
in the same folder, flushed and fsynced, then renamed over ``path``. A write that fails half-way
removes its temporary file (so the little space left is not eaten) and leaves the previous
version of ``path`` whole. ``classify`` turns what a failed write raised into a StorageError
naming the cause and the folder. Imports nothing of cts-ray but ``errors``.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import threading
from pathlib import Path
from typing import IO, Iterator, Optional

from .errors import StorageError

_KIND = {errno.ENOSPC: "full", errno.EDQUOT: "full", errno.EROFS: "read-only",
         errno.ENOENT: "gone", errno.ESTALE: "gone", errno.ENODEV: "gone"}
# what a failed write says where no OSError is chained: torch's writer given a path (None: probe the
# folder for why), sqlite (under MLflow and Optuna), pyarrow and others that keep only the text
_MARKERS = {"unexpected pos": None, "No space left on device": "full", "Disk quota exceeded": "full",
            "database or disk is full": "full", "Read-only file system": "read-only",
            "attempt to write a readonly database": "read-only"}
# the line storage_error writes (found again in other text, e.g. Tune's error file of a trial)
LINE = re.compile(r"storage (full|read-only|gone): [^\n]*")
FULL_BELOW = 1 << 20   # free bytes under which a storage folder counts as full when nothing else says why


@contextlib.contextmanager
def atomic(path, mode: str = "wb") -> Iterator[IO]:
    """An open temporary file beside ``path`` that replaces ``path`` once written and synced."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")   # hidden: readers skip it
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())   # a full disk may only say so here (delayed allocation)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_text(path, text: str) -> None:
    with atomic(path, "w") as f:
        f.write(text)


def save_torch(obj, path) -> None:
    """``torch.save`` atomically, through a file object: a failed write then chains its OSError."""
    import torch
    with atomic(path) as f:
        torch.save(obj, f)


@contextlib.contextmanager
def named_faults(folder) -> Iterator[None]:
    """Whatever a failed write under ``folder`` raised, raised again as its one-line StorageError."""
    try:
        yield
    except Exception as e:
        fault = classify(e, folder)
        if fault is None:
            raise
        raise fault from None


def classify(exc: BaseException, folder) -> Optional[StorageError]:
    """The StorageError for ``folder`` that ``exc`` (or an exception it chains) means, else None."""
    if isinstance(exc, StorageError):
        return exc
    seen = 0
    e: Optional[BaseException] = exc
    while e is not None and seen < 10:
        if isinstance(e, OSError) and e.errno in _KIND:
            kind = _KIND[e.errno]
            if kind != "gone" or not Path(folder).exists():   # a missing file alone is not a vanished disk
                return storage_error(kind, folder)
        text = str(e)
        for marker, kind in _MARKERS.items():
            if marker in text:
                return storage_error(kind, folder) if kind else probe(folder) or storage_error("full", folder)
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def probe(folder) -> Optional[StorageError]:
    """Why ``folder`` cannot take writes now (gone, read-only, under ``FULL_BELOW`` free), else None."""
    folder = Path(folder)
    if not folder.exists():
        return storage_error("gone", folder)
    try:
        st = os.statvfs(folder)
    except OSError:
        return storage_error("gone", folder)
    if st.f_flag & os.ST_RDONLY:
        return storage_error("read-only", folder)
    if st.f_bavail * st.f_frsize < FULL_BELOW:
        return storage_error("full", folder)
    return None


def storage_error(kind: str, folder) -> StorageError:
    """``storage full: /path (0.4 MB free)``, ``storage read-only: /path``, ``storage gone: /path``."""
    if kind != "full":
        return StorageError(f"storage {kind}: {folder}")
    return StorageError(f"storage full: {folder} ({_free(Path(folder)) / 1e6:.1f} MB free)")


def kind_of(fault: StorageError) -> str:
    """``full``, ``read-only`` or ``gone``: which storage_error line ``fault`` says."""
    found = LINE.search(str(fault))
    return found.group(1) if found else "full"


def _free(folder: Path) -> int:
    for p in (folder, *folder.parents):   # the nearest folder that still exists
        with contextlib.suppress(OSError):
            return shutil.disk_usage(p).free
    return 0
