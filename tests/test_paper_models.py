"""The gates paper's models (vit_tiny, swin_t, wrn28_10; wrn16_2 as the small Wide-ResNet) on
real 32x32 images: a tiny image folder of CIFAR-10-JPEG files (3 training and 2 test images per
class) from ../shared/datasets. Every method runs through the pipeline on each; attention
projections are prunable and get CTS's gradient."""
import math
import os
import shutil

import pytest
import torch
from torch import nn
from torch.func import functional_call

from conftest import SHARED_DATA
from cts_ray import config as C
from cts_ray import data as D
from cts_ray import image_folder as I
from cts_ray import models, pipeline
from cts_ray.masking import Mask
from cts_ray.methods import METHODS, SearchContext

CIFAR = SHARED_DATA / "CIFAR-10-JPEG"
TINY = ["training.epochs=1", "training.milestones=[]", "training.batch_size=15", "data.test_subset=10",
        "training.dense_baseline=false", "search.point=init", "search.length=1.0", "search.examples_per_class=1",
        "search.synflow_rounds=2", "resources.device=cpu", "resources.threads=2"]


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_cifar")
    for split, n in (("train", 3), ("test", 2)):
        for cls in sorted((CIFAR / split).iterdir()):
            (root / split / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir())[:n]:
                shutil.copy(f, root / split / cls.name / f.name)
    old = os.environ.get("CTS_RAY_CACHE")
    os.environ["CTS_RAY_CACHE"] = str(tmp_path_factory.mktemp("cache"))   # decoded images: not in ~/.cache
    yield root
    I._LOADED.clear()
    os.environ.pop("CTS_RAY_CACHE") if old is None else os.environ.__setitem__("CTS_RAY_CACHE", old)


def _cfg(root, *more):
    return C.load(None, ["data.name=image_folder", f"data.root={root}", *TINY, *more])


# Every method on the small WRN (wrn28_10 is the same class, only wider: forward and counts below);
# on the transformers, the methods whose mechanics they stress (CTS's functional_call, GraSP's
# double backward through attention, SynFlow's float64 all-ones pass, LTR's rounds, both strong
# tickets), split between them to keep the suite short.
PLAN = {"wrn16_2": list(METHODS), "vit_tiny": ["cts", "grasp", "synflow", "gates", "edge_popup", "ltr"],
        "swin_t": ["cts"]}


@pytest.mark.parametrize("model", list(PLAN))
def test_methods_run_on_the_papers_models(model, tiny_cifar, tmp_path):
    net = models.build(model, (3, 32, 32), 10)
    numel = sum(p.numel() for p in models.prunable(net).values())
    for method in PLAN[model]:
        density = 0.8 if method == "ltr" else 0.3   # LTR: one round
        cfg = _cfg(tiny_cifar, f"model.name={model}", f"search.method={method}", f"search.density={density}")
        s = pipeline.run(cfg, tmp_path / method, progress=False)
        assert s["prunable_weights"] == numel and abs(s["achieved_density"] - density) < 1e-3, (method, s)
        assert 0 <= s["test_accuracy"] <= 1 and math.isfinite(s["effective_density"]), method
        assert s["retrained"] is not METHODS[method].strong
        mask = Mask.load(tmp_path / method / "mask.pt")
        assert list(mask.layers) == models.prunable_names(net)


def test_parameter_counts_are_the_architectures():
    def counts(name):
        net = models.build(name, (3, 32, 32), 10)
        return sum(p.numel() for p in net.parameters()), sum(p.numel() for p in models.prunable(net).values())

    # WRN-28-10 on CIFAR-10: 36,479,194 parameters (Zagoruyko & Komodakis's 36.5 M)
    assert counts("wrn28_10") == (36_479_194, 36_461_232)
    # ViT-Tiny, patch 4: 12 x (attention 4 x 192^2 + MLP 2 x 192 x 768) + patch conv 3 x 16 x 192 + head 192 x 10
    total, prunable = counts("vit_tiny")
    assert prunable == 12 * (4 * 192 ** 2 + 2 * 192 * 768) + 3 * 16 * 192 + 192 * 10 == 5_319_552
    assert total == 5_362_762   # + biases, LayerNorms, class token, 65 position embeddings
    # Swin-T: 12 C^2 per block (qkv, proj, MLP 4x), patch merging 8 C^2, patch conv, head
    total, prunable = counts("swin_t")
    blocks = 12 * (2 * 96 ** 2 + 2 * 192 ** 2 + 6 * 384 ** 2 + 2 * 768 ** 2)
    assert prunable == blocks + 8 * (96 ** 2 + 192 ** 2 + 384 ** 2) + 3 * 4 * 96 + 768 * 10 == 27_435_648
    assert total == 27_507_028
    assert counts("wrn16_2")[1] == 689_840


def test_attention_projections_are_prunable_in_parameter_order():
    net = models.build("vit_tiny", (3, 32, 32), 10)
    names = models.prunable_names(net)
    assert names == [n for n, _ in net.named_parameters() if n in set(names)]
    attn = [n for n in names if n.endswith("in_proj_weight")]
    assert len(attn) == 12 and len([n for n in names if n.endswith("out_proj.weight")]) == 12
    assert names[:3] == ["conv_proj.weight", "encoder.layers.encoder_layer_0.self_attention.in_proj_weight",
                         "encoder.layers.encoder_layer_0.self_attention.out_proj.weight"]
    assert not any("bias" in n or "ln_" in n or "pos_embedding" in n or "class_token" in n for n in names)
    # separate q/k/v projections (kdim != embed_dim) are prunable too
    mha = nn.MultiheadAttention(8, 2, kdim=4, vdim=4)
    assert models.prunable_names(mha) == ["q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"]


def test_masked_attention_reaches_torchs_fast_path():
    """In eval mode without gradients nn.MultiheadAttention takes its fused fast path; the weights
    functional_call swaps in must still be the ones it uses."""
    torch.manual_seed(0)
    net = models.build("vit_tiny", (1, 28, 28), 10).eval()
    name = "encoder.layers.encoder_layer_3.self_attention.in_proj_weight"
    x = torch.randn(2, 1, 28, 28)
    w = dict(net.named_parameters())[name]
    masked = w * (torch.rand_like(w) > 0.5)
    with torch.no_grad():
        swapped = functional_call(net, {name: masked}, (x,))
        plain = net(x)
        w.copy_(masked)
        assert torch.allclose(swapped, net(x), atol=1e-6) and not torch.allclose(swapped, plain, atol=1e-4)


def test_cts_moves_the_attention_logits(tiny_cifar):
    cfg = _cfg(tiny_cifar, "model.name=vit_tiny", "search.method=cts", "search.density=0.3")
    data = D.load(cfg.data)
    torch.manual_seed(0)
    net = models.build("vit_tiny", data.input_shape, data.num_classes)
    ticket = METHODS["cts"].search(SearchContext(cfg=cfg, model=net, data=data, device=torch.device("cpu")))
    theta0 = math.log(0.3 / 0.7)
    i = 0
    for name, p in models.prunable(net).items():
        theta = ticket.scores[i:i + p.numel()]
        i += p.numel()
        if name.endswith("in_proj_weight"):   # a gradient reached (almost) every entry of the mask
            assert (theta - theta0).abs().gt(1e-6).float().mean() > 0.9, name


def test_anatomy_of_attention():
    """Ticket anatomy through transformers: a random 30 % mask is nearly all effective; a layer whose
    v projection is pruned away passes nothing, so its q and k weights are on no path either."""
    from cts_ray.anatomy import anatomy
    from cts_ray.masking import layer_shapes
    torch.manual_seed(0)
    net = models.build("vit_tiny", (3, 32, 32), 10)
    mask = Mask({n: torch.rand(s) < 0.3 for n, s in layer_shapes(net).items()})
    a = anatomy(net, mask, (3, 32, 32))
    assert not a.collapsed_layers and a.effective_density > 0.99 * mask.density
    name = "encoder.layers.encoder_layer_5.self_attention.in_proj_weight"
    mask.layers[name][2 * 192:] = False
    a = anatomy(net, mask, (3, 32, 32))
    assert a.effective.layers[name].sum() == 0 and name in a.collapsed_layers
    assert a.effective.layers[name.replace("_5", "_6")].float().mean() > 0.29   # the residual path goes on
