"""Model registry: name -> builder(input_shape=(C,H,W), num_classes).

Prunable weights are the weights of every Conv2d and Linear (first conv,
shortcuts and classifier included); a model may override this by defining
`prunable_names(self)`. Weights live only in parameters so that
torch.func.functional_call can swap in masked tensors.
"""
from typing import Callable

from torch import nn

Shape = tuple[int, int, int]


# ----------------------------------------------------------------- MLPs / LeNets

def mlp(input_shape: Shape, num_classes: int, hidden: list[int]) -> nn.Sequential:
    c, h, w = input_shape
    dims = [c * h * w] + hidden
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(dims[-1], num_classes))
    return nn.Sequential(*layers)


def lenet5(input_shape: Shape, num_classes: int) -> nn.Sequential:
    c, h, w = input_shape
    fh, fw = (h // 2 - 4) // 2, (w // 2 - 4) // 2  # pad-2 conv keeps size, 5x5 conv shrinks by 4
    return nn.Sequential(
        nn.Conv2d(c, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * fh * fw, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, num_classes),
    )


def conv4(input_shape: Shape, num_classes: int) -> nn.Sequential:
    c, h, w = input_shape
    conv = lambda a, b: [nn.Conv2d(a, b, 3, padding=1), nn.ReLU()]
    return nn.Sequential(
        *conv(c, 64), *conv(64, 64), nn.MaxPool2d(2),
        *conv(64, 128), *conv(128, 128), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(128 * (h // 4) * (w // 4), 256), nn.ReLU(),
        nn.Linear(256, 256), nn.ReLU(),
        nn.Linear(256, num_classes),
    )


# ----------------------------------------------------------------------- ResNets

class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, shortcut: str = "conv1x1"):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()  # identity unless the shape changes
        if stride != 1 or cin != cout:
            size = {"conv1x1": 1, "conv3x3": 3}[shortcut]   # conv3x3: the CTS authors' downsampling
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, size, stride, size // 2, bias=False),
                                          nn.BatchNorm2d(cout))
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, in_ch: int, num_classes: int, stem: int,
                 widths: list[int], blocks: list[int], strides: list[int], shortcut: str = "conv1x1"):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU())
        layers, cin = [], stem
        for width, n, stride in zip(widths, blocks, strides):
            for i in range(n):
                layers.append(BasicBlock(cin, width, stride if i == 0 else 1, shortcut))
                cin = width
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.blocks(self.stem(x))))


def cifar_resnet(depth: int) -> Callable[[Shape, int], nn.Module]:
    assert (depth - 2) % 6 == 0, depth
    n = (depth - 2) // 6
    return lambda s, k, shortcut="conv1x1": ResNet(s[0], k, 16, [16, 32, 64], [n] * 3, [1, 2, 2], shortcut)


# --------------------------------------------------------------------------- VGG

VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]


def vgg16(input_shape: Shape, num_classes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = input_shape[0]
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
            cin = v
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------- registry

MODELS: dict[str, Callable[[Shape, int], nn.Module]] = {
    "mlp_digits": lambda s, k: mlp(s, k, [256, 128]),
    "lenet_300_100": lambda s, k: mlp(s, k, [300, 100]),
    "lenet5": lenet5,
    "conv4": conv4,
    "resnet20": cifar_resnet(20),
    "resnet32": cifar_resnet(32),
    "resnet56": cifar_resnet(56),
    "vgg16": vgg16,
    "resnet18": lambda s, k, shortcut="conv1x1": ResNet(s[0], k, 64, [64, 128, 256, 512], [2, 2, 2, 2],
                                                         [1, 2, 2, 2], shortcut),
}
RESNETS = {"resnet20", "resnet32", "resnet56", "resnet18"}   # the builders that take ``shortcut``


def initialize(model: nn.Module, classifier_bias: str = "zero") -> None:
    """SPEC §4: Kaiming-normal conv/linear weights, zero biases, BN gamma ~ U(0,1), beta 0.
    ``classifier_bias='pytorch'`` keeps the last Linear's bias as PyTorch drew it (the authors' code).
    Uses the global torch RNG, so the caller's manual_seed fixes the weights."""
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
            if m.bias is not None and not (classifier_bias == "pytorch" and m in classifier):
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.uniform_(m.weight)
            nn.init.zeros_(m.bias)


def build(name: str, input_shape: tuple[int, int, int], num_classes: int, *, batchnorm: str = "running",
          shortcut: str = "conv1x1", classifier_bias: str = "zero") -> nn.Module:
    """A freshly initialised model; the keywords are ``ModelConfig``'s (see ``from_config``)."""
    options = {"shortcut": shortcut} if shortcut != "conv1x1" else {}   # ResNets only (checked in config)
    model = MODELS[name](tuple(input_shape), num_classes, **options)  # KeyError for unknown names
    if batchnorm == "batch":
        batch_statistics_only(model)
    initialize(model, classifier_bias)
    return model


def from_config(m, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """``build`` with a ``ModelConfig``'s options."""
    return build(m.name, input_shape, num_classes, batchnorm=m.batchnorm, shortcut=m.shortcut,
                 classifier_bias=m.classifier_bias)


def batch_statistics_only(model: nn.Module) -> None:
    """Every BatchNorm as built with ``track_running_stats=False``: no running buffers, batch
    statistics in train and eval mode alike (the CTS authors' models)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None


def prunable_names(model: nn.Module) -> list[str]:
    """Names of prunable weights, in named_parameters() order."""
    names = [n for n, _ in model.named_parameters()]
    if callable(getattr(model, "prunable_names", None)):
        chosen = set(model.prunable_names())
        missing = chosen - set(names)
        if missing:
            raise KeyError(f"prunable_names() lists unknown parameters: {sorted(missing)}")
        return [n for n in names if n in chosen]
    weights = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    return [n for n, p in model.named_parameters() if id(p) in weights]


def prunable(model: nn.Module) -> dict[str, nn.Parameter]:
    params = dict(model.named_parameters())
    return {n: params[n] for n in prunable_names(model)}


def prunable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Owning module of each prunable weight, keyed by module name (same order)."""
    out = {}
    for n in prunable_names(model):
        mod_name = n.rpartition(".")[0]
        out[mod_name] = model.get_submodule(mod_name)
    return out
