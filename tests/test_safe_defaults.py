"""GitHub issue 7, item 6: safe defaults, each checked for real.

- checkpoints load with ``weights_only=True``: every ``torch.load`` in the package says so, what
  the project writes loads that way, and a pickle that runs code is refused without running it;
- YAML is read with the safe loader: a ``!!python/object/apply`` file is refused and runs nothing;
- every server the project starts listens on 127.0.0.1 unless the user says otherwise;
- ``cluster.yaml`` (and the shipped configs) hold no secrets;
- ``--set`` cannot write outside the config tree.
"""
from __future__ import annotations

import ast
import os
import pickle
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from cts_ray import config as C
from cts_ray.config import ConfigError

from conftest import REPO

PACKAGE = REPO / "cts_ray"


def _sources():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    return [(f, ast.parse(f.read_text(), filename=str(f))) for f in files]


def _calls(tree, module: str, names: set):
    """Calls of ``module.name(...)`` for name in names (also via ``from module import name``)."""
    direct = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
              and node.module == module for a in node.names if a.name in names}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if (isinstance(f, ast.Attribute) and f.attr in names and isinstance(f.value, ast.Name)
                and f.value.id == module) or (isinstance(f, ast.Name) and f.id in direct):
            yield node


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


# ---------------------------------------------------------------- checkpoints

def test_every_torch_load_in_the_package_is_weights_only():
    found, bad = [], []
    for f, tree in _sources():
        for call in _calls(tree, "torch", {"load"}):
            where = f"{f.relative_to(REPO)}:{call.lineno}"
            found.append(where)
            wo = _kw(call, "weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                bad.append(where)
        for call in _calls(tree, "pickle", {"load", "loads", "Unpickler"}):
            bad.append(f"{f.relative_to(REPO)}:{call.lineno} (pickle)")
    assert len(found) >= 3, found        # masks, the dense cache, trial checkpoints
    assert bad == [], f"torch.load without weights_only=True (or raw pickle) at {bad}"


class _RunsCode:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_what_the_project_writes_loads_weights_only(tmp_path):
    """A real (tiny) run: the run folder's tensors, the dense cache and a trial checkpoint."""
    from cts_ray import pipeline
    from cts_ray.cache import DenseCache
    from cts_ray.masking import Mask

    cfg = C.load(REPO / "configs" / "digits.yaml", ["training.epochs=2", "training.milestones=[1]",
                                                    "training.dense_baseline=false", "data.subset=256",
                                                    "data.test_subset=128", "resources.device=cpu"])
    states = []

    def on_record(record, progress):
        if progress is not None:        # what a sweep trial checkpoints (sweep/trainable.py)
            path = tmp_path / f"progress{len(states)}.pt"
            torch.save(progress.to_state(), path)
            states.append(path)

    pipeline.run(cfg, tmp_path / "run", progress=False, on_record=on_record, cache=DenseCache(tmp_path / "cache"))
    written = sorted((tmp_path / "run").glob("*.pt")) + sorted((tmp_path / "cache").rglob("*.pt")) + states
    names = {p.name for p in written}
    assert {"mask.pt", "search_point.pt", "dense.pt"} <= names and states, names
    for path in written:
        torch.load(path, weights_only=True)
    resumed = pipeline.Progress.from_state(torch.load(states[-1], weights_only=True))
    assert resumed.ticket is not None and resumed.retrain is not None and resumed.records
    mask = Mask.load(tmp_path / "run" / "mask.pt")
    again = tmp_path / "again.pt"
    mask.save(again)
    assert Mask.load(again).sha256() == mask.sha256()


@pytest.mark.parametrize("fmt", ["torch.save", "pickle"])
def test_a_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path, fmt):
    from cts_ray.cache import DenseCache
    from cts_ray.masking import Mask

    def write(path, marker):
        if fmt == "torch.save":
            torch.save({"layer.weight": _RunsCode(marker)}, path)
        else:
            with open(path, "wb") as f:
                pickle.dump({"layer.weight": _RunsCode(marker)}, f, protocol=2)

    # the payload is real: a full unpickle creates its marker
    control = tmp_path / "control.pt"
    write(control, tmp_path / "CONTROL")
    if fmt == "torch.save":
        torch.load(control, weights_only=False)
    else:
        with open(control, "rb") as f:
            pickle.load(f)
    assert (tmp_path / "CONTROL").exists()

    marker = tmp_path / "MARKER"
    evil = tmp_path / "mask.pt"
    write(evil, marker)
    with pytest.raises(pickle.UnpicklingError):
        Mask.load(evil)
    cache = DenseCache(tmp_path / "cache")
    (tmp_path / "cache" / "k").mkdir(parents=True)
    write(tmp_path / "cache" / "k" / "dense.pt", marker)
    with pytest.raises(pickle.UnpicklingError):
        cache.get_or_compute("k", "dense", lambda: pytest.fail("a cached entry was recomputed"), {})
    assert not marker.exists(), "loading a checkpoint ran code"


# ---------------------------------------------------------------- YAML

def test_yaml_is_only_read_with_the_safe_loader():
    bad = []
    for f, tree in _sources():
        for call in _calls(tree, "yaml", {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load",
                                          "full_load_all", "Loader", "UnsafeLoader", "FullLoader"}):
            loader = _kw(call, "Loader") or (call.args[1] if len(call.args) > 1 else None)
            safe = (isinstance(call.func, ast.Attribute) and call.func.attr in ("load", "load_all")
                    and isinstance(loader, ast.Attribute) and loader.attr in ("SafeLoader", "CSafeLoader"))
            if not safe:
                bad.append(f"{f.relative_to(REPO)}:{call.lineno}")
    assert bad == [], f"YAML read without the safe loader at {bad}"


@pytest.mark.parametrize("command", ["config", "sweep"])
def test_a_yaml_file_that_runs_code_is_refused(tmp_path, monkeypatch, capsys, command):
    from cts_ray import cli
    marker = tmp_path / "MARKER"
    text = (f"name: !!python/object/apply:os.system [\"touch {marker}\"]\n" if command == "sweep" else
            f"seed: !!python/object/apply:os.system [\"touch {marker}\"]\n")
    # the payload is real: an unsafe load runs it
    yaml.unsafe_load(text.replace("MARKER", "CONTROL"))
    assert (tmp_path / "CONTROL").exists()

    f = tmp_path / "evil.yaml"
    f.write_text(text)
    monkeypatch.chdir(tmp_path)
    code = cli.main([command, str(f)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "evil.yaml" in err[0] and "malformed YAML at line 1" in err[0] and "python/object/apply" in err[0], err
    assert not marker.exists(), "reading a YAML file ran code"


# ---------------------------------------------------------------- servers listen on loopback

def _makefile_recipe(target: str) -> list[str]:
    lines = (REPO / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"^{re.escape(target)}\s*:", line))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def _option(argv: list[str], name: str):
    """The value of ``--name VALUE`` or ``--name=VALUE`` (None when absent)."""
    for i, a in enumerate(argv):
        if a == name:
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def test_makefile_mlflow_ui_listens_on_loopback():
    recipe = _makefile_recipe("mlflow-ui")
    commands = [shlex.split(line) for line in recipe if "mlflow" in line]
    assert len(commands) == 1, recipe
    argv = commands[0]
    assert argv[0].endswith("/mlflow") and argv[1] == "ui"
    assert _option(argv, "--host") == "127.0.0.1"
    assert not any(_option(shlex.split(line), "-h") for line in recipe)


def _cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_servers_listen_on_loopback():
    cluster = _cluster()
    commands = [shlex.split(c) for key in ("head_start_ray_commands", "worker_start_ray_commands")
                for c in cluster[key]]
    mlflow = [c for c in commands if any(a.endswith("/mlflow") for a in c)]
    assert len(mlflow) == 1
    argv = mlflow[0][next(i for i, a in enumerate(mlflow[0]) if a.endswith("/mlflow")):]
    assert argv[1] == "server" and _option(argv, "--host") == "127.0.0.1"
    ray_starts = [c for c in commands if "start" in c and any(a.endswith("/ray") for a in c)]
    heads = [c for c in ray_starts if "--head" in c]
    assert len(heads) == 1 and _option(heads[0], "--dashboard-host") == "127.0.0.1"
    for c in ray_starts:
        assert _option(c, "--dashboard-host") in (None, "127.0.0.1"), c
        assert _option(c, "--ray-client-server-port") is None, c


def test_local_ray_has_no_dashboard_or_a_loopback_one():
    """runner.py's ray.init: the dashboard is off, or bound to 127.0.0.1."""
    tree = ast.parse((PACKAGE / "sweep" / "runner.py").read_text())
    inits = list(_calls(tree, "ray", {"init"}))
    assert len(inits) == 1
    include, host = _kw(inits[0], "include_dashboard"), _kw(inits[0], "dashboard_host")
    off = isinstance(include, ast.Constant) and include.value is False
    loopback = isinstance(host, ast.Constant) and host.value == "127.0.0.1"
    assert off or loopback


def test_nothing_binds_all_interfaces():
    """No project source or shipped file names 0.0.0.0 / :: as a host."""
    texts = {f.relative_to(REPO): f.read_text() for f in [*PACKAGE.rglob("*.py"), REPO / "Makefile",
                                                        REPO / "cluster.yaml", *REPO.glob("*configs/*.yaml")]}
    for name, text in texts.items():
        assert not re.search(r"0\.0\.0\.0|\[::\]|--host[= ]::", text), name


# ---------------------------------------------------------------- no secrets

SECRET_PATTERNS = {
    "AWS access key id": r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",
    "AWS secret key name": r"(?i)aws_secret_access_key|aws_session_token",
    "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY|-----BEGIN",
    "GitHub token": r"\bgh[pousr]_[A-Za-z0-9]{30,}",
    "password/token/secret value": r"(?im)^[^#\n]*\b(password|passwd|token|secret|api_key|apikey)\b\s*[:=]\s*\S",
}
SECRET_KEYS = re.compile(r"(?i)password|passwd|token|secret|api_?key|access_key|credential")


def _walk(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}" if path else str(k))
            yield path, k, v
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


@pytest.mark.parametrize("name", ["cluster.yaml", "Makefile", "configs", "tune_configs"])
def test_no_secrets_in_shipped_files(name):
    target = REPO / name
    files = sorted(target.glob("*.yaml")) if target.is_dir() else [target]
    assert files
    for f in files:
        text = f.read_text()
        for what, pattern in SECRET_PATTERNS.items():
            m = re.search(pattern, text)
            assert m is None, f"{f.name}: {what}: {m.group(0)!r}"
        if f.suffix == ".yaml":
            for path, key, value in _walk(yaml.safe_load(text)):
                assert not (SECRET_KEYS.search(str(key)) and value not in (None, "")), f"{f.name}: {path}.{key}"


def test_cluster_auth_names_no_key():
    auth = _cluster()["auth"]
    assert set(auth) == {"ssh_user"}, auth          # Ray makes its own key pair; none is named here
    for node in _cluster()["available_node_types"].values():
        assert "KeyName" not in node["node_config"]


# ---------------------------------------------------------------- --set stays in the config tree

RUN_ESCAPES = ["__class__=x", "data.__dict__=1", "../x=1", "data.root.sub=1", "training=5",
               "seed.real=1", "search.density.__class__=1", "data..root=1", ".data=1", "data.=1", "=1",
               "__builtins__.open=1", "data.__init__=1", "model.name.upper=1"]


@pytest.mark.parametrize("override", RUN_ESCAPES)
def test_run_set_cannot_leave_the_config_tree(override, capsys):
    from cts_ray import cli
    with pytest.raises(ConfigError) as e:
        C.load(None, [override])
    assert "\n" not in str(e.value)
    assert cli.main(["config", "--set", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cts-ray: error: "), err
    # nothing leaked into the classes or the defaults
    fresh = C.load()
    assert type(fresh.data) is C.DataConfig and fresh == C.Config() and not hasattr(C.DataConfig, "x")
    assert "__dict__" not in vars(fresh.data) and "sub" not in vars(C.DataConfig)


SWEEP_ESCAPES = ["set.__init__=1", "storage.x=1", "name.x=1", "grid.__class__=[1]", "mlflow.__dict__=1",
                 "mlflow.experiment.x=1", "__class__=x", "../x=1", "set.data.root.sub=1", "set.training=5",
                 "sample.__class__={uniform: [0, 1]}", "scheduler.asha.__init__=1"]


@pytest.mark.parametrize("override", SWEEP_ESCAPES)
def test_sweep_set_cannot_leave_the_sweep_tree(override, tmp_path, monkeypatch, capsys):
    from cts_ray import cli
    from cts_ray.sweep import spec as spec_mod
    f = tmp_path / "s.yaml"
    storage = tmp_path / "results"
    f.write_text(yaml.safe_dump({"base": str(REPO / "configs" / "digits.yaml"), "storage": str(storage),
                                 "set": {"training.epochs": 2, "training.milestones": [1]}}))
    with pytest.raises(ConfigError) as e:
        spec_mod.load(f, [override])
    assert "\n" not in str(e.value)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["sweep", str(f), "--set", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cts-ray: error: "), err
    assert not storage.exists()
