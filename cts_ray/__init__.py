"""cts-ray: Concrete Ticket Search and its baselines, as Ray Tune sweeps.

The Python API (``api.py``, README "Python API"): ``run``, ``run_sweep``, ``read_table``,
``load_ticket`` and ``load_config``, and the error classes they raise (``errors.py``), imported on
first use so that ``import cts_ray`` stays light (no torch, no Ray)."""
__version__ = "0.1.0"

_FROM = {**dict.fromkeys(("run", "run_sweep", "read_table", "load_ticket", "load_config", "SweepResult",
                          "SavedTicket"), "api"),
         **dict.fromkeys(("ConfigError", "AnalysisError", "SchemaError", "CompactError", "DivergedError",
                          "StorageError", "SweepBusyError"), "errors")}
__all__ = [*_FROM, "__version__"]


def __getattr__(name: str):
    if name in _FROM:
        import importlib
        return getattr(importlib.import_module(f".{_FROM[name]}", __name__), name)
    raise AttributeError(f"module 'cts_ray' has no attribute {name!r}")
