import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from cts_ray import models

SHAPES = {
    "mlp_digits": (1, 8, 8),
    "lenet_300_100": (1, 28, 28),
    "lenet5": (1, 28, 28),
    "conv4": (3, 32, 32),
    "resnet20": (3, 32, 32),
    "resnet32": (3, 32, 32),
    "resnet56": (3, 32, 32),
    "vgg16": (3, 32, 32),
    "resnet18": (3, 32, 32),
    "resnet50": (3, 64, 64),   # the CIFAR stem (auto, no data set named): a 64 px map through the stages
    "wrn16_2": (3, 32, 32),
    "wrn28_10": (3, 32, 32),
    "vit_tiny": (3, 32, 32),
    "swin_t": (3, 32, 32),
}


def count(model):
    return sum(p.numel() for p in models.prunable(model).values())


def test_registry_covered():
    assert set(SHAPES) == set(models.MODELS)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_forward_shape(name):
    torch.manual_seed(0)
    model = models.build(name, SHAPES[name], 7).eval()
    x = torch.randn(2, *SHAPES[name])
    assert model(x).shape == (2, 7)
    # channels_last must also work
    model = model.to(memory_format=torch.channels_last)
    assert model(x.to(memory_format=torch.channels_last)).shape == (2, 7)


@pytest.mark.parametrize("name,shape", [("lenet5", (3, 32, 32)), ("conv4", (1, 28, 28)), ("vit_tiny", (1, 28, 28)),
                                        ("swin_t", (1, 28, 28)), ("wrn16_2", (1, 28, 28)),
                                        ("mlp_digits", (3, 32, 32)), ("resnet20", (1, 8, 8))])
def test_other_input_shapes(name, shape):
    model = models.build(name, shape, 3).eval()
    assert model(torch.randn(2, *shape)).shape == (2, 3)


def test_unknown_name():
    with pytest.raises(KeyError):
        models.build("nope", (1, 8, 8), 10)


def test_known_counts():
    assert count(models.build("lenet_300_100", (1, 28, 28), 10)) == 784 * 300 + 300 * 100 + 100 * 10  # 266200
    assert count(models.build("mlp_digits", (1, 8, 8), 10)) == 64 * 256 + 256 * 128 + 128 * 10  # 50432
    # resnet20 by hand: stem 3*16*9=432; stage1 6 convs 16*16*9 = 13824;
    # stage2 16*32*9 + 5*32*32*9 + 1x1 16*32 = 4608+46080+512 = 51200;
    # stage3 32*64*9 + 5*64*64*9 + 1x1 32*64 = 18432+184320+2048 = 204800; fc 64*10 = 640.
    assert count(models.build("resnet20", (3, 32, 32), 10)) == 270896


def test_prunable_names_resnet20():
    model = models.build("resnet20", (3, 32, 32), 10)
    names = models.prunable_names(model)
    expected = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert names == expected
    assert names == [n for n, _ in model.named_parameters() if n in set(names)]  # parameter order
    assert names[0] == "stem.0.weight" and names[-1] == "fc.weight"
    assert sum("shortcut" in n for n in names) == 2
    bn = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) for p in ("weight", "bias")}
    assert not bn & set(names)
    assert not any(n.endswith("bias") for n in names)
    assert list(models.prunable_modules(model)) == [n.rpartition(".")[0] for n in names]
    assert all(isinstance(m, (nn.Conv2d, nn.Linear)) for m in models.prunable_modules(model).values())
    params = models.prunable(model)
    assert list(params) == names
    assert params["fc.weight"] is model.fc.weight


def test_biased_layers_excluded_bias():
    model = models.build("lenet5", (1, 28, 28), 10)
    names = models.prunable_names(model)
    assert len(names) == 5 and all(n.endswith("weight") for n in names)


def test_override_prunable_names():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 2)

        def prunable_names(self):
            return ["b.weight"]

        def forward(self, x):
            return self.b(self.a(x))

    m = Tiny()
    assert models.prunable_names(m) == ["b.weight"]
    assert list(models.prunable(m)) == ["b.weight"]
    assert list(models.prunable_modules(m)) == ["b"]


def test_init_deterministic():
    torch.manual_seed(3)
    a = models.build("resnet20", (3, 32, 32), 10).state_dict()
    torch.manual_seed(3)
    b = models.build("resnet20", (3, 32, 32), 10).state_dict()
    torch.manual_seed(4)
    c = models.build("resnet20", (3, 32, 32), 10).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["fc.weight"], c["fc.weight"])


def test_init_values():
    torch.manual_seed(0)
    model = models.build("vgg16", (3, 32, 32), 10)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 13
    for m in bns:
        assert m.weight.min() >= 0 and m.weight.max() <= 1
        assert m.weight.std() > 0.1  # really uniform, not the default constant 1
        assert torch.all(m.bias == 0)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert all(torch.all(m.bias == 0) for m in layers)


def test_kaiming_std():
    torch.manual_seed(0)
    model = models.build("lenet_300_100", (1, 28, 28), 10)
    w = model[1].weight  # Linear(784, 300)
    assert w.shape == (300, 784)
    assert w.std().item() == pytest.approx(math.sqrt(2 / 784), rel=0.1)
    torch.manual_seed(0)
    conv = models.build("resnet20", (3, 32, 32), 10).blocks[-1].conv2.weight  # 64x64x3x3
    assert conv.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.1)


@pytest.mark.parametrize("name", ["lenet_300_100", "resnet20"])
def test_functional_call_uses_weights(name):
    torch.manual_seed(0)
    shape = SHAPES[name]
    model = models.build(name, shape, 10).eval()
    x = torch.randn(2, *shape)
    params = models.prunable(model)
    same = functional_call(model, dict(params), (x,))
    torch.testing.assert_close(same, model(x))
    masked = {n: p * (torch.rand_like(p) > 0.5) for n, p in params.items()}
    out = functional_call(model, masked, (x,))
    assert not torch.allclose(out, same)
    # all-zero classifier weight leaves only its (zero-initialised) bias
    last = list(params)[-1]
    out = functional_call(model, {last: torch.zeros_like(params[last])}, (x,))
    assert torch.all(out == 0)
