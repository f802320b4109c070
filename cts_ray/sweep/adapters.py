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
