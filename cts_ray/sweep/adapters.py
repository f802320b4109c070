"""Where cts-ray reaches inside a dependency because it has no public API for what a sweep needs.
One function per need, each saying why; tests/test_adapters.py fails, naming the function, when
the library changes under it. Everything else uses the libraries' public APIs."""
from __future__ import annotations

from typing import Optional


def restored_tuner(path: str, trainable, callbacks: list, verbose: Optional[int] = None, stop=None):
    """``ray.tune.Tuner.restore(path, trainable)`` resuming unfinished and errored trials, run with
    ``callbacks`` (and Tune's ``verbose``, when given; and the stopper ``stop``, this driver's too).

    Why: ``Tuner.restore`` (Ray 2.60) takes no ``run_config``; it brings back the RunConfig pickled
    when the sweep started, callbacks included as they were then. Ours must be this driver's: the
    MLflow logger with its open store and thread, and the forgotten trials it defers. So they are
    set on the restored tuner's run config, which ``Tuner.fit`` reads. Drop this for a public way
    once ``Tuner.restore`` takes callbacks."""
    import ray
    from ray import tune
    tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    internal = getattr(tuner, "_local_tuner", None)   # None under Ray Client (ray://): a remote tuner
    get_run_config = getattr(internal, "get_run_config", None)
    if get_run_config is None:
        raise RuntimeError(f"cts_ray.sweep.adapters.restored_tuner: ray {ray.__version__}'s Tuner has no "
                           "_local_tuner.get_run_config() (Ray changed, or a ray:// client address), so a resumed "
                           "sweep cannot get its callbacks; update the adapter")
    get_run_config().callbacks = callbacks
    if verbose is not None:   # this driver's choice (--verbose or not), not the first one's
        get_run_config().verbose = verbose
    if stop is not None:
        get_run_config().stop = stop
    return tuner


def fit_relaying_reports(make_trainer, report) -> None:
    """``make_trainer(channel).fit()`` in a thread of this Tune trial, while this thread passes what
    the trainer's rank 0 sends through ``channel`` (a ``ReportChannel``) to ``report``
    (``tune.report``), until the fit ends; its error is raised here.

    Why: Ray Train V2's documented route to Tune, ``ray.train.report`` with
    ``ray.tune.integration.ray_train.TuneReportCallback``, is a barrier every worker must reach the
    same number of times, and the workers' ``pipeline.run`` hands records to rank 0 only (the ranks
    > 0 compute alongside, with no hook). So rank 0 sends its reports itself, through public APIs
    only. A trial Tune stops (a scheduler) ends in ``report``: its actor then goes, and with it the
    trainer's controller and workers (Ray's ownership), which is why a sweep of such trials does
    not reuse actors (runner.py)."""
    from ray.util.queue import Empty
    channel = ReportChannel()
    fit = _Fit(make_trainer(channel))
    fit.start()
    while fit.is_alive() or not channel.queue.empty():
        try:
            metrics = channel.queue.get(timeout=1)
        except Empty:
            continue
        if metrics is not None:   # None: ReportChannel.send's markers
            report(metrics)
    if fit.error is not None:
        raise fit.error


class ReportChannel:
    """What rank 0 sends its reports through to its trial (``fit_relaying_reports``), each send
    returning once ``report`` returned, i.e. once Tune took it: so, as a one-process trial whose
    ``tune.report`` waits for Tune, rank 0 saves an epoch's progress only after Tune has every
    report before it. Were it further ahead, a trial process that goes (Ctrl-C of the driver) would
    lose the reports in between: the resumed trial reports again only its last saved epoch. Plain
    data: it travels to the Train workers."""

    def __init__(self):
        from ray.util.queue import Queue
        self.queue = Queue(maxsize=1, actor_options={"num_cpus": 0})

    def send(self, metrics: dict) -> None:
        # A queue of one: the first marker goes in once the relay took ``metrics``, the second once
        # it came back for the first, after ``report(metrics)`` returned. One queue, no acknowledgement
        # a killed rank 0 could leave behind for the next group's.
        for item in (metrics, None, None):
            self.queue.put(item)


class _Fit:
    """``trainer.fit()`` in a daemon thread (a process Tune ends must not wait for it); ``error``: what it raised."""

    def __init__(self, trainer):
        import threading
        self.trainer, self.error = trainer, None
        self.thread = threading.Thread(target=self._run, daemon=True, name="ray-train-fit")

    def _run(self) -> None:
        try:
            self.trainer.fit()
        except BaseException as e:   # raised in the trial's thread (fit_relaying_reports)
            self.error = e

    def start(self) -> None:
        self.thread.start()

    def is_alive(self) -> bool:
        return self.thread.is_alive()
