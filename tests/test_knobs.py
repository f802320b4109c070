"""A knob that does not apply to a method is null in its table row and its summary."""
import pytest

from cts_ray import config as C
from cts_ray.methods import KNOBS, METHODS, applies
from cts_ray.sweep import tables

SET = ["search.temperature=0.5", "search.objective=ce", "search.controller=lagrange", "search.length=0.25",
       "search.lr=0.01"]


@pytest.mark.parametrize("method, present", [
    ("cts", {"objective", "controller", "temperature", "search_length", "mask_lr"}),
    ("gates", {"search_length", "mask_lr"}), ("edge_popup", {"search_length", "mask_lr"}),
    ("snip", set()), ("random", set()), ("ltr", set()), ("synflow", set())])
def test_axis_columns_are_null_where_the_knob_does_not_apply(method, present):
    row = tables.axes(C.load(None, [f"search.method={method}", "search.density=0.1", *SET]))
    knob_columns = {"objective", "controller", "temperature", "search_length", "mask_lr"}
    assert {c for c in knob_columns if row[c] is not None} == present
    # what every method has stays filled
    assert row["target_density"] == 0.1 and row["seed"] == 0 and row["sanity"] == "none"
    assert row["search_point"] == "rewind" and row["dataset"] == "digits"


def test_every_knob_is_a_config_key_and_the_registry_says_who_reads_it():
    keys = {k for k, *_ in C.describe()}
    assert KNOBS <= keys
    assert applies("cts", "search.temperature") and not applies("snip", "search.temperature")
    assert applies("snip", "search.density") and applies("snip", "training.lr")   # not a method knob
    assert all(k.startswith("search.") for m in METHODS.values() for k in m.knobs)
