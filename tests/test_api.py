"""Issue 23 point 9: the public Python API exported from `cts_ray` (api.py). The README's example is
executed as written, in a fresh process in a temporary folder, against the session's Ray cluster;
errors raise the CLI's classes; `import cts_ray` stays light."""
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

import cts_ray
from conftest import REPO
from test_light_imports import _heavy_after


def _readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the Python API section holds one python block"
    return blocks[0]


def test_the_readme_example_runs_as_written(ray_cluster, tmp_path):
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    p = subprocess.run([sys.executable, "-c", _readme_example()], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "RAY_ADDRESS": ray_cluster})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout
    assert re.search(r"^cts: \d+\.\d % at density 0\.100$", out, re.M), out
    assert "(1, 8, 8) 0.100" in out and "0 failed" in out, out
    assert "search.densty: unknown key; did you mean search.density?" in out, out
    rows = [line for line in out.splitlines() if line.startswith("{'method'")]
    assert sorted(eval(r)["method"] for r in rows) == ["random", "snip"], out
    assert all(eval(r)["status"] == "finished" for r in rows), out
    assert (tmp_path / "results" / "runs" / "api-demo" / "ticket.pt").is_file()
    assert (tmp_path / "results" / "sweeps" / "api-demo" / "tables" / "trials").is_dir()


def test_import_cts_ray_and_its_api_names_stay_light():
    assert _heavy_after("""
        import cts_ray
        assert {"run", "run_sweep", "read_table", "load_ticket", "ConfigError"} <= set(cts_ray.__all__)
        cfg = cts_ray.load_config(None, {"search.density": 0.01})
        """) == []


def test_a_config_as_a_file_a_mapping_or_overrides_is_one_config(tmp_path):
    path = REPO / "configs" / "digits.yaml"
    from_file = cts_ray.load_config(path, ["search.density=0.01", "training.milestones=[3]"])
    from_mapping = cts_ray.load_config(yaml.safe_load(path.read_text()),
                                       {"search.density": 0.01, "training.milestones": [3]})
    assert from_file.hash == from_mapping.hash
    assert cts_ray.load_config(from_file).hash == from_file.hash


def test_errors_raise_the_clis_classes(tmp_path):
    with pytest.raises(cts_ray.ConfigError, match="did you mean search.density"):
        cts_ray.run(overrides=["search.densty=0.1"])
    with pytest.raises(cts_ray.ConfigError, match="config: list; expected a YAML path, a mapping or a Config"):
        cts_ray.run([1, 2])
    with pytest.raises(cts_ray.ConfigError, match="did you mean max_concurrent"):
        cts_ray.run_sweep({"name": "x", "max_concurent": 1})
    with pytest.raises(cts_ray.ConfigError, match="has no config.yaml"):
        cts_ray.load_ticket(tmp_path)
    with pytest.raises(cts_ray.AnalysisError, match="no trials table"):
        cts_ray.read_table(tmp_path)
    with pytest.raises(cts_ray.AnalysisError, match="is not a folder"):
        cts_ray.read_table(tmp_path / "absent")
    with pytest.raises(cts_ray.ConfigError, match="choose one of: trials, epochs, layers"):
        cts_ray.read_table(tmp_path, "trial")
