"""SNIP, GraSP and SynFlow (SPEC §2) on real digits data with small models."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import cts_ray.config as config
import cts_ray.models as models
from cts_ray.config import DataConfig
from cts_ray.data import DeviceData, load
from cts_ray.masking import Mask, kept_count, layer_shapes
from cts_ray.methods import METHODS, SearchContext
from cts_ray.methods import saliency

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    """These tiny models gain nothing from intra-op threads, and on a shared, busy machine two
    OpenMP threads run 10-30x slower than one; restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    return load(DataConfig(name="digits"))


def make_ctx(data, method, density, model="mlp_digits", *extra, seed=0):
    cfg = config.load(None, [f"search.method={method}", f"search.density={density}",
                             f"model.name={model}", f"seed={seed}", *extra])
    torch.manual_seed(0)
    net = models.build(model, data.input_shape, data.num_classes)
    return SearchContext(cfg=cfg, model=net, data=data, device=CPU)


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            model.training)


def assert_unchanged(model, snap):
    state, req, training = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), f"{k} changed"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == req
    assert model.training == training
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", ["snip", "grasp", "synflow"])
@pytest.mark.parametrize("model,densities,extra", [
    ("mlp_digits", (0.1, 0.01), []),
    # resnet20 (BatchNorm buffers to restore); fewer SynFlow rounds for time
    ("resnet20", (0.1, 0.01), ["search.synflow_rounds=10"])])
def test_exact_count_topk_restore_deterministic(digits, method, model, densities, extra):
    for density in densities:
        ctx = make_ctx(digits, method, density, model, *extra)
        ctx.model.train()
        for p in list(ctx.model.parameters())[:2]:
            p.requires_grad_(False)          # odd flags must survive too
        snap = snapshot(ctx.model)
        ticket = METHODS[method].search(ctx)
        assert_unchanged(ctx.model, snap)
        d = sum(p.numel() for p in models.prunable(ctx.model).values())
        assert ticket.mask.kept == kept_count(density, d) == round(density * d)
        assert ticket.scores.dtype == torch.float32 and ticket.scores.shape == (d,)
        assert ticket.scores.device.type == "cpu"
        assert ticket.history == [] and ticket.seconds > 0
        again = Mask.top_k(ticket.scores, ticket.mask.kept, layer_shapes(ctx.model))
        assert again.sha256() == ticket.mask.sha256()
    # same seed, fresh context -> same mask
    assert METHODS[method].search(make_ctx(digits, method, density, model, *extra)).mask.sha256() \
        == ticket.mask.sha256()


def test_scoring_batch_class_balanced_and_seeded(digits):
    ctx = make_ctx(digits, "snip", 0.1, "mlp_digits", "search.examples_per_class=3")
    x, y = saliency.scoring_batch(ctx)
    assert x.shape == (30, 1, 8, 8)
    assert torch.bincount(y, minlength=10).tolist() == [3] * 10
    x2, y2 = saliency.scoring_batch(ctx)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    # rows are genuine training examples with their labels
    match = (digits.train_x.flatten(1)[None] == x.flatten(1)[:, None]).all(-1)
    assert match.any(1).all()
    assert all(int(digits.train_y[match[i].nonzero()[0, 0]]) == int(y[i]) for i in range(len(y)))
    x3, _ = saliency.scoring_batch(make_ctx(digits, "snip", 0.1, "mlp_digits",
                                            "search.examples_per_class=3", seed=1))
    assert not torch.equal(x, x3)


def test_snip_scores_are_abs_weight_times_grad(digits):
    ctx = make_ctx(digits, "snip", 0.05)
    x, y = saliency.scoring_batch(ctx)
    assert len(y) == 100
    ref = models.build("mlp_digits", digits.input_shape, digits.num_classes)
    ref.load_state_dict(ctx.model.state_dict())
    F.cross_entropy(ref(x), y).backward()
    expected = torch.cat([(p * p.grad).abs().flatten() for p in models.prunable(ref).values()])
    ticket = saliency.snip(ctx)
    torch.testing.assert_close(ticket.scores, expected.detach(), rtol=1e-5, atol=1e-12)


def _tiny_mlp():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 6), torch.nn.Tanh(),
                               torch.nn.Linear(6, 10)).double()


def test_grasp_hessian_vector_product_matches_autograd_hvp(digits):
    net = _tiny_mlp()
    x, y = digits.train_x[:20].double(), digits.train_y[:20]
    weights = list(models.prunable(net).values())
    names = list(models.prunable(net))
    hg = saliency.grasp_hg(net, weights, x, y, temperature=200.0)

    def loss(*ws):
        return F.cross_entropy(functional_call(net, dict(zip(names, ws)), (x,)) / 200.0, y)

    primal = tuple(w.detach() for w in weights)
    g = torch.autograd.grad(loss(*weights), weights)
    _, ref = torch.autograd.functional.hvp(loss, primal, tuple(gi.detach() for gi in g))
    for a, b in zip(hg, ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-20)
    assert any(a.abs().max() > 0 for a in hg)


def test_grasp_keeps_lowest_S(digits, monkeypatch):
    ctx = make_ctx(digits, "grasp", 0.1)
    x, y = saliency.scoring_batch(ctx)
    ref = models.build("mlp_digits", digits.input_shape, digits.num_classes)
    ref.load_state_dict(ctx.model.state_dict())
    ref.train()
    weights = list(models.prunable(ref).values())
    hg = saliency.grasp_hg(ref, weights, x, y, 200.0)
    S = -torch.cat([(w * h).detach().flatten() for w, h in zip(weights, hg)])
    ticket = saliency.grasp(ctx)
    torch.testing.assert_close(ticket.scores, -S, rtol=1e-4, atol=1e-12)
    kept = ticket.mask.flat()
    assert S[kept].max() <= S[~kept].min()     # GraSP removes the highest S


class _Forbidden:
    def __getattr__(self, name):
        raise AssertionError(f"synflow touched data (.{name})")

    def __getitem__(self, item):
        raise AssertionError("synflow touched data ([])")

    def __len__(self):
        raise AssertionError("synflow touched data (len)")


def test_synflow_is_data_free(digits):
    ctx = make_ctx(digits, "synflow", 0.01, "resnet20", "search.synflow_rounds=3")
    reference = saliency.synflow(ctx).mask.sha256()
    bomb = DeviceData(_Forbidden(), _Forbidden(), _Forbidden(), _Forbidden(),
                      digits.num_classes, digits.input_shape, False)
    ctx.data = bomb
    assert saliency.synflow(ctx).mask.sha256() == reference
    g = torch.Generator().manual_seed(5)
    other = DeviceData(torch.randn(50, 1, 8, 8, generator=g), torch.randint(0, 10, (50,), generator=g),
                       torch.randn(20, 1, 8, 8, generator=g), torch.randint(0, 10, (20,), generator=g),
                       digits.num_classes, digits.input_shape, True)
    ctx.data = other
    assert saliency.synflow(ctx).mask.sha256() == reference


def _flow(model, mask, input_shape):
    """Total input gradient of the SynFlow objective of the masked |w| network: > 0 exactly when
    some path of kept weights still connects input and output (no layer collapse)."""
    net = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.abs_()
    mask.apply_(net)
    x = torch.ones((1, *input_shape), dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(net(x).sum(), x)
    return float(g.sum())


@pytest.mark.parametrize("model", ["mlp_digits", "resnet20"])
def test_synflow_avoids_layer_collapse(digits, model):
    """Iterative SynFlow (100 rounds, the SPEC default) at density 0.001 keeps the network
    connected where one-shot SynFlow (1 round) disconnects it. In a chain (the MLP) that means
    every layer keeps a weight. In ResNet-20 whole residual branches may go (the identity
    shortcut carries the flow), so there the check is connectivity, plus the layers every path
    crosses (first conv, classifier)."""
    density = 0.001
    ctx = make_ctx(digits, "synflow", density, model)
    assert ctx.cfg.search.synflow_rounds == 100
    ticket = saliency.synflow(ctx)
    per_layer = {n: int(m.sum()) for n, m in ticket.mask.layers.items()}
    assert _flow(ctx.model, ticket.mask, digits.input_shape) > 0, per_layer
    if model == "mlp_digits":
        assert all(v >= 1 for v in per_layer.values()), per_layer
    else:
        assert per_layer["stem.0.weight"] >= 1 and per_layer["fc.weight"] >= 1, per_layer
    one = saliency.synflow(make_ctx(digits, "synflow", density, model, "search.synflow_rounds=1"))
    assert one.mask.kept == ticket.mask.kept
    assert _flow(ctx.model, one.mask, digits.input_shape) == 0      # one-shot collapses
