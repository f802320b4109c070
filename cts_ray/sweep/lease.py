"""One driver per sweep: a lease file in the sweep folder, taken before anything reads or writes
the sweep, held (its heartbeat refreshed by a thread) until the driver ends.

The lease is the highest-numbered ``driver.lease.<n>`` file. A driver takes it by creating the
next number with O_CREAT|O_EXCL, which exactly one of several racing drivers wins, on a local disk
and on NFS v3+ alike; a dead holder's lease is taken over the same way (the next number), so a
take-over races safely too. A holder is dead when, on this host, its pid is gone; on another host,
when its lease file has not been touched for ``STALE_S`` seconds (its heartbeat). No Ray."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Optional

from .. import storage
from ..errors import SweepBusyError

PREFIX = "driver.lease."
HEARTBEAT_S = 15.0   # how often a holder touches its lease
STALE_S = 120.0      # another host's lease untouched this long: its driver is taken for dead


class Lease:
    """A held lease: ``release()`` (or the ``with`` block's end) gives it back."""

    def __init__(self, path: Path, record: dict):
        self.path, self.record = path, record
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="cts-ray-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                _write(self.path, {**self.record, "heartbeat": time.time()})
            except OSError:   # storage trouble: the sweep itself will say so
                pass

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.path.unlink(missing_ok=True)
        _HELD.pop(self.path.parent, None)
        try:   # a folder made only to hold the lease (the run was refused): leave nothing behind
            self.path.parent.rmdir()
        except OSError:
            pass

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


_HELD: dict = {}   # sweep folder -> this process's Lease on it (taking it again is a no-op)


def take(root: Path):
    """The lease of the sweep at ``root`` (created if need be), or SweepBusyError naming the live
    driver that holds it. Use as a context manager."""
    root = Path(root)
    if root in _HELD:   # held already by this process: its end releases nothing
        return contextlib.nullcontext()
    root.mkdir(parents=True, exist_ok=True)
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    for _ in range(20):   # each lost race means another driver took it: look again
        number, holder = _current(root)
        if holder is not None and _alive(holder):
            raise SweepBusyError(_busy_text(root, holder))
        path = root / f"{PREFIX}{number + 1}"
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({**record, "heartbeat": record["started"]}))
        for old in root.glob(f"{PREFIX}*"):   # the dead holders' leases
            if _number(old) < number + 1:
                old.unlink(missing_ok=True)
        lease = _HELD[root] = Lease(path, record)
        return lease
    raise SweepBusyError(f"sweep folder {root}: its driver lease keeps changing hands; is another driver starting?")


def _current(root: Path) -> tuple:
    """(the highest lease number, its holder's record or None when there is none)."""
    files = [f for f in root.glob(f"{PREFIX}*") if _number(f) >= 0]
    if not files:
        return 0, None
    newest = max(files, key=_number)
    return _number(newest), _read(newest)


def _read(path: Path) -> Optional[dict]:
    """The holder's record; one being written (empty for a moment) is read again, and one whose
    writer died before writing counts as stale once untouched for STALE_S."""
    for _ in range(10):
        try:
            text = path.read_text()
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return None
        if text.strip():
            try:
                return {**json.loads(text), "mtime": mtime}
            except ValueError:
                pass   # mid-rewrite by another client of the storage: read again
        time.sleep(0.1)
    return {"host": "?", "pid": -1, "started": mtime, "mtime": mtime}


def _alive(holder: dict) -> bool:
    if holder.get("host") == socket.gethostname():   # our own pid: an earlier life of this pid number
        return int(holder["pid"]) != os.getpid() and _pid_alive(int(holder["pid"]))
    return time.time() - holder["mtime"] < STALE_S


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:   # a zombie (killed, not yet reaped by its parent) runs nothing
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _busy_text(root: Path, holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(holder["started"]))
    return (f"sweep folder {root} is in use by a running driver (host {holder['host']}, pid {holder['pid']}, "
            f"since {since}); wait for it to end, or stop it first")


def _number(path: Path) -> int:
    try:
        return int(path.name[len(PREFIX):])
    except ValueError:
        return -1


def _write(path: Path, record: dict) -> None:
    """Rewrite the lease whole (storage.atomic), so a reader never sees half of it."""
    storage.write_text(path, json.dumps(record))
