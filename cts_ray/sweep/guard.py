"""The sweep driver's stop on a storage fault: the first trial that fails because the sweep's
storage is full, read-only or gone stops the sweep, so Tune starts no more trials that would
fail the same way. The runner then raises that trial's one-line StorageError (exit EXIT_STORAGE)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from ray.tune import Callback
from ray.tune.stopper import Stopper

from .. import storage
from ..errors import StorageError


class StorageGuard(Callback, Stopper):
    """A Tune callback (it sees trials fail) and the run's stopper (``stop_all`` once one failed on
    storage). Tune stops the running trials too: they keep their progress files, and a resume
    continues them from their last saved epoch."""

    def __init__(self, root):
        self.root = Path(root)
        self.fault: Optional[StorageError] = None

    def setup(self, **info):
        for handler in logging.getLogger("ray").handlers:   # Ray's one handler (its loggers don't propagate)
            handler.addFilter(self._keep)

    def teardown(self) -> None:
        for handler in logging.getLogger("ray").handlers:
            handler.removeFilter(self._keep)

    def _keep(self, record: logging.LogRecord) -> bool:
        """Ray's warnings and errors a storage fault causes (Tune's failed state sync with its traceback,
        its missing results after the stop) are left out: the fault's one line says it all."""
        if record.levelno < logging.WARNING:
            return True
        if self.fault is not None:
            return False
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or storage.classify(exc, self.root) is None

    def on_trial_error(self, iteration, trials, trial, **info):
        self._check(trial)

    def on_trial_recover(self, iteration, trials, trial, **info):   # max_failures > 0: a retry would fail too
        self._check(trial)

    def _check(self, trial) -> None:
        if self.fault is None:
            self.fault = _trial_fault(trial) or storage.probe(self.root)

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.fault is not None

    def __getstate__(self):   # pickled into Tune's state: a resumed sweep starts untripped
        return {"root": self.root, "fault": None}


def _trial_fault(trial) -> Optional[StorageError]:
    """The StorageError line in the trial's error file (Tune's text of what the trial raised)."""
    try:
        text = Path(trial.error_file).read_text(errors="replace") if trial.error_file else ""
    except OSError:   # the full disk cut it short, or it was never written
        return None
    found = [m.group(0).strip() for m in storage.LINE.finditer(text)]
    return StorageError(found[-1]) if found else None
