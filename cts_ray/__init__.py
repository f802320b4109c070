"""cts-ray: Concrete Ticket Search and its baselines, as Ray Tune sweeps.

The Python API (``api.py``): ``run``, ``run_sweep``, ``read_table``, ``load_ticket`` and
``load_config``, imported on first use so that ``import cts_ray`` stays light (no torch, no Ray)."""
__version__ = "0.1.0"

_API = ("run", "run_sweep", "read_table", "load_ticket", "load_config", "SweepResult", "SavedTicket")
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'cts_ray' has no attribute {name!r}")
