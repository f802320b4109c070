"""The light paths import neither torch nor Ray (issue 22): validating a config, a dense-cache key,
`cts-ray sweep FILE --dry-run` and `cts-ray report`. Each runs in a fresh interpreter, which then
lists the heavy modules it holds. Also: the torch-free registries agree with the implementations
keyed by the same names."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import REPO, fake_data_root, flat_config, pending_in_this_build
from test_analysis import _trial

HEAVY = ("torch", "torchvision", "ray")
MNIST_LIKE = {"mnist", "fashion_mnist", "kmnist"}


def _heavy_after(code: str) -> list[str]:
    """The heavy modules a fresh interpreter holds after running ``code`` (in the repository)."""
    probe = f"\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code) + probe], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def _data_root(name: str, mnist_root: str, tmp_path: Path) -> list[str]:
    """An override pointing the config at data that passes its pre-flight check."""
    if name in MNIST_LIKE:
        return [f"data.root={mnist_root}"]
    if name.startswith("cifar") or name in ("tiny_imagenet", "imagenet"):   # absent here: stand-ins
        return [f"data.root={fake_data_root(name, tmp_path / name)}"]
    return []


def test_config_validation_and_cache_key_import_no_torch_or_ray(mnist_root, tmp_path):
    # a config naming a data set or model that issue 25's parallel parts add joins once they land
    configs = [p for p in sorted((REPO / "configs").glob("*.yaml")) if not pending_in_this_build(flat_config(p))]
    loads = [(str(p), _data_root(yaml.safe_load(p.read_text())["data"]["name"], mnist_root, tmp_path))
             for p in configs]
    assert {Path(p).stem for p, _ in loads} >= {"digits", "mnist_lenet300", "cifar10_resnet20"}
    assert _heavy_after(f"""
        import cts_ray.config as C
        from cts_ray.cache import DenseCache
        for path, overrides in {loads!r}:
            cfg = C.load(path, overrides)
            DenseCache({str(tmp_path / 'cache')!r}).key(cfg)
        """) == []


@pytest.mark.parametrize("sweep", ["quickstart", "method_comparison"])
def test_dry_run_imports_no_torch_or_ray(sweep, mnist_root):
    """quickstart (digits) and an MNIST sweep with LTR chains (the data folder's check, LTR rounds)."""
    argv = ["sweep", f"tune_configs/{sweep}.yaml", "--dry-run"]
    argv += ["--set", f"data.root={mnist_root}"] if sweep != "quickstart" else []
    assert _heavy_after(f"""
        from cts_ray import cli
        assert cli.main({argv!r}) == 0
        """) == []


def test_report_imports_no_torch_or_ray(tmp_path):
    root = tmp_path / "small"
    for seed in range(3):   # CTS at two temperatures, a baseline and a strong ticket
        for t in (0.25, 2 / 3):
            _trial(root, seed=seed, temperature=t, acc=0.9 - seed / 100)
        _trial(root, method="random", seed=seed, acc=0.7 + seed / 100)
        _trial(root, method="gates", seed=seed, acc=0.6 + seed / 100)
    argv = ["report", str(root), "--out", str(tmp_path / "report")]
    assert _heavy_after(f"""
        from cts_ray import cli
        assert cli.main({argv!r}) == 0
        """) == []
    assert "Strong tickets" in (tmp_path / "report" / "report.md").read_text()


def test_the_sweep_driver_imports_no_torch():
    """A sweep's driver (often a CPU head node) loads its modules without torch: trials import it
    (each trial process's start costs seconds less, and so does every `cts-ray sweep`)."""
    sweep = sorted(p.stem for p in (REPO / "cts_ray" / "sweep").glob("*.py") if p.stem != "__init__")
    assert {"runner", "trainable", "mlflow_log", "resume"} <= set(sweep)
    held = _heavy_after("\n".join(f"import cts_ray.sweep.{m}" for m in sweep))
    assert "torch" not in held and "torchvision" not in held, held


def test_a_trial_process_imports_torchvision_only_for_its_models():
    """torchvision's import (torch._dynamo with it) costs every trial ~1.4 s; only ViT/Swin need it."""
    assert "torchvision" not in _heavy_after("import cts_ray.pipeline, cts_ray.compact")
    assert "torchvision" in _heavy_after("from cts_ray import models; models.build('vit_tiny', (3, 32, 32), 10)")


# ---------------------------------------------------------------- registries and implementations agree

def test_model_and_objective_names_are_the_registries():
    from cts_ray import models, names, objectives
    assert list(names.MODELS) == list(models.MODELS)
    assert names.RESNETS <= set(names.MODELS)
    assert list(names.OBJECTIVES) == list(objectives.OBJECTIVES)


def test_every_method_resolves_to_its_search_function():
    from cts_ray import methods
    from cts_ray.methods import METHODS, base, cts, ltr, saliency, simple, strong
    expected = {"cts": cts.search, "ltr": ltr.search, "snip": saliency.snip, "grasp": saliency.grasp,
                "synflow": saliency.synflow, "magnitude": simple.magnitude, "random": simple.random,
                "gates": strong.gates, "edge_popup": strong.edge_popup}
    assert {name: m.search for name, m in METHODS.items()} == expected
    assert methods.SearchContext is base.SearchContext and methods.Ticket is base.Ticket
    assert strong.DEFAULT_INIT == {"gates": "kaiming_uniform", "edge_popup": "signed_constant"}


def test_data_set_files_are_torchvisions():
    import torchvision.datasets as tvd
    from cts_ray.datasets import CIFAR_FILES, MNIST_RESOURCES
    for cls_name, resources in MNIST_RESOURCES.items():
        assert resources == [tuple(r) for r in getattr(tvd, cls_name).resources], cls_name
    for cls_name, (folder, files) in CIFAR_FILES.items():
        cls = getattr(tvd, cls_name)
        assert folder == cls.base_folder
        assert list(files) == [n for n, _ in [*cls.train_list, *cls.test_list]] + [cls.meta["filename"]], cls_name


def test_data_set_loaders_resolve():
    from cts_ray import data
    from cts_ray.datasets import DATASETS
    digits = DATASETS["digits"].loader()
    assert all(a.equal(b) for a, b in zip(digits, data.read_digits()))
    assert {name for name, info in DATASETS.items() if info.loader is None} == {"image_folder", "tiny_imagenet", "imagenet"}
