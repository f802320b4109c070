"""Concrete Ticket Search on real data (digits): budget control, exact masks, frozen teacher."""
import copy
import math

import pytest
import torch

from cts_ray import config as C
from cts_ray import data as D
from cts_ray import models
from cts_ray.methods import METHODS, SearchContext
from cts_ray.methods.cts import float64_norm, gradbalance
from cts_ray.objectives import OBJECTIVES, Outputs
from cts_ray.train import train_epochs


def _searched(overrides, model_name="mlp_digits", pretrain_epochs=1):
    cfg = C.load(None, [f"model.name={model_name}", "training.epochs=20", *overrides])
    data = D.load(cfg.data)
    torch.manual_seed(0)
    model = models.build(cfg.model.name, data.input_shape, data.num_classes)
    for _ in train_epochs(model, data, cfg.training, start=0, end=pretrain_epochs,
                          order_seed=0):
        pass
    before = copy.deepcopy(model.state_dict())
    ticket = METHODS["cts"].search(SearchContext(cfg=cfg, model=model, data=data, device=torch.device("cpu")))
    return cfg, model, before, ticket


@pytest.mark.parametrize("density", [0.5, 0.1, 0.01])
def test_gradbalance_holds_expected_density_within_slack_and_mask_is_exact(density):
    cfg, model, _, ticket = _searched([f"search.density={density}", "search.length=1.0"])
    expected = [r["expected_density"] for r in ticket.history]
    assert len(expected) == 20
    # The objective pulls density up; GradBalance keeps it under the 10 % slack over the target.
    assert max(expected[-5:]) <= 1.1 * density * 1.02, expected
    assert expected[-1] >= 0.7 * density, expected
    d = ticket.mask.numel
    assert ticket.mask.kept == round(density * d)
    # the mask is the global top-k of the logits
    kth = torch.sort(ticket.scores, descending=True).values[ticket.mask.kept - 1]
    assert bool((ticket.scores[ticket.mask.flat()] >= kth).all())
    assert ticket.history[-1]["lambda"] >= 0 and all(math.isfinite(r["objective"]) for r in ticket.history)


def test_without_a_budget_the_objective_would_overshoot():
    """The control experiment behind the previous test: with the controller's pull removed
    (a huge slack), the same search drives the expected density far above the target."""
    _, _, _, ticket = _searched(["search.density=0.01", "search.length=0.5", "search.slack=100"])
    assert ticket.history[-1]["expected_density"] > 1.5 * 0.01


def test_dense_teacher_is_never_updated_in_search():
    """Weights and BatchNorm buffers of the search-point network are bit-identical afterwards."""
    cfg, model, before, ticket = _searched(["search.density=0.05", "search.length=0.1",
                                            "search.objective=feature_mse"], model_name="resnet20")
    after = model.state_dict()
    assert set(after) == set(before)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert all(p.requires_grad for p in model.parameters())
    assert any("running_mean" in k for k in before)


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_every_objective_runs_and_lowers_itself(objective):
    cfg, _, _, ticket = _searched([f"search.objective={objective}", "search.density=0.2", "search.length=0.5"])
    first, last = ticket.history[0]["objective"], ticket.history[-1]["objective"]
    assert math.isfinite(last) and last < first


def test_rescale_is_off_by_default_and_when_on_changes_the_search():
    """search.rescale (an experiment on activation scale in the search): off by default, and the
    default config's hash does not mention it; on, the search returns another exact top-k mask."""
    cfg = C.load(None, [])
    assert cfg.search.rescale == "none" and "rescale" not in str(cfg.dense_identity())
    assert C.load(None, ["search.rescale=none"]).hash == cfg.hash != C.load(None, ["search.rescale=layer"]).hash
    _, _, _, plain = _searched(["search.density=0.01", "search.length=0.05"])
    for how in ("layer", "global"):
        _, _, _, scaled = _searched(["search.density=0.01", "search.length=0.05", f"search.rescale={how}"])
        assert scaled.mask.kept == plain.mask.kept == round(0.01 * plain.mask.numel)
        assert scaled.mask.sha256() != plain.mask.sha256(), how


def test_lagrange_controller_runs():
    cfg, _, _, ticket = _searched(["search.controller=lagrange", "search.density=0.1", "search.length=0.25"])
    assert ticket.mask.kept == round(0.1 * ticket.mask.numel)
    assert ticket.history[-1]["lambda"] > 0  # raised by gradient ascent while over budget


def test_objective_values_on_known_inputs():
    a = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    y = torch.tensor([0, 1])
    same = OBJECTIVES["kl_reverse"](Outputs(a), Outputs(a.clone()), y)
    assert same.item() == pytest.approx(0, abs=1e-7)
    b = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    ps, pd = a.softmax(1), b.softmax(1)
    rev = (ps * (ps.log() - pd.log())).sum(1).mean()
    fwd = (pd * (pd.log() - ps.log())).sum(1).mean()
    assert OBJECTIVES["kl_reverse"](Outputs(a), Outputs(b), y).item() == pytest.approx(rev.item(), rel=1e-5)
    assert OBJECTIVES["kl_forward"](Outputs(a), Outputs(b), y).item() == pytest.approx(fwd.item(), rel=1e-5)
    assert OBJECTIVES["mse_logits"](Outputs(a), Outputs(b), y).item() == pytest.approx(((a - b) ** 2).mean().item())
    # feature_mse is invariant to per-sample affine rescaling of activations
    f = [torch.randn(4, 8, 3, 3)]
    assert OBJECTIVES["feature_mse"](Outputs(a, f), Outputs(b, [3 * f[0] + 1]), y).item() < 1e-4


def test_gradbalance_step_rules():
    d, kappa = 1000, 0.1
    budget = 1.1 * kappa * d
    theta = torch.full((d,), math.log(0.5 / 0.5))          # σ = 0.5: far over budget
    g = torch.randn(d)
    out, lam1 = gradbalance(theta, g, None, budget, 0.1)
    g_c = torch.sigmoid(theta) * (1 - torch.sigmoid(theta)) / budget
    assert lam1.item() == pytest.approx((g.norm() / g_c.norm()).item(), rel=1e-5)  # first step: λ = λ*
    assert torch.allclose(out, (g + lam1 * g_c).float(), rtol=1e-5, atol=1e-6)
    _, lam2 = gradbalance(torch.full((d,), -10.0), g, lam1, budget, 0.1)   # under budget: λ* = 0, λ decays by 0.99
    assert lam2.item() == pytest.approx(0.99 * lam1.item(), rel=1e-6)
    # norms cannot overflow or underflow
    assert float64_norm(torch.full((10,), 1e30)).item() == pytest.approx(1e30 * math.sqrt(10), rel=1e-5)
    assert float64_norm(torch.full((10,), 1e-30)).item() == pytest.approx(1e-30 * math.sqrt(10), rel=1e-5)


def test_compile_search_setting():
    """null compiles long searches on CUDA only (on CPU it measured no faster); true/false force it."""
    from cts_ray.methods.cts import COMPILE_WORTH, use_compile
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    lenet_mnist = 266_200 * 1000 * 5       # MNIST LeNet-300-100, search length 0.5 of 10 epochs
    digits = 50_000 * 56 * 6               # the quickstart's CTS trials
    assert use_compile(None, cuda, lenet_mnist) and not use_compile(None, cuda, digits)
    assert not use_compile(None, cpu, lenet_mnist)
    assert use_compile(True, cpu, digits) and not use_compile(False, cuda, lenet_mnist)
    assert COMPILE_WORTH > digits
