"""The ImageNet ResNets (issue 25 point 3): resnet50 (torchvision's bottleneck ResNet-50) and the
``model.stem`` choice for resnet18/resnet50. Prunable counts and FLOPs pinned against hand formulas
and torchvision's own models; the CIFAR ResNet-18 unchanged bit for bit; compaction exact; every
method, the anatomy and the report on resnet50 with 64x64 generated images (ImageNet stem)."""
import copy
import hashlib
import os
import time

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from cts_ray import cli, models, pipeline
from cts_ray import config as C
from cts_ray import data as D
from cts_ray import image_folder as I
from cts_ray.anatomy import anatomy
from cts_ray.compact import compact
from cts_ray.export import cost, same_logits
from cts_ray.methods import METHODS, SearchContext

from test_export import _mask, _randomise


pytestmark = pytest.mark.usefixtures("one_thread")   # small-batch passes: fastest, and steady, on one thread


def _prunable(name, shape, k, **options) -> int:
    options = {"stem": "imagenet", **options}   # these counts are the ImageNet-stem models'
    return sum(p.numel() for p in models.prunable(models.build(name, shape, k, **options)).values())


# ------------------------------------------------------------------ counts by hand

# ResNet-50: stem 7x7 3 -> 64; per stage of width w (out 4w) the first block is 1x1 cin -> w,
# 3x3 w -> w, 1x1 w -> 4w and its 1x1 projection cin -> 4w; the other blocks read 4w channels.
RESNET50_STEM = 3 * 64 * 7 * 7                                                                  # 9,408
RESNET50_STAGES = [
    (64 * 64 + 9 * 64 * 64 + 64 * 256 + 64 * 256) + 2 * (256 * 64 + 9 * 64 * 64 + 64 * 256),           # 212,992
    (256 * 128 + 9 * 128 * 128 + 128 * 512 + 256 * 512) + 3 * (512 * 128 + 9 * 128 * 128 + 128 * 512),  # 1,212,416
    (512 * 256 + 9 * 256 * 256 + 256 * 1024 + 512 * 1024) + 5 * (1024 * 256 + 9 * 256 * 256 + 256 * 1024),
    (1024 * 512 + 9 * 512 * 512 + 512 * 2048 + 1024 * 2048) + 2 * (2048 * 512 + 9 * 512 * 512 + 512 * 2048),
]
# ResNet-18: four 3x3 convs per stage; stages 2-4 open with a stride-2 conv and a 1x1 projection.
RESNET18_STAGES = [
    4 * 9 * 64 * 64,                                                  # 147,456
    9 * 64 * 128 + 3 * 9 * 128 * 128 + 64 * 128,                      # 524,288
    9 * 128 * 256 + 3 * 9 * 256 * 256 + 128 * 256,                    # 2,097,152
    9 * 256 * 512 + 3 * 9 * 512 * 512 + 256 * 512,                    # 8,388,608
]


def test_prunable_counts_are_the_hand_formulas():
    resnet50 = RESNET50_STEM + sum(RESNET50_STAGES)
    assert resnet50 == 23_454_912                                   # every conv
    assert _prunable("resnet50", (3, 224, 224), 1000) == resnet50 + 2048 * 1000 == 25_502_912
    assert _prunable("resnet50", (3, 64, 64), 200) == resnet50 + 2048 * 200 == 23_864_512
    resnet18 = RESNET50_STEM + sum(RESNET18_STAGES)                  # the same 7x7 stem
    assert _prunable("resnet18", (3, 64, 64), 200) == resnet18 + 512 * 200 == 11_269_312
    assert _prunable("resnet18", (3, 224, 224), 1000) == resnet18 + 512 * 1000 == 11_678_912
    # the CIFAR stem differs only in its 3x3 conv
    assert _prunable("resnet18", (3, 32, 32), 10, stem="cifar") == resnet18 - RESNET50_STEM + 3 * 64 * 9 + 512 * 10 == 11_164_352


def _layers(net: nn.Module) -> list:
    """Every conv, linear, BN and pool in module order, by what defines it (not by name)."""
    out = []
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            out.append(("conv", tuple(m.weight.shape), m.stride, m.padding, m.bias is None))
        elif isinstance(m, nn.Linear):
            out.append(("linear", tuple(m.weight.shape)))
        elif isinstance(m, nn.BatchNorm2d):
            out.append(("bn", m.num_features))
        elif isinstance(m, nn.MaxPool2d):
            out.append(("maxpool", m.kernel_size, m.stride, m.padding))
    return out


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_the_imagenet_stem_models_are_torchvisions(name):
    ours = models.build(name, (3, 224, 224), 1000, data="imagenet")
    theirs = getattr(torchvision.models, name)(weights=None)
    assert _layers(ours) == _layers(theirs)   # the stride on the 3x3 conv (v1.5), 1x1 projections
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    x = torch.randn(2, 3, 64, 64)
    assert ours.eval()(x).shape == theirs.eval()(x).shape == (2, 1000)


def test_resnet50_flops_are_the_hand_formula_at_224_and_64_pixels():
    """MACs of each conv at its output size: the stem conv at 112 (224 / 2), everything after the
    max-pool at 56, 28, 14, 7; a stage's first 1x1 conv still runs at the previous stage's size."""
    sides = [56, 28, 14, 7]
    first_conv1 = [64 * 64, 256 * 128, 512 * 256, 1024 * 512]
    macs = RESNET50_STEM * 112 ** 2 + 2048 * 1000
    for i, (stage, side) in enumerate(zip(RESNET50_STAGES, sides)):
        before = sides[max(i - 1, 0)]
        macs += (stage - first_conv1[i]) * side ** 2 + first_conv1[i] * before ** 2
    assert macs == 4_089_184_256   # torchvision's 4.09 GFLOPS (multiply-accumulates)
    assert cost(models.build("resnet50", (3, 224, 224), 1000, data="imagenet"), (3, 224, 224))["flops"] == macs
    small = [side // 4 for side in [64, 32, 16, 8]]   # 64 px: stem at 32, then 16, 8, 4, 2
    macs64 = RESNET50_STEM * 32 ** 2 + 2048 * 4 + sum(
        (stage - c1) * side ** 2 + c1 * small[max(i - 1, 0)] ** 2
        for i, (stage, side, c1) in enumerate(zip(RESNET50_STAGES, small, first_conv1)))
    assert cost(models.build("resnet50", (3, 64, 64), 4, data="tiny_imagenet"), (3, 64, 64))["flops"] == macs64


# ------------------------------------------------------------------ the stem

def _digest(net: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in net.state_dict().items():
        h.update(k.encode())
        h.update(v.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def test_auto_stem_follows_the_data_set_and_the_cifar_resnet18_is_unchanged():
    """auto: the ImageNet stem on the two ImageNets (TLAB's, 64 px included), the CIFAR stem on every
    other data set whatever its size, as before model.stem existed (a config keeps its model)."""
    assert [models.stem_kind("auto", d) for d in ("tiny_imagenet", "imagenet", "image_folder", "cifar10", None)] == \
        ["imagenet", "imagenet", "cifar", "cifar", "cifar"]
    assert models.stem_kind("cifar", "imagenet") == "cifar" and models.stem_kind("imagenet", "cifar10") == "imagenet"
    assert len(models.build("resnet18", (3, 224, 224), 4, data="image_folder").stem) == 3
    stem = models.build("resnet50", (3, 64, 64), 4, data="tiny_imagenet").stem
    assert [type(m) for m in stem] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]
    assert (stem[0].kernel_size, stem[0].stride, stem[0].padding) == ((7, 7), (2, 2), (3, 3))
    cifar = models.build("resnet18", (3, 64, 64), 4, stem="cifar").stem
    assert len(cifar) == 3 and (cifar[0].kernel_size, cifar[0].stride) == ((3, 3), (1, 1))
    # state dicts (seed 0, 10 classes) as built before model.stem existed: the same weights, bit for bit
    for options, before in (({}, "e9e4990cad9b1b20"), ({"stem": "cifar"}, "e9e4990cad9b1b20"),
                            ({"shortcut": "conv3x3"}, "b84c4ce4e1b57299")):
        torch.manual_seed(0)
        assert _digest(models.build("resnet18", (3, 32, 32), 10, **options)) == before, options
    # the ImageNet stem on small images still classifies (resnet18 at 32 px ends on a 1x1 map)
    assert models.build("resnet18", (3, 32, 32), 3, stem="imagenet").eval()(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_stem_config_is_hash_neutral_at_auto_and_refused_where_it_does_not_apply():
    base = C.load(None, ["model.name=resnet18"])
    assert C.load(None, ["model.name=resnet18", "model.stem=auto"]).hash == base.hash
    assert C.load(None, ["model.stem=auto"]).hash == C.Config().hash == "4b72a4eecf22"
    imagenet = C.load(None, ["model.name=resnet18", "model.stem=imagenet"])
    assert imagenet.hash != base.hash and C.load(None, ["model.name=resnet50"]).model.stem == "auto"
    net = models.from_config(C.load(None, ["model.name=resnet50", "model.stem=cifar"]).model, (3, 64, 64), 4)
    assert net.stem[0].kernel_size == (3, 3)
    for name in ("mlp_digits", "resnet20", "vit_tiny"):
        with pytest.raises(C.ConfigError, match=rf"^model.stem: 'cifar' applies to resnet18 and resnet50 only, "
                                                rf"not {name}; expected auto$"):
            C.load(None, [f"model.name={name}", "model.stem=cifar"])
    with pytest.raises(C.ConfigError, match=r"^model.shortcut: 'conv3x3' applies to ResNets only \(.*\), not resnet50 "
                                            r"\(bottlenecks: 1x1 projections.*; expected conv1x1$"):
        C.load(None, ["model.name=resnet50", "model.shortcut=conv3x3"])


# ------------------------------------------------------------------ compaction

@pytest.mark.parametrize("name,options", [("resnet50", {}), ("resnet18", {"batchnorm": "batch"})])
def test_compact_bottleneck_and_imagenet_stem_give_the_masked_logits(name, options):
    shape = (3, 64, 64)
    torch.manual_seed(0)
    net = _randomise(models.build(name, shape, 4, stem="imagenet", **options), 1)
    mask = _mask(net, 0.2, 2)
    small, info = compact(net, mask, shape)
    assert not info["collapsed"] and any(ly["kept_outputs"] < ly["outputs"] for ly in info["layers"] if "outputs" in ly)
    mask.apply_(net)
    x = torch.randn(6, *shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert same_logits(small(x), net.eval()(x))
    assert cost(small, shape)["flops"] < cost(net, shape)["flops"]
    if name == "resnet18":   # what `cts-ray export` saves traces the max-pool stem (the bottleneck: no new op)
        program = torch.export.export(small, (x[:2],))
        with torch.no_grad():
            assert same_logits(program.module()(x[:2]), net(x[:2]))


# ------------------------------------------------------------------ every method, the anatomy, the report

@pytest.fixture(scope="module")
def folder64(tmp_path_factory):
    """Generated 64x64 RGB images, 4 classes: one training and one test image each."""
    root = tmp_path_factory.mktemp("images64")
    rng = np.random.default_rng(0)
    for split, n in (("train", 1), ("test", 1)):
        for c in range(4):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) // (c + 1)   # classes differ a little
                Image.fromarray(pixels).save(root / split / f"c{c}" / f"{i}.png")
    old = os.environ.get("CTS_RAY_CACHE")
    os.environ["CTS_RAY_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield root
    I._LOADED.clear()
    os.environ.pop("CTS_RAY_CACHE") if old is None else os.environ.__setitem__("CTS_RAY_CACHE", old)


# One step of everything (4 examples, batch 4): what is tested is that each method's mechanics, the
# anatomy and the report go through the bottlenecks and the max-pool stem, not what they find.
TINY = ["model.name=resnet50", "model.stem=imagenet", "training.epochs=1", "training.milestones=[]", "training.batch_size=4",
        "training.dense_baseline=false", "training.retrain=false", "search.point=init", "search.length=1.0",
        "search.examples_per_class=1", "search.synflow_rounds=1", "resources.device=cpu", "resources.threads=1"]
RESNET50_4 = RESNET50_STEM + sum(RESNET50_STAGES) + 2048 * 4   # prunable weights with 4 classes


def _tiny(folder, method: str) -> C.Config:
    density = 0.8 if method == "ltr" else 0.3   # LTR: one round
    return C.load(None, ["data.name=image_folder", f"data.root={folder}", *TINY, f"search.method={method}",
                         f"search.density={density}"])


@pytest.fixture(scope="module")
def resnet50_setup(folder64):
    data = D.load(_tiny(folder64, "random").data)
    assert data.input_shape == (3, 64, 64) and data.num_classes == 4
    torch.manual_seed(0)
    return data, models.build("resnet50", data.input_shape, data.num_classes, stem="imagenet")


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_searches_resnet50_and_its_anatomy_follows(method, folder64, resnet50_setup):
    """Each method's own search (LTR: one round, its retraining the pipeline's, from the initial
    weights as if trained), then the ticket's anatomy."""
    data, net = resnet50_setup
    cfg = _tiny(folder64, method)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    retrain = pipeline.make_retrain(cfg, copy.deepcopy(net), before, data, False, lambda rec, progress=None: None)
    ctx = SearchContext(cfg=cfg, model=net, data=data, device=torch.device("cpu"), trained_state=before,
                        retrain=retrain)
    ticket = METHODS[method].search(ctx)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items()), "the model's weights are left as found"
    mask = ticket.mask
    assert list(mask.layers) == models.prunable_names(net) and mask.numel == RESNET50_4
    assert abs(mask.density - cfg.search.density) < 1e-3, (method, mask.density)
    a = anatomy(net, mask, data.input_shape)
    assert 0 < a.effective_density <= mask.density, method   # (SynFlow may prune a shortcut away)
    rows = a.report()
    assert len(rows) == 54 + 1 and rows[-1]["kept"] == mask.kept   # 53 convs, the fc, the total


def test_a_resnet50_run_records_its_cost_and_the_report_reads_it(folder64, tmp_path):
    from cts_ray.records import Trial
    from cts_ray.sweep import tables, trainable

    root = tmp_path / "sweep"
    cfg = _tiny(folder64, "random")
    folder = root / "trials" / f"random-{cfg.hash}"
    started = time.time()
    s = pipeline.run(cfg, folder, progress=False)
    assert s["prunable_weights"] == RESNET50_4 and abs(s["achieved_density"] - 0.3) < 1e-3
    assert 0 < s["effective_density"] <= 0.3 + 1e-3 and len(s["layer_alive_units"]) == 54
    assert 0 < s["compact_flops_fraction"] <= 1   # the inference cost through the max-pool stem
    common = {"sweep": root.name, "trial_id": folder.name, "config_hash": cfg.hash, **tables.axes(cfg)}
    trainable.write_trial_row(root, cfg, common, Trial(status="finished", run_dir=str(folder), started_at=started), s)
    assert cli.main(["report", str(root), "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| random " in report and "## Inference cost" in report, report[:2000]
