"""Ctrl-C and SIGTERM of a sweep's driver: Tune's run ends as on its own stop signal, the trials
that were running get ``interrupted`` rows (trainable.write_interrupted), and what was left is
counted for the summary. --resume continues those trials under their own ids."""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from .resume import rows
from .spec import SweepSpec


class Interrupts:
    """Ctrl-C and SIGTERM during ``tuner.fit`` end the sweep as Tune ends it on SIGUSR1: running
    trials stop, its state is saved, ``fit`` returns; ``count`` says it happened. A second one
    raises KeyboardInterrupt (Tune's cleanup skipped). Tune's own SIGINT handler is kept out (it
    cannot tell anyone it fired), and so are its log lines on it (its hint is Tuner.restore, not
    our command)."""

    def __init__(self):
        self.count, self.saved = 0, {}

    def __enter__(self) -> "Interrupts":
        if threading.current_thread() is threading.main_thread():
            self.usr1 = signal.getsignal(signal.SIGUSR1)   # Tune sets its own once its loop starts
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.saved[sig] = signal.signal(sig, self._on_signal)
            self.env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        self.tune_log = logging.getLogger("ray.tune.tune")
        self.tune_log.addFilter(self._unless_interrupt)
        return self

    def _on_signal(self, signum, frame) -> None:
        self.count += 1
        if self.count > 1 or signal.getsignal(signal.SIGUSR1) is self.usr1:   # or before Tune's loop: nothing runs
            raise KeyboardInterrupt
        signal.raise_signal(signal.SIGUSR1)   # Tune's own stop: trials end, its state is saved

    def _unless_interrupt(self, record) -> bool:
        text = str(record.msg)
        return not (self.count and any(t in text for t in ("interrupted", "Trials did not complete", "Stop signal")))

    def __exit__(self, *exc) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        if self.saved:
            signal.signal(signal.SIGUSR1, self.usr1)   # Tune leaves its handler of a finished run
            if self.env is None:
                os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
            else:
                os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = self.env
        self.tune_log.removeFilter(self._unless_interrupt)


def record_interrupted(spec: SweepSpec, live) -> set:
    """A row with status ``interrupted`` for each trial that was running when the driver was
    interrupted; returns their Tune trial ids. Their progress files stay: --resume continues them."""
    from .trainable import write_interrupted
    out = set()
    for trial_id, (status, config, last) in live.trials.items():
        if status not in ("RUNNING", "PAUSED") or trial_id in live.ended:
            continue
        try:
            write_interrupted(spec.root, spec, trial_id, config, last)
        except Exception as e:   # one trial's row: never the reason the others get none
            print(f"cts-ray: recording trial {trial_id} as interrupted failed ({type(e).__name__}: {e})",
                  file=sys.stderr)
        out.add(trial_id)
    return out


def interrupted_counts(spec: SweepSpec, running: set) -> dict:
    """What an interrupted sweep left: trials recorded as interrupted, and the sweep's trials with
    no row at all (not started)."""
    have = len(rows(spec.root, "trials", ["trial_id"]))
    return {"running": len(running), "not_started": max(0, (spec.trial_count() or 0) - have)}
