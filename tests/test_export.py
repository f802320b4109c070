"""Compact tickets (cts_ray/compact.py) and `cts-ray export` (cts_ray/export.py): the compact model
computes the masked ticket's function on real test sets, for every family compaction supports and
for tickets with known dead units, constant-only units, cut layers and dead input pixels; the
artifact loads with torch alone; the CLI refuses bad input in one line."""
import dataclasses
import json
import subprocess

import numpy as np
import pytest
import torch
from torch import nn

from cts_ray import cli, config, data as data_mod, models
from cts_ray.anatomy import anatomy
from cts_ray.errors import CompactError
from cts_ray.compact import Constant, GatherConv2d, compact, plan
from cts_ray.export import cost, export_run, same_logits, ticket_cost
from cts_ray.masking import Mask, layer_shapes

from conftest import BIN

DIGITS = (1, 8, 8)


def _data(name="digits", **kw):
    overrides = [f"data.name={name}", *(f"data.{k}={v}" for k, v in kw.items())]
    return data_mod.load(config.load(None, overrides).data, "cpu")


@pytest.fixture(scope="module")
def digits():
    return _data()


def _randomise(net: nn.Module, seed: int) -> nn.Module:
    """Non-zero biases, BatchNorm shifts and statistics: constant units then carry a real constant."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=g))
                if m.running_mean is not None:
                    m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return net.eval()


def _mask(net: nn.Module, density: float, seed: int, cut: float = 0.2) -> Mask:
    """Random kept weights, then a fraction ``cut`` of each layer's units without inputs (constant
    units) and of its inputs unread (dead units, dead input pixels); the image channels stay read."""
    g = torch.Generator().manual_seed(seed)
    shapes = layer_shapes(net)
    out = {}
    for i, (n, s) in enumerate(shapes.items()):
        m = torch.rand(s, generator=g) < density
        if i < len(shapes) - 1:
            m[torch.rand(s[0], generator=g) < cut] = False
        if len(s) == 2 or i > 0:
            m[:, torch.rand(s[1], generator=g) < cut] = False
        out[n] = m
    return Mask(out)


def _compare(net: nn.Module, mask: Mask, data, shape=None):
    """Compact ``net`` under ``mask``; assert equal logits and accuracy on ``data``'s whole test set."""
    small, info = compact(net, mask, shape or data.input_shape)
    masked = net.eval()
    mask.apply_(masked)
    right = [0, 0]
    with torch.no_grad():
        for x, y in data.test_batches():
            want, got = masked(x), small(x)
            assert same_logits(got, want), float((got - want).abs().max())
            right[0] += int((want.argmax(1) == y).sum())
            right[1] += int((got.argmax(1) == y).sum())
    assert right[0] == right[1]
    return small, info


FAMILIES = [("mlp_digits", {}, 0.3), ("lenet_300_100", {}, 0.1), ("conv4", {}, 0.1), ("resnet20", {}, 0.2),
            ("resnet20", {"batchnorm": "batch", "shortcut": "conv3x3", "classifier_bias": "pytorch"}, 0.2),
            ("wrn16_2", {}, 0.2)]


@pytest.mark.parametrize("name,options,density", FAMILIES, ids=[f"{n}-{'-'.join(o.values()) or 'default'}"
                                                                 for n, o, _ in FAMILIES])
def test_compact_model_gives_the_masked_tickets_logits_on_digits(digits, name, options, density):
    torch.manual_seed(0)
    net = _randomise(models.build(name, DIGITS, 10, **options), 1)
    mask = _mask(net, density, 2)
    small, info = _compare(net, mask, digits)
    assert not info["collapsed"]
    kept = [ly for ly in info["layers"] if "outputs" in ly]
    assert any(ly["kept_outputs"] < ly["outputs"] for ly in kept)   # something was dropped
    assert cost(small, DIGITS)["flops"] < cost(net, DIGITS)["flops"]


def test_lenet5_on_the_whole_mnist_test_set_and_vgg16_on_part_of_it(mnist_root):
    torch.manual_seed(0)
    lenet5 = _randomise(models.build("lenet5", (1, 28, 28), 10), 1)
    _compare(lenet5, _mask(lenet5, 0.2, 2), _data("mnist", root=mnist_root))
    # VGG-16 on 100 test images: its dense forward (0.24 GMAC an image at 28x28) is what costs here
    vgg = _randomise(models.build("vgg16", (1, 28, 28), 10), 1)
    _compare(vgg, _mask(vgg, 0.05, 2), _data("mnist", root=mnist_root, test_subset=100))


def test_known_dead_and_constant_units_and_dead_pixels_are_counted_and_folded(digits):
    torch.manual_seed(0)
    net = _randomise(models.build("lenet_300_100", DIGITS, 10), 1)
    mask = _mask(net, 0.5, 2, cut=0.0)
    mask.layers["1.weight"][:10] = False          # units 0-9 of layer 1: no inputs, constant (bias, ReLU)
    mask.layers["3.weight"][:, 10:20] = False     # units 10-19 of layer 1: nothing reads them
    mask.layers["1.weight"][:, :8] = False        # pixels 0-7: read by no kept weight
    mask.layers["3.weight"][:5] = False           # layer 2: 5 constant units, 5 unread ones
    mask.layers["5.weight"][:, 5:10] = False
    small, info = _compare(net, mask, digits)
    outputs = {ly["layer"]: ly["kept_outputs"] for ly in info["layers"] if "outputs" in ly}
    assert outputs == {"1": 280, "3": 90}
    assert info["input_features"] == {"kept": 56, "of": 64}
    alive = {r["layer"]: r["alive_units"] for r in anatomy(net, mask, DIGITS).report()[:2]}
    assert alive == {"1.weight": 280, "3.weight": 90}
    assert small[1].weight.shape == (280, 56) and small[1].index.tolist() == list(range(8, 64))
    with torch.no_grad():   # the folded constants matter: without the constant units' biases, other logits
        x = next(digits.test_batches())[0]
        before = net(x)
        net[1].bias[:10] = 0
        net[3].bias[:5] = 0
        assert not same_logits(net(x), before)


def test_a_cut_layer_exports_to_the_constant_logits(digits):
    torch.manual_seed(0)
    net = _randomise(models.build("lenet_300_100", DIGITS, 10), 1)
    mask = _mask(net, 0.3, 2)
    mask.layers["3.weight"][:] = False
    small, info = _compare(net, mask, digits)
    assert isinstance(small, Constant) and info["collapsed"]
    assert "collapsed" in info["message"] and "\n" not in info["message"]
    assert ticket_cost(net, mask, DIGITS)["compact_flops"] == 0


def test_a_constant_channel_into_a_padded_conv_becomes_a_bias_map(digits):
    torch.manual_seed(0)
    net = _randomise(models.build("conv4", DIGITS, 10), 1)
    mask = _mask(net, 0.3, 2, cut=0.0)
    mask.layers["0.weight"][:4] = False           # channels 0-3: their bias through ReLU, everywhere
    with torch.no_grad():
        net[0].bias[:4] = 1.0
    small, _ = _compare(net, mask, digits)
    assert small[2].bias_map is not None and isinstance(small[2], GatherConv2d)


def test_an_unread_image_channel_is_gathered_away(digits):
    torch.manual_seed(0)
    net = _randomise(models.build("conv4", (3, 8, 8), 10), 1)
    mask = _mask(net, 0.3, 2, cut=0.0)
    mask.layers["0.weight"][:, 1] = False         # the green channel: no kept weight reads it
    colour = torch.tensor([1.0, 0.5, -1.0]).view(1, 3, 1, 1)
    rgb = dataclasses.replace(digits, test_x=digits.test_x.repeat(1, 3, 1, 1) * colour)
    small, info = _compare(net, mask, rgb, (3, 8, 8))
    assert small[0].index.tolist() == [0, 2] and info["input_features"] == {"kept": 2, "of": 3}


def test_residual_stream_channel_goes_only_when_dead_in_every_block(digits):
    torch.manual_seed(0)
    net = _randomise(models.build("resnet20", DIGITS, 10), 1)
    mask = _mask(net, 0.3, 2, cut=0.0)
    stage1 = [f"blocks.{i}" for i in range(3)]
    for name in ["stem.0", *(f"{b}.conv2" for b in stage1)]:   # channel 5 written by no one in stage 1
        mask.layers[f"{name}.weight"][5] = False
    mask.layers["blocks.0.conv2.weight"][7] = False            # channel 7: written by blocks 1 and 2 still
    for name in [*(f"{b}.conv1" for b in stage1), "blocks.3.conv1", "blocks.3.shortcut.0"]:
        mask.layers[f"{name}.weight"][:, 9] = False            # channel 9: read by no one
    small, info = _compare(net, mask, digits)
    stream = {ly["layer"]: ly["kept_outputs"] for ly in info["layers"] if ly["layer"].endswith(("stem.0", "conv2"))}
    assert stream["stem.0"] == stream["blocks.0.conv2"] == stream["blocks.2.conv2"] == 14   # 5 and 9 gone, 7 kept
    assert small.stem[0].weight.shape[0] == 14


def test_transformers_are_refused_in_one_line():
    for name in ("vit_tiny", "swin_t"):
        with pytest.raises(CompactError, match="transformers are not compacted") as e:
            plan(models.build(name, (3, 32, 32), 10))
        assert "\n" not in str(e.value)


# ------------------------------------------------------------------ the artifact and the CLI

def _fake_run(folder, model_cfg: dict, shape, seed=0, density=0.2):
    """A run folder as `cts-ray run` writes it, from a hand-made ticket (no training)."""
    cfg = config.load(None, [f"model.{k}={v}" for k, v in model_cfg.items()])
    folder.mkdir()
    (folder / "config.yaml").write_text(cfg.to_yaml())
    (folder / "summary.json").write_text(json.dumps({"data": {"input_shape": list(shape), "num_classes": 10,
                                                              "mean": [0.3], "std": [0.4]}}))
    torch.manual_seed(seed)
    net = _randomise(models.from_config(cfg.model, shape, 10), seed)
    mask = _mask(net, density, seed)
    mask.apply_(net)
    mask.save(folder / "mask.pt")
    torch.save(net.state_dict(), folder / "ticket.pt")
    return net, mask


def test_cli_run_then_export_gives_an_artifact_that_plain_torch_runs(tmp_path, digits, capsys):
    run = tmp_path / "run"
    tiny = ["training.epochs=2", "training.milestones=[1]", "search.method=snip", "search.density=0.02"]
    threads = torch.get_num_threads()
    try:   # in-process: the run sets torch's threads for its model size
        assert cli.main(["run", *sum((["--set", o] for o in tiny), []), "--out", str(run), "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert cli.main(["export", str(run)]) == 0
    out = capsys.readouterr().out
    assert "compact ticket:" in out and "checked:" in out
    meta = json.loads((run / "compact.json").read_text())
    assert meta["check"]["same_logits"] and meta["input_shape"] == [1, 8, 8]
    assert meta["cost"]["compact"]["flops"] < meta["cost"]["dense"]["flops"]
    resnet = tmp_path / "resnet"   # every model option travels: batch statistics, 3x3 shortcuts
    net, mask = _fake_run(resnet, {"name": "resnet20", "batchnorm": "batch", "shortcut": "conv3x3"}, DIGITS)
    export_run(resnet, tmp_path / "resnet.pt2")

    x = torch.cat([b[0] for b in digits.test_batches()])
    torch.save(x, tmp_path / "x.pt")
    script = ("import sys; sys.modules['cts_ray'] = None; import torch; x = torch.load(sys.argv[1]); "
              "torch.save([torch.export.load(p).module()(x) for p in sys.argv[2:]], sys.argv[1] + '.out')")
    subprocess.run([str(BIN / "python"), "-c", script, str(tmp_path / "x.pt"), str(run / "compact.pt2"),
                    str(tmp_path / "resnet.pt2")], check=True, timeout=120)
    got = torch.load(tmp_path / "x.pt.out")
    ticket = models.build("mlp_digits", DIGITS, 10)
    ticket.load_state_dict(torch.load(run / "ticket.pt"))
    with torch.no_grad():
        assert same_logits(got[0], ticket.eval()(x))
        assert same_logits(got[1], net.eval()(x))


def test_cli_refusals_are_one_line(tmp_path, capsys):
    _fake_run(tmp_path / "vit", {"name": "vit_tiny"}, (3, 32, 32), density=0.05)
    (tmp_path / "empty").mkdir()
    _fake_run(tmp_path / "mlp", {"name": "mlp_digits"}, DIGITS)
    cases = [("no config.yaml", [str(tmp_path / "empty")]), ("no config.yaml", [str(tmp_path / "absent")]),
             ("is a folder", [str(tmp_path / "mlp"), "--out", str(tmp_path)]),
             ("does not exist", [str(tmp_path / "mlp"), "--out", str(tmp_path / "nowhere" / "x.pt2")]),
             ("VisionTransformer: transformers are not compacted", [str(tmp_path / "vit")])]
    for expected, args in cases:
        assert cli.main(["export", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("cts-ray: error: ") and err.count("\n") == 1 and expected in err, err


def test_every_run_records_its_inference_cost_and_the_report_compares_it(tmp_path):
    """compact_params / compact_flops / compact_flops_fraction: in summary.json, the trials table,
    Tune's and MLflow's final metrics (records.final_metrics), and the report's inference-cost table."""
    import time

    from cts_ray import config as C, pipeline
    from cts_ray.export import load_ticket, ticket_cost
    from cts_ray.records import Trial, final_metrics
    from cts_ray.sweep import tables, trainable

    root = tmp_path / "sweep"
    fractions = {}
    for method in ("snip", "random"):
        for density in (0.1, 0.02):
            for seed in (0, 1):
                cfg = C.load(None, [f"search.method={method}", f"search.density={density}", f"seed={seed}",
                                    "training.epochs=2", "training.milestones=[]", "search.point=init",
                                    "training.dense_baseline=false", "resources.device=cpu"])
                folder = root / "trials" / f"{method}-{cfg.hash}"
                s = pipeline.run(cfg, folder, progress=False)
                model, mask, shape, _ = load_ticket(folder)
                cost = ticket_cost(model, mask, shape)
                assert (s["compact_params"], s["compact_flops"]) == (cost["compact_params"], cost["compact_flops"])
                assert 0 < s["compact_flops_fraction"] < 1
                assert final_metrics(s)["compact_flops"] == s["compact_flops"]
                fractions.setdefault((method, density), []).append(100 * s["compact_flops_fraction"])
                common = {"sweep": root.name, "trial_id": folder.name, "config_hash": cfg.hash, **tables.axes(cfg)}
                trainable.write_trial_row(root, cfg, common, Trial(status="finished", run_dir=str(folder),
                                                                   started_at=time.time()), s)
    row = tables.read(root, "trials").to_pylist()[0]
    assert row["compact_flops"] > 0 and row["compact_params"] > 0
    assert cli.main(["report", str(root), "--out", str(tmp_path / "report")]) == 0
    table = (tmp_path / "report" / "report.md").read_text().split("## Inference cost")[1]
    lines = table.strip().splitlines()
    assert lines[0] == "| setting | density 0.1 | density 0.02 |"
    snip = next(line for line in lines if line.startswith("| snip |"))
    assert f"· {np.mean(fractions['snip', 0.1]):.3g} %" in snip.split("|")[2]
    assert "Cheapest to run" in table
