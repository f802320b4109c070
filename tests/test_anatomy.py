"""Ticket anatomy (cts_ray/anatomy.py): hand-built masks with known answers on an MLP, a conv net
and a ResNet; a fully cut layer; an independent reference on LeNet-300-100; and properties over
every registered model (effective ⊆ kept, dense = all effective, idempotent). A few seconds."""
import pytest
import torch

from cts_ray import models
from cts_ray.anatomy import anatomy
from cts_ray.masking import Mask, layer_shapes

SHAPES = {"mlp_digits": (1, 8, 8), "lenet_300_100": (1, 28, 28), "lenet5": (1, 28, 28), "conv4": (1, 28, 28),
          "resnet20": (3, 32, 32), "resnet32": (3, 32, 32), "resnet56": (3, 32, 32), "vgg16": (3, 32, 32),
          "resnet18": (3, 32, 32), "resnet50": (3, 64, 64), "wrn16_2": (3, 32, 32), "wrn28_10": (3, 32, 32),
          "vit_tiny": (3, 32, 32), "swin_t": (3, 32, 32)}


pytestmark = pytest.mark.usefixtures("one_thread")   # small single-example passes: fastest, and steady, on one thread


def _dense(model) -> dict:
    return {n: torch.ones(s, dtype=torch.bool) for n, s in layer_shapes(model).items()}


def _effective(a, layer) -> int:
    return int(a.effective.layers[layer].sum())


# ------------------------------------------------------------------ MLP: 4 inputs -> 3 -> 3 -> 2

@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return models.mlp((1, 1, 4), 2, [3, 3])    # prunable: 1.weight (3x4), 3.weight (3x3), 5.weight (2x3)


def test_mlp_unit_without_inputs_makes_its_outgoing_weights_ineffective(mlp):
    m = _dense(mlp)
    m["1.weight"][0] = False                      # hidden unit 0 of layer 1: outputs, no inputs
    a = anatomy(mlp, Mask(m), (1, 1, 4))
    assert a.effective.layers["3.weight"][:, 0].sum() == 0   # its 3 outgoing weights
    assert [_effective(a, n) for n in m] == [8, 6, 6] and a.effective_kept == 20
    assert [a.alive_units(n) for n in m] == [2, 3, 2] and a.collapsed_layers == []
    assert a.effective_density == pytest.approx(20 / 27)


def test_mlp_dead_unit_makes_its_incoming_weights_ineffective_and_death_propagates(mlp):
    m = _dense(mlp)
    m["3.weight"][:, 1] = False                   # hidden unit 1 of layer 1 reaches nothing
    a = anatomy(mlp, Mask(m), (1, 1, 4))
    assert a.effective.layers["1.weight"][1].sum() == 0 and _effective(a, "1.weight") == 8
    assert a.alive_units("1.weight") == 2         # the dead unit has no effective incoming weight
    # two hops: layer-2 unit 0 listens only to layer-1 unit 0, whose inputs are all gone
    m = _dense(mlp)
    m["1.weight"][0] = False
    m["3.weight"][0] = torch.tensor([True, False, False])
    a = anatomy(mlp, Mask(m), (1, 1, 4))
    assert a.effective.layers["5.weight"][:, 0].sum() == 0   # unit 0 of layer 2 is unreachable
    assert [_effective(a, n) for n in m] == [8, 4, 4] and [a.alive_units(n) for n in m] == [2, 2, 2]


def test_fully_cut_layer_collapses_the_ticket(mlp):
    m = _dense(mlp)
    m["3.weight"][:] = False
    a = anatomy(mlp, Mask(m), (1, 1, 4))
    assert a.effective_kept == 0 and a.effective_density == 0.0
    assert a.collapsed_layers == ["1.weight", "3.weight", "5.weight"]   # nothing is on a path
    rows = a.report()
    assert [r["alive_units"] for r in rows] == [0, 0, 0, 0] and rows[-1]["kept"] == 18


# ------------------------------------------------------------------ conv net: LeNet-5 on 28x28

def test_conv_dead_channels():
    torch.manual_seed(0)
    net = models.lenet5((1, 28, 28), 10)          # 0.weight (6,1,5,5), 3.weight (16,6,5,5), 7.weight (120,400)
    m = _dense(net)
    m["0.weight"][2] = False                       # conv1 channel 2: no input -> conv2's kernels from it
    m["3.weight"][:, 4] = False                    # conv1 channel 4: read by nobody -> its own kernel
    m["3.weight"][7] = False                       # conv2 channel 7: no input -> its 25 flattened features
    a = anatomy(net, Mask(m), (1, 28, 28))
    assert a.effective.layers["3.weight"][:, 2].sum() == 0 and a.effective.layers["0.weight"][4].sum() == 0
    assert a.effective.layers["7.weight"][:, 7 * 25:8 * 25].sum() == 0
    lost = 15 * 25 + 25 + 120 * 25   # kept, on no path: conv2 from ch 2 (row 7 is masked), ch 4's kernel, fc from ch 7
    assert a.effective_kept == _kept(m) - lost
    assert a.alive_units("0.weight") == 4 and a.alive_units("3.weight") == 15 and a.alive_units("7.weight") == 120


# ------------------------------------------------------------------ ResNet-20: residual paths

@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return models.build("resnet20", (3, 32, 32), 10)


def _kept(m) -> int:
    return sum(int(x.sum()) for x in m.values())


def test_resnet_block_pruned_away_still_passes_signal_through_its_identity(resnet):
    m = _dense(resnet)
    m["blocks.1.conv1.weight"][:] = False
    m["blocks.1.conv2.weight"][:] = False
    a = anatomy(resnet, Mask(m), (3, 32, 32))
    assert a.effective_kept == _kept(m)            # every other weight is still on a path
    assert a.collapsed_layers == ["blocks.1.conv1.weight", "blocks.1.conv2.weight"]


def test_resnet_downsampling_shortcut_pruned_to_nothing(resnet):
    m = _dense(resnet)
    m["blocks.3.shortcut.0.weight"][:] = False     # 16 -> 32 channels, stride 2: the convolutions still carry
    a = anatomy(resnet, Mask(m), (3, 32, 32))
    assert a.effective_kept == _kept(m) and a.collapsed_layers == ["blocks.3.shortcut.0.weight"]
    m["blocks.3.conv2.weight"][:] = False          # ... and now they do not: block 3's conv1 reaches nothing
    a = anatomy(resnet, Mask(m), (3, 32, 32))
    assert a.effective_kept == 0 and a.collapsed_layers == list(m)   # the only way into stage 2 is cut


def test_resnet_block_without_output_loses_its_first_convolution(resnet):
    m = _dense(resnet)
    m["blocks.4.conv2.weight"][:] = False           # identity shortcut keeps the rest connected
    a = anatomy(resnet, Mask(m), (3, 32, 32))
    assert a.effective_kept == _kept(m) - m["blocks.4.conv1.weight"].numel()
    assert a.alive_units("blocks.4.conv1.weight") == 0 and a.alive_units("blocks.5.conv1.weight") == 32


# ------------------------------------------------------------------ reference and properties

def _reference_mlp(mask: Mask) -> list:
    """Reachability by boolean matrix products, layer by layer (fully connected chains only)."""
    ms = list(mask.layers.values())
    forward = [torch.ones(ms[0].shape[1], dtype=torch.bool)]
    for w in ms:
        forward.append((w.float() @ forward[-1].float()) > 0)
    backward = [torch.ones(ms[-1].shape[0], dtype=torch.bool)]
    for w in reversed(ms):
        backward.insert(0, (w.float().T @ backward[0].float()) > 0)
    return [w & backward[i + 1][:, None] & forward[i][None, :] for i, w in enumerate(ms)]


@pytest.mark.parametrize("density", [0.05, 0.01, 0.002, 0.0005])
def test_matches_a_reference_on_lenet_300_100(density):
    torch.manual_seed(1)
    net = models.build("lenet_300_100", (1, 28, 28), 10)
    g = torch.Generator().manual_seed(int(density * 1e4))
    mask = Mask({n: torch.rand(s, generator=g) < density for n, s in layer_shapes(net).items()})
    a = anatomy(net, mask, (1, 28, 28))
    for (n, got), want in zip(a.effective.layers.items(), _reference_mlp(mask)):
        assert torch.equal(got, want), n


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_properties_on_every_registered_model(name):
    assert set(SHAPES) == set(models.MODELS), "add the new model's input shape to SHAPES"
    torch.manual_seed(0)
    net = models.build(name, SHAPES[name], 10)
    dense = Mask(_dense(net))
    a = anatomy(net, dense, SHAPES[name])
    assert all(torch.equal(a.effective.layers[n], dense.layers[n]) for n in dense.layers), "dense: all effective"
    assert a.effective_density == 1.0 and a.collapsed_layers == []
    g = torch.Generator().manual_seed(0)
    for density in (0.1, 0.01, 0.001):
        mask = Mask({n: torch.rand(m.shape, generator=g) < density for n, m in dense.layers.items()})
        a = anatomy(net, mask, SHAPES[name])
        for n in mask.layers:
            assert not (a.effective.layers[n] & ~mask.layers[n]).any(), (n, "effective outside the mask")
        rows = a.report()
        assert all(r["effective_kept"] <= r["kept"] and r["alive_units"] <= r["units"] for r in rows)
        assert rows[-1]["effective_kept"] == a.effective_kept <= mask.kept
        # removing ineffective weights changes nothing else: the effective part is its own anatomy
        # (not in attention: weights that reach the output only through q or k count as ineffective)
        if name in models.TRANSFORMERS:
            continue
        again = anatomy(net, a.effective, SHAPES[name]).effective
        assert all(torch.equal(again.layers[n], a.effective.layers[n]) for n in mask.layers)


def test_model_weights_and_mode_are_untouched(resnet):
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    resnet.train(True)
    anatomy(resnet, Mask(_dense(resnet)), (3, 32, 32))
    assert resnet.training and all(torch.equal(before[k], v) for k, v in resnet.state_dict().items())
    with pytest.raises(ValueError, match="disagree on prunable layers"):
        anatomy(resnet, Mask({"fc.weight": torch.ones(10, 64, dtype=torch.bool)}), (3, 32, 32))
