"""Model registry: name -> builder(input_shape=(C,H,W), num_classes).

Prunable weights are the weights of every Conv2d and Linear (first conv,
shortcuts and classifier included) and the attention projections of every
nn.MultiheadAttention (``in_proj_weight``, or ``q/k/v_proj_weight``: raw
parameters, not Linear modules); a model may override this by defining
`prunable_names(self)`. Weights live only in parameters so that
torch.func.functional_call can swap in masked tensors.
"""
import math
from typing import TYPE_CHECKING, Callable, Optional

from torch import nn

from . import names

if TYPE_CHECKING:   # imported where built: torchvision's import (torch._dynamo) costs every trial process ~1.4 s
    from torchvision.models import SwinTransformer, VisionTransformer

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

def _projection(cin: int, cout: int, stride: int, shortcut: str) -> nn.Sequential:
    """A block's shortcut: identity (empty) unless the shape changes, else conv + BN."""
    if stride == 1 and cin == cout:
        return nn.Sequential()
    size = {"conv1x1": 1, "conv3x3": 3}[shortcut]   # conv3x3: the CTS authors' downsampling
    return nn.Sequential(nn.Conv2d(cin, cout, size, stride, size // 2, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    expansion = 1   # output channels per width

    def __init__(self, cin: int, cout: int, stride: int, shortcut: str = "conv1x1"):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = _projection(cin, cout, stride, shortcut)
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """torchvision's ResNet-50 block (v1.5): 1x1 conv to ``width``, 3x3 conv carrying the stride,
    1x1 conv to 4 x ``width``; a 1x1 projection shortcut (conv + BN) when the shape changes."""
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, shortcut: str = "conv1x1"):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = _projection(cin, cout, stride, shortcut)
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


IMAGENET_DATA = ("tiny_imagenet", "imagenet")   # model.stem: auto takes the ImageNet stem on these


def stem_kind(stem: str, data: Optional[str] = None) -> str:
    """``model.stem`` resolved for data set ``data``: auto is the ImageNet stem on Tiny-ImageNet and
    ImageNet (the authors' ResNet-18/50 use it on both, 64 px included) and the CIFAR stem on every
    other data set, an image folder of any size included, as before the stem could be chosen (so a
    config keeps its model under its hash)."""
    if stem != "auto":
        return stem
    return "imagenet" if data in IMAGENET_DATA else "cifar"


def _stem(in_ch: int, width: int, kind: str) -> nn.Sequential:
    """cifar: 3x3 stride-1 conv + BN + ReLU; imagenet (torchvision's): 7x7 stride-2 conv + BN + ReLU and
    a 3x3 stride-2 max-pool. The conv and BN are ``stem.0`` and ``stem.1`` either way."""
    if kind == "imagenet":
        return nn.Sequential(nn.Conv2d(in_ch, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                             nn.MaxPool2d(3, 2, 1))
    return nn.Sequential(nn.Conv2d(in_ch, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())


class ResNet(nn.Module):
    def __init__(self, in_ch: int, num_classes: int, stem_width: int, widths: list[int], blocks: list[int],
                 strides: list[int], shortcut: str = "conv1x1", *, block: type = BasicBlock, stem: str = "cifar"):
        super().__init__()
        self.stem = _stem(in_ch, stem_width, stem)
        layers, cin = [], stem_width
        for width, n, stride in zip(widths, blocks, strides):
            for i in range(n):
                layers.append(block(cin, width, stride if i == 0 else 1, shortcut))
                cin = width * block.expansion
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.blocks(self.stem(x))))


def cifar_resnet(depth: int) -> Callable[[Shape, int], nn.Module]:
    assert (depth - 2) % 6 == 0, depth
    n = (depth - 2) // 6
    return lambda s, k, shortcut="conv1x1": ResNet(s[0], k, 16, [16, 32, 64], [n] * 3, [1, 2, 2], shortcut)


def imagenet_resnet(s: Shape, k: int, block: type, blocks: list[int], stem: str = "cifar",
                    shortcut: str = "conv1x1") -> ResNet:
    """torchvision's ResNet-18/50 layout (widths 64-512, strides 1-2-2-2) with the stem ``model.stem`` picks."""
    return ResNet(s[0], k, 64, [64, 128, 256, 512], blocks, [1, 2, 2, 2], shortcut, block=block,
                  stem=stem)


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


# ------------------------------------------------------------------ Wide-ResNets

class WideBlock(nn.Module):
    """Pre-activation basic block (Zagoruyko & Komodakis 2016): BN-ReLU-conv3x3, BN-ReLU-conv3x3;
    a 1x1 shortcut conv on the pre-activated input when the shape changes. No dropout."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.relu = nn.ReLU()
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        o = self.relu(self.bn1(x))
        y = self.conv2(self.relu(self.bn2(self.conv1(o))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """CIFAR WRN-depth-k: depth = 6n + 4, three groups of n blocks, widths 16k, 32k, 64k."""

    def __init__(self, in_ch: int, num_classes: int, depth: int, k: int):
        super().__init__()
        assert (depth - 4) % 6 == 0, depth
        n = (depth - 4) // 6
        self.stem = nn.Conv2d(in_ch, 16, 3, 1, 1, bias=False)
        blocks, cin = [], 16
        for width, stride in ((16 * k, 1), (32 * k, 2), (64 * k, 2)):
            for i in range(n):
                blocks.append(WideBlock(cin, width, stride if i == 0 else 1))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.head(self.blocks(self.stem(x))))


# ------------------------------------------------------------------ transformers
# torchvision's classes, sized for small images. They keep torchvision's own initialisation (see
# ``build``), and no dropout or stochastic depth, like every other model here.

def vit_tiny(input_shape: Shape, num_classes: int, patch: int = 4) -> "VisionTransformer":
    """ViT-Tiny (hidden 192, 12 layers, 3 heads, MLP 768) on square images, patch 4 (32x32: 64 tokens)."""
    from torchvision.models import VisionTransformer
    c, h, w = input_shape
    if h != w or h % patch:
        raise ValueError(f"vit_tiny: needs square images with a side divisible by {patch}; got {h}x{w}")
    model = VisionTransformer(image_size=h, patch_size=patch, num_layers=12, num_heads=3, hidden_dim=192,
                              mlp_dim=768, num_classes=num_classes)
    if c != 3:   # torchvision's patch embedding is RGB-only; same init as its own
        model.conv_proj = nn.Conv2d(c, 192, patch, patch)
        nn.init.trunc_normal_(model.conv_proj.weight, std=math.sqrt(1 / (c * patch * patch)))
        nn.init.zeros_(model.conv_proj.bias)
    # torchvision zeroes the head (for fine-tuning); a zero classifier gives every saliency score
    # and CTS's dense teacher nothing to work with, so it gets Swin's trunc-normal 0.02 instead
    nn.init.trunc_normal_(model.heads.head.weight, std=0.02)
    return model


def swin_t(input_shape: Shape, num_classes: int) -> "SwinTransformer":
    """Swin-T (embed 96, depths 2-2-6-2, heads 3-6-12-24) for 32x32 images: patch 2, window 4.

    ImageNet's Swin-T (patch 4, window 7 on 224x224) has 56x56 tokens, 8x8 windows in stage 1 and a
    last-stage map of exactly one window. Patch 2 on 32x32 gives 16x16 tokens (4x4 windows of 4)
    and maps of 8, 4 and 2 after the merges: the last two fit one window, as on ImageNet, while a
    patch of 4 would leave stage 1 with only 2x2 windows and stage 4 with a 1x1 map. Sides that
    are not multiples of the window (28x28 MNIST: 14, 7, 4, 2 tokens) are padded by torchvision."""
    from torchvision.models import SwinTransformer
    model = SwinTransformer(patch_size=[2, 2], embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                            window_size=[4, 4], stochastic_depth_prob=0.0, num_classes=num_classes)
    c = input_shape[0]
    if c != 3:   # torchvision's patch embedding is RGB-only; PyTorch's default conv init, as its own
        model.features[0][0] = nn.Conv2d(c, 96, 2, 2)
    return model


TRANSFORMERS = {"vit_tiny", "swin_t"}   # keep torchvision's initialisation (``build``)


# ---------------------------------------------------------------------- registry

# keyed by names.MODELS (torch-free, for config validation; tests check the two agree)
MODELS: dict[str, Callable[[Shape, int], nn.Module]] = {
    "mlp_digits": lambda s, k: mlp(s, k, [256, 128]),
    "lenet_300_100": lambda s, k: mlp(s, k, [300, 100]),
    "lenet5": lenet5,
    "conv4": conv4,
    "resnet20": cifar_resnet(20),
    "resnet32": cifar_resnet(32),
    "resnet56": cifar_resnet(56),
    "vgg16": vgg16,
    "resnet18": lambda s, k, shortcut="conv1x1", stem="cifar": imagenet_resnet(s, k, BasicBlock, [2, 2, 2, 2],
                                                                           stem, shortcut),
    "resnet50": lambda s, k, stem="cifar": imagenet_resnet(s, k, Bottleneck, [3, 4, 6, 3], stem),
    "wrn28_10": lambda s, k: WideResNet(s[0], k, 28, 10),
    "wrn16_2": lambda s, k: WideResNet(s[0], k, 16, 2),   # small, for tests and laptops
    "vit_tiny": vit_tiny,
    "swin_t": swin_t,
}


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
          shortcut: str = "conv1x1", classifier_bias: str = "zero", stem: str = "auto",
          data: Optional[str] = None) -> nn.Module:
    """A freshly initialised model; the keywords are ``ModelConfig``'s (see ``from_config``), ``data``
    the data set's name (what ``stem: auto`` resolves by)."""
    # only the builders they apply to take them (checked in config: names.RESNETS, names.STEMS)
    options = {"shortcut": shortcut} if shortcut != "conv1x1" else {}
    if name in names.STEMS:
        options["stem"] = stem_kind(stem, data)
    model = MODELS[name](tuple(input_shape), num_classes, **options)  # KeyError for unknown names
    if batchnorm == "batch":
        batch_statistics_only(model)
    # Transformers keep torchvision's init (Swin: trunc-normal 0.02 linears; ViT: Xavier-uniform
    # projections; LayerNorm 1/0). Kaiming-normal, sqrt(2/fan_in) = 0.10 at width 192, would make
    # q and k 2x (ViT) to 5x (Swin) larger and attention logits 4-25x: near one-hot softmax at init.
    if name not in TRANSFORMERS:
        initialize(model, classifier_bias)
    return model


def from_config(m, input_shape: tuple[int, int, int], num_classes: int, data: Optional[str] = None) -> nn.Module:
    """``build`` with a ``ModelConfig``'s options (``data``: ``cfg.data.name``, for ``stem: auto``)."""
    return build(m.name, input_shape, num_classes, batchnorm=m.batchnorm, shortcut=m.shortcut,
                 classifier_bias=m.classifier_bias, stem=m.stem, data=data)


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
    for m in model.modules():   # attention projections held as raw parameters
        if isinstance(m, nn.MultiheadAttention):
            weights |= {id(p) for p in (m.in_proj_weight, m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)
                        if p is not None}
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
