"""Typed config: YAML + --set overrides, full serialisation, stable hash, one-line refusals."""
import subprocess
import sys

import pytest
import yaml

from cts_ray import config as C
from cts_ray.config import ConfigError

from conftest import REPO


def test_defaults_are_the_embedded_digits_run():
    cfg = C.load()
    assert (cfg.data.name, cfg.model.name, cfg.search.method, cfg.search.objective) == \
        ("digits", "mlp_digits", "cts", "kl_reverse")
    assert cfg.search.controller == "gradbalance" and cfg.search.temperature == pytest.approx(2 / 3)


def test_yaml_overrides_roundtrip_and_hash(tmp_path):
    cfg = C.load(REPO / "configs" / "digits.yaml", ["search.density=0.01", "seed=3", "training.milestones=[2, 4]"])
    assert cfg.search.density == 0.01 and cfg.seed == 3 and cfg.training.milestones == [2, 4]
    # serialised in full and read back to the same config and hash
    f = tmp_path / "resolved.yaml"
    f.write_text(cfg.to_yaml())
    again = C.load(f)
    assert again == cfg and again.hash == cfg.hash
    assert set(yaml.safe_load(cfg.to_yaml())) == {"seed", "data", "model", "training", "search", "resources"}
    # the hash is the run's identity: results-changing keys change it, where/how-to-run keys do not
    assert C.load(f, ["search.density=0.02"]).hash != cfg.hash
    assert C.load(f, ["seed=4"]).hash != cfg.hash
    assert C.load(f, ["resources.threads=1", "resources.device=cpu"]).hash == cfg.hash
    assert len(cfg.hash) == 12 and cfg.hash == C.stable_hash(cfg.identity())


def test_hash_is_stable_across_processes():
    code = "from cts_ray import config; print(config.load(None, ['search.density=0.3']).hash)"
    out = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
           for _ in range(2)}
    assert len(out) == 1 and out.pop().strip() == C.load(None, ["search.density=0.3"]).hash


def test_ints_are_accepted_for_floats_and_derived_values():
    cfg = C.load(None, ["search.density=1", "training.epochs=16", "search.length=0.125",
                        "search.point=rewind", "search.rewind_epochs=3"])
    assert isinstance(cfg.search.density, float)
    assert cfg.search_epochs == 2 and cfg.search_epoch == 3
    assert C.load(None, ["search.point=init", "search.rewind_epochs=3"]).search_epoch == 0


BAD = [
    (["search.density=0"], "search.density", "(0, 1]"),
    (["search.density=1.5"], "search.density", "(0, 1]"),
    (["search.density=-0.1"], "search.density", "(0, 1]"),
    (["search.temperature=0"], "search.temperature", "> 0"),
    (["search.temperature=-1"], "search.temperature", "> 0"),
    (["model.name=resnet1000"], "model.name", "resnet20"),
    (["data.name=svhn"], "data.name", "cifar10"),
    (["search.objective=l2"], "search.objective", "kl_reverse"),
    (["search.controller=pid"], "search.controller", "gradbalance"),
    (["search.point=middle"], "search.point", "rewind"),
    (["training.epochs=-1"], "training.epochs", ">= 0"),
    (["training.epochs=ten"], "training.epochs", "integer"),
    (["data.name=mnist", "data.root=/nonexistent/folder"], "data.root", "does not exist"),
    (["data.name=mnist"], "data.root", "required"),
    (["search.densty=0.1"], "search.densty", "allowed keys in search"),
    (["optimizer=sgd"], "optimizer", "allowed top-level keys"),
    (["search.rewind_epochs=50", "search.point=rewind"], "search.rewind_epochs", "exceeds"),
]


@pytest.mark.parametrize("overrides,field,allowed", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_values_are_refused_with_one_line(overrides, field, allowed):
    with pytest.raises(ConfigError) as e:
        C.load(None, overrides)
    msg = str(e.value)
    assert msg.startswith(field) and allowed in msg and "\n" not in msg


def test_unknown_yaml_key_and_malformed_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("search:\n  density: 0.1\n  prune_rate: 0.9\n")
    with pytest.raises(ConfigError, match=r"^search.prune_rate: unknown key"):
        C.load(f)
    f.write_text("search: [unclosed\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        C.load(f)
    with pytest.raises(ConfigError, match="does not exist"):
        C.load(tmp_path / "missing.yaml")


def test_cli_refuses_bad_input_before_any_work(tmp_path, monkeypatch, capsys):
    """Every bad-input case exits non-zero with one clear line and writes nothing."""
    from cts_ray import cli
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    cases = [[f"--set={o}" for o in b[0]] for b in BAD] + [[str(tmp_path / "missing.yaml")], ["--set", "nokey"]]
    for args in cases:
        code = cli.main(["run", *args, "--out", str(out), "--quiet"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, args
        assert len(err) == 1 and err[0].startswith("cts-ray: error: "), (args, err)
    assert list(tmp_path.iterdir()) == [], "a refused run wrote something"


def test_console_script_exit_code_and_message(tmp_path):
    p = subprocess.run([str(REPO / ".venv" / "bin" / "cts-ray"), "run", "--set", "search.density=2",
                        "--out", str(tmp_path / "run")], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2
    assert p.stderr.strip() == ("cts-ray: error: search.density: 2.0 is out of range; "
                                "expected a number in (0, 1]")
    assert list(tmp_path.iterdir()) == []

