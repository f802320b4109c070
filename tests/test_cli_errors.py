"""Issue 23 points 1, 5 and 6: `cts-ray eval` rebuilds every model family from the run's full config;
every subcommand driven into its failure modes ends with one line on stderr (never a traceback)
and its documented exit code (cts_ray/errors.py); a `--set` typo gets a did-you-mean at its level;
a damaged image in an image folder is refused once, by the sweep driver, before Ray starts.

Most failures are caught before any work, so they run in this process (cli.main and capsys); one
real process checks the console script end to end."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import REPO
from cts_ray import cli, config as C, data as data_mod, image_folder as I, models, names, pipeline
from cts_ray.errors import EXIT_BAD_INPUT, EXIT_FAILED
from cts_ray.train import evaluate
from test_analysis import _trial

TINY = ["training.epochs=1", "training.milestones=[]", "search.method=snip", "search.density=0.05",
        "resources.threads=1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """This module's own decode cache (the images below are decoded here, not in ~/.cache)."""
    old = os.environ.get("CTS_RAY_CACHE")
    os.environ["CTS_RAY_CACHE"] = str(tmp_path_factory.mktemp("decoded"))
    I._LOADED.clear()
    yield Path(os.environ["CTS_RAY_CACHE"])
    I._LOADED.clear()
    os.environ.pop("CTS_RAY_CACHE") if old is None else os.environ.__setitem__("CTS_RAY_CACHE", old)


def _images(root: Path, n_train=2, n_test=3, fmt="png") -> Path:
    """A tiny image folder of 32x32 RGB images: two classes."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.{fmt}")
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory, cache) -> Path:
    return _images(tmp_path_factory.mktemp("images"))


# ---------------------------------------------------------------- point 1: eval, every model family

def _options(name: str) -> list[str]:
    """The non-default model options that apply to ``name``."""
    out = ["model.batchnorm=batch", "model.classifier_bias=pytorch"]
    out += ["model.stem=imagenet"] if name in names.STEMS else []   # on 32x32 images: not what auto picks
    return out + ["model.shortcut=conv3x3"] if name in names.RESNETS else out


def _saved_run(folder: Path, cfg, data) -> float:
    """A run folder as a run leaves it, with a ticket of random weights; returns the ticket's test loss."""
    torch.manual_seed(1)
    model = models.from_config(cfg.model, data.input_shape, data.num_classes)
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(cfg.to_yaml())
    expected = evaluate(model, data, False)
    (folder / "summary.json").write_text(json.dumps({"test_accuracy": expected["test_accuracy"]}))
    torch.save(model.state_dict(), folder / "ticket.pt")
    return expected["test_loss"]


# One model per family: the others share its builder (lenet_300_100: mlp; resnet32/56: resnet20's
# cifar_resnet; wrn28_10: WideResNet; resnet50: resnet18's ResNet), so a rebuild that works for one works
# for them.
FAMILIES = ["mlp_digits", "lenet5", "conv4", "resnet20", "resnet18", "vgg16", "wrn16_2", "vit_tiny", "swin_t"]
SAME_BUILDER = {"lenet_300_100": "mlp_digits", "resnet32": "resnet20", "resnet56": "resnet20", "wrn28_10": "wrn16_2",
               "resnet50": "resnet18"}


def test_the_families_cover_every_model():
    assert set(FAMILIES) | set(SAME_BUILDER) == set(names.MODELS)
    for name, like in SAME_BUILDER.items():
        assert type(models.build(name, (3, 32, 32), 2)) is type(models.build(like, (3, 32, 32), 2)), name


@pytest.mark.parametrize("name", FAMILIES)
def test_eval_rebuilds_every_model_family_from_the_runs_full_config(name, images, tmp_path):
    cfg = C.load(None, ["data.name=image_folder", f"data.root={images}", f"model.name={name}", *_options(name)])
    data = data_mod.load(cfg.data, "cpu")
    loss = _saved_run(tmp_path / "run", cfg, data)
    r = pipeline.evaluate_run(tmp_path / "run")
    assert r["test_accuracy"] == r["recorded"] and abs(r["test_loss"] - loss) < 1e-5


def test_cli_eval_of_a_resnet20_with_the_authors_options(images, tmp_path, capsys):
    cfg = C.load(None, ["data.name=image_folder", f"data.root={images}", "model.name=resnet20", *_options("resnet20")])
    _saved_run(tmp_path / "run", cfg, data_mod.load(cfg.data, "cpu"))
    assert cli.main(["eval", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("test accuracy ") and "equal to the recorded" in out, out


# ---------------------------------------------------------------- point 1: one line per failure

@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    """A real run folder: `cts-ray run` on digits, one epoch."""
    out = tmp_path_factory.mktemp("real") / "run"
    threads = torch.get_num_threads()
    try:
        assert cli.main(["run", *sum((["--set", o] for o in TINY), []), "--out", str(out), "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def _damaged(real_run: Path, tmp: Path, name: str, damage) -> str:
    """A copy of the real run with ``damage(folder)`` done to it."""
    folder = tmp / name
    shutil.copytree(real_run, folder)
    damage(folder)
    return str(folder)


def _truncate(path: Path, keep: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _other_model(folder: Path) -> None:
    raw = yaml.safe_load((folder / "config.yaml").read_text())
    raw["model"]["name"] = "lenet_300_100"
    (folder / "config.yaml").write_text(yaml.safe_dump(raw))


def _cases(real_run: Path, tmp: Path, images: Path) -> list:
    """(argv, exit code, what the one line says)."""
    sweep = tmp / "sweep"
    for seed in range(3):
        _trial(sweep, seed=seed)
    torn = tmp / "torn"
    shutil.copytree(sweep, torn)
    _truncate(sorted(torn.rglob("*.parquet"))[0])
    bad_yaml = tmp / "bad.yaml"
    bad_yaml.write_text("training:\n\tepochs: 1\n")
    run_set = sum((["--set", o] for o in TINY), [])
    d = lambda name, damage: _damaged(real_run, tmp, name, damage)   # noqa: E731
    return [
        (["run", str(tmp / "absent.yaml")], EXIT_BAD_INPUT, "does not exist"),
        (["run", str(bad_yaml)], EXIT_BAD_INPUT, "malformed YAML"),
        (["run", *run_set, "--set", "training.lr=1e6", "--out", str(tmp / "diverged"), "--quiet"], EXIT_FAILED,
         "cts-ray: diverged: "),
        (["run", "--set", "trainig.epochs=1"], EXIT_BAD_INPUT, "did you mean training.epochs?"),
        (["sweep", str(tmp / "absent.yaml")], EXIT_BAD_INPUT, "does not exist"),
        (["sweep", str(REPO / "tune_configs" / "quickstart.yaml"), "--set", "max_concurent=1", "--dry-run"],
         EXIT_BAD_INPUT, "did you mean max_concurrent?"),
        (["eval", str(tmp / "absent")], EXIT_BAD_INPUT, "has no config.yaml"),
        (["eval", str(sweep)], EXIT_BAD_INPUT, "has no config.yaml"),
        (["eval", d("torn-ticket", lambda f: _truncate(f / "ticket.pt"))], EXIT_BAD_INPUT, "ticket.pt' cannot be read"),
        (["eval", d("junk-ticket", lambda f: (f / "ticket.pt").write_text("junk"))], EXIT_BAD_INPUT,
         "ticket.pt' cannot be read"),
        (["eval", d("other-model", _other_model)], EXIT_BAD_INPUT, "does not fit the model its config.yaml describes"),
        (["eval", d("torn-summary", lambda f: _truncate(f / "summary.json"))], EXIT_BAD_INPUT,
         "summary.json' cannot be read"),
        (["eval", d("torn-config", lambda f: (f / "config.yaml").write_text("seed: [\n"))], EXIT_BAD_INPUT,
         "malformed YAML"),
        (["eval", d("no-ticket", lambda f: (f / "ticket.pt").unlink())], EXIT_BAD_INPUT, "has no ticket.pt"),
        (["export", d("torn-mask", lambda f: _truncate(f / "mask.pt"))], EXIT_BAD_INPUT, "mask.pt' cannot be read"),
        (["export", str(sweep)], EXIT_BAD_INPUT, "has no config.yaml"),
        (["analyze", "seeds", str(tmp / "absent")], EXIT_BAD_INPUT, "does not exist"),
        (["analyze", "seeds", str(real_run)], EXIT_BAD_INPUT, "holds no trials table"),
        (["analyze", "seeds", str(torn)], EXIT_BAD_INPUT, "the trials table cannot be read"),
        (["analyze", "seeds", str(sweep), "--where", "seed"], EXIT_BAD_INPUT, "is not COLUMN=VALUE"),
        (["analyze", "seeds", str(sweep), "--metric", "speed"], EXIT_BAD_INPUT, "metric: 'speed'"),
        (["analyze", "seedz", str(sweep)], EXIT_BAD_INPUT, "invalid choice"),
        (["report", str(torn)], EXIT_BAD_INPUT, "the trials table cannot be read"),
        (["report", str(real_run)], EXIT_BAD_INPUT, "holds no trials table"),
        (["config", str(tmp / "absent.yaml")], EXIT_BAD_INPUT, "does not exist"),
        (["config", "--set", "search.densty=0.1"], EXIT_BAD_INPUT, "did you mean search.density?"),
    ]


def _main(argv: list) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:   # argparse
        return e.code


def test_every_subcommand_fails_in_one_line_with_its_exit_code(real_run, images, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    try:
        for argv, code, says in _cases(real_run, tmp_path, images):
            got = _main(argv)
            err = capsys.readouterr().err
            lines = err.strip().splitlines()
            assert got == code and len(lines) == 1 and says in lines[0], (argv, got, err)
            assert lines[0].startswith("cts-ray: ") and "Traceback" not in err, err
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------- point 5: --set typos at every level

@pytest.mark.parametrize("override,says", [
    ("max_concurent=1", "max_concurent: unknown key; did you mean max_concurrent? sweep keys: name, base,"),
    ("serch.density=0.1", "serch.density: unknown key; did you mean search.density? sweep keys:"),
    ("search.densty=0.1", "search.densty: unknown key; did you mean search.density? allowed keys in search:"),
    ("grid.seeed=[1]", "grid.seeed: unknown key; did you mean grid.seed? allowed top-level keys: seed, data"),
    ("grid.search.desnity=[0.1]", "did you mean grid.search.density? allowed keys in search:"),
    ("mlflow.tracking_ur=x", "did you mean mlflow.tracking_uri? allowed keys in mlflow: tracking_uri"),
    ("scheduler.asha.grace_perod=1", "did you mean grace_period? choose one of: grace_period"),
    ("searcher=gird", "searcher: 'gird' is not allowed; did you mean grid?"),
    ("num_sample=2", "did you mean num_samples?"),
])
def test_a_set_typo_gets_the_keys_of_its_level_and_a_did_you_mean(override, says):
    from cts_ray.sweep import spec
    with pytest.raises(C.ConfigError) as e:
        spec.load(REPO / "tune_configs" / "quickstart.yaml", [override])
    assert says in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_run_config_typo_gets_a_did_you_mean():
    with pytest.raises(C.ConfigError, match=r"^trainig.epochs: unknown key; did you mean training.epochs\? "
                                            r"allowed top-level keys: seed, data"):
        C.load(None, ["trainig.epochs=1"])
    with pytest.raises(C.ConfigError, match=r"^model.shortcutt: unknown key; did you mean model.shortcut\?"):
        C.from_dict({"model": {"shortcutt": "conv3x3"}})
    with pytest.raises(C.ConfigError, match=r"^search.xyz: unknown key; allowed keys in search: method"):
        C.load(None, ["search.xyz=1"])   # nothing close: no guess


# ---------------------------------------------------------------- point 6: image folders, pre-flight

def test_a_damaged_jpeg_is_refused_once_before_ray_starts(tmp_path, cache, capsys, monkeypatch):
    import ray
    root = _images(tmp_path / "jpegs", n_train=3, n_test=3, fmt="jpg")
    _truncate(root / "train" / "b" / "1.jpg", keep=400)   # a real JPEG cut short: its header still reads
    (root / "train" / "b" / "1.jpg").touch()
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "s", "storage": str(tmp_path / "sweeps"), "base": str(REPO / "configs" / "digits.yaml"),
        "set": {"data.name": "image_folder", "data.root": str(root), "model.name": "conv4"},
        "grid": {"seed": [0, 1]}}))
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init: the damaged image got past the driver"))
    assert not ray.is_initialized()
    assert cli.main(["sweep", str(sweep)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.root: train/b/1.jpg cannot be decoded" in err, err
    assert not (tmp_path / "sweeps" / "s" / "tune").exists()


def test_the_driver_decodes_into_the_cache_the_trials_read(tmp_path, cache, capsys):
    from cts_ray.sweep import preflight, spec
    root = _images(tmp_path / "ok", fmt="jpg")
    s = spec.from_mapping({"name": "p", "storage": str(tmp_path / "sweeps"),
                           "set": {"data.name": "image_folder", "data.root": str(root), "model.name": "conv4"},
                           "grid": {"data.image_size": [None, 16], "seed": [0, 1]}})
    assert preflight.image_folders(s) == [("image_folder", str(root), None), ("image_folder", str(root), 16)]
    streamed = spec.from_mapping({"name": "q", "storage": str(tmp_path / "sweeps"),
                                  "set": {"data.name": "image_folder", "data.root": str(root), "data.stream": "on"}})
    assert preflight.image_folders(streamed) == []                      # a streamed folder is decoded as it is read
    said = []
    preflight.decode_images(s, said.append)
    assert len(said) == 4 and "10 images decoded" in said[1]          # each folder and size, once
    key = I.scan(root).key(16)
    assert I.cache_path(key).is_file()                                  # what a trial's load reads
    said.clear()
    preflight.decode_images(s, said.append)                            # warm: nothing to say
    assert said == []
