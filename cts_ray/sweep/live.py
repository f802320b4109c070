"""The sweep's live view (instead of Tune's tables): one progress line — trials finished, running,
pending, failed, elapsed and ETA — and one line per trial as it ends. On a terminal the progress
line is redrawn in place; elsewhere (CI logs, pipes) it is printed as a line at most every
``LOG_EVERY_S`` seconds, so a log gets no carriage-return spam. It also keeps each trial's last
Tune status, which tells the driver what an interrupt left running (``trials``)."""
from __future__ import annotations

import sys
import time
from typing import Callable

from ray.tune import Callback

LOG_EVERY_S = 30.0   # a non-terminal's progress line, at most this often
TTY_EVERY_S = 0.5    # a terminal's redraw


def clock(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def trial_status(trial) -> str:
    """What a trial that completed ended as: its final report's status (finished, diverged, error),
    else stopped (a scheduler ended it before its final report)."""
    last = trial.last_result or {}
    return last.get("status", "finished") if last.get("phase") == "final" else "stopped"


class LiveView(Callback):
    def __init__(self, total: int, resolve: Callable, show: bool = True, stream=None):
        """``total``: the trials this run has; ``resolve(trial.config)``: the trial's Config;
        ``show``: False keeps the statuses only (``--quiet``, ``--verbose``)."""
        self.total, self.resolve, self.show, self.stream = total, resolve, show, stream
        self.started = time.time()
        self.ended: dict[str, str] = {}          # trial id -> how it ended, this run
        self.trials: dict[str, tuple] = {}       # trial id -> (Tune's status, config, last result) at the last step
        self.shown_at, self.drawn = 0.0, False

    def __getstate__(self):   # Tune pickles its run config's callbacks: a stream does not pickle
        return {k: v for k, v in self.__dict__.items() if k != "stream"}

    @property
    def out(self):
        return getattr(self, "stream", None) or sys.stdout

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trial, trial_status(trial))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trial, "failed")

    def on_step_end(self, iteration, trials, **info):
        # kept from the loop's last step: Tune's cleanup then marks the trials an interrupt stopped
        # TERMINATED, as if they had ended
        self.trials = {t.trial_id: (t.status, t.config, t.last_result or {}) for t in trials}
        every = TTY_EVERY_S if self._tty() else LOG_EVERY_S
        if self.show and time.time() - self.shown_at >= every:
            self._progress()

    def on_experiment_end(self, trials, **info):
        if self.show:
            self._progress(final=True)

    def _ended(self, trial, status: str) -> None:
        self.ended[trial.trial_id] = status
        if not self.show:
            return
        last = trial.last_result or {}
        try:
            cfg = self.resolve(trial.config)
            what = f"{cfg.search.method:<10} density {cfg.search.density:<7.4g} seed {cfg.seed:<4}"
        except Exception:   # a view: never the reason a sweep fails
            what = ""
        acc = last.get("test_accuracy") if last.get("phase") == "final" or status == "stopped" else None
        acc_text = f"  test accuracy {100 * acc:.2f} %" if acc and status != "failed" else ""
        replay = "  (ended before)" if last.get("already_finished") else ""
        self._line(f"{status:<9} {trial.trial_id:<12} {what}{acc_text}{replay}")

    def _progress(self, final: bool = False) -> None:
        if not self.trials and not self.ended:   # nothing to count yet (or a resume with nothing left to run)
            return
        status = {tid: st for tid, (st, _, _) in self.trials.items()}
        for tid in self.ended:   # ended since the last step: no longer running
            status[tid] = "TERMINATED"
        running = sum(st in ("RUNNING", "PAUSED") for st in status.values())
        done = sum(st in ("TERMINATED", "ERROR") for st in status.values())   # a resumed sweep's earlier ones too
        failed = len({tid for tid, (st, _, _) in self.trials.items() if st == "ERROR"} |
                     {tid for tid, how in self.ended.items() if how in ("failed", "diverged", "error")})
        # trials not created yet count as pending: Tune makes a grid's trials as slots free up
        pending = max(0, self.total - done - running)
        elapsed = time.time() - self.started
        left = pending + running
        eta = f"  ETA {clock(elapsed / len(self.ended) * left)}" if self.ended and left and not final else ""
        text = (f"[{done}/{self.total} ended · {running} running · {pending} pending · {failed} failed]"
                f"  elapsed {clock(elapsed)}{eta}")
        self.shown_at = time.time()
        if self._tty() and not final:
            self.out.write(f"\r\x1b[K{text}")
            self.drawn = True
            self.out.flush()
        else:
            self._line(text)

    def _line(self, text: str) -> None:
        """A line of its own; on a terminal, above the progress line (which the next step redraws)."""
        prefix = "\r\x1b[K" if self._tty() and self.drawn else ""
        self.drawn = False
        self.out.write(f"{prefix}{text}\n")
        self.out.flush()

    def _tty(self) -> bool:
        try:
            return self.out.isatty()
        except (AttributeError, ValueError):
            return False
