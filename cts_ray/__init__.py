"""cts-ray: Concrete Ticket Search and its baselines, as Ray Tune sweeps."""
__version__ = "0.1.0"
