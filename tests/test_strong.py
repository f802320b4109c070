"""Strong tickets on real data (digits): relaxed Bernoulli gates and edge-popup (SPEC §2).

Weights are never trained: each method freezes a seeded re-initialisation of the network,
searches a mask, and returns those weights with BatchNorm statistics recomputed for the mask.
"""
import copy
import functools
import math

import pytest
import torch
from torch import nn

from cts_ray import config as C
from cts_ray import data as D
from cts_ray import models, pipeline
from cts_ray.masking import Mask, kept_count
from cts_ray.methods import METHODS, SearchContext
from cts_ray.train import evaluate


@functools.lru_cache(maxsize=None)
def _digits():
    return D.load(C.DataConfig(name="digits"))


def _cfg(method, density, model_name="mlp_digits", epochs=20, length=1.0, extra=()):
    return C.load(None, [f"search.method={method}", f"search.density={density}", f"model.name={model_name}",
                         f"training.epochs={epochs}", f"search.length={length}", *extra])


def _search(cfg):
    """(ticket, model before, model after) for a fresh seeded model at initialisation."""
    data = _digits()
    torch.manual_seed(0)
    model = models.build(cfg.model.name, data.input_shape, data.num_classes)
    before = copy.deepcopy(model)
    ticket = METHODS[cfg.search.method].search(SearchContext(cfg=cfg, model=model, data=data,
                                                             device=torch.device("cpu")))
    return ticket, before, model


@functools.lru_cache(maxsize=None)
def _cached(method, density, model_name="mlp_digits", epochs=20):
    return _search(_cfg(method, density, model_name, epochs))


def _ticket_accuracy(cfg, ticket, mode="eval"):
    data = _digits()
    model = models.build(cfg.model.name, data.input_shape, data.num_classes)
    model.load_state_dict(ticket.weights)
    ticket.mask.apply_(model)
    return evaluate(model, data, mode=mode)["test_accuracy"]


# ------------------------------------------------------------------------------------ gates

@pytest.mark.parametrize("density", [0.5, 0.1])
def test_gates_reach_target_density_and_keep_exactly_top_k(density):
    ticket, _, _ = _cached("gates", density)
    hist = ticket.history
    assert len(hist) == 20 and [r["epoch"] for r in hist] == list(range(1, 21))
    assert abs(hist[-1]["expected_density"] - density) <= 0.01, [r["expected_density"] for r in hist]
    assert abs(hist[-1]["hard_density"] - density) <= 0.02
    for key in ("phase", "lr", "objective", "expected_density", "hard_density", "lambda", "seconds"):
        assert key in hist[-1]
    assert hist[-1]["lr"] == pytest.approx(0.1 * hist[0]["lr"])  # ×0.1 after search.lr_drop
    assert all(math.isfinite(r["objective"]) for r in hist) and hist[-1]["objective"] < hist[0]["objective"]
    mask, scores = ticket.mask, ticket.scores
    assert mask.kept == round(density * mask.numel) and scores.shape == (mask.numel,)
    flat = mask.flat()
    assert scores[flat].min() >= scores[~flat].max()  # global top-κd of μ


def test_gates_strong_ticket_is_far_above_chance():
    ticket, _, _ = _cached("gates", 0.5)
    cfg = _cfg("gates", 0.5)
    acc = _ticket_accuracy(cfg, ticket)
    print(f"gates mlp_digits κ=0.5 strong-ticket accuracy {acc:.4f}, search {ticket.seconds:.1f}s")
    assert acc > 0.5
    # the returned weights are the frozen uniform draw, not the model's: He-uniform bounds per layer
    for name, w in ticket.weights.items():
        if name in ticket.mask.layers:
            bound = math.sqrt(6 / w[0].numel())
            assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound and (w != 0).all(), name


def test_gates_on_resnet_recomputes_batchnorm_for_the_mask():
    cfg = _cfg("gates", 0.5, model_name="resnet20", epochs=8)
    ticket, before, _ = _search(cfg)
    acc = _ticket_accuracy(cfg, ticket)
    acc_batch = _ticket_accuracy(cfg, ticket, mode="train")
    print(f"gates resnet20 κ=0.5 (8 epochs) accuracy eval {acc:.4f} / batch-stats {acc_batch:.4f}")
    assert acc > 0.5 and abs(acc - acc_batch) < 0.05
    # running mean of the stem BN = mean of the masked stem conv output over the training set
    data = _digits()
    w = ticket.weights["stem.0.weight"] * ticket.mask.layers["stem.0.weight"]
    feat = nn.functional.conv2d(data.train_x, w, padding=1)
    assert torch.allclose(ticket.weights["stem.1.running_mean"], feat.mean((0, 2, 3)), atol=0.02)
    assert not torch.equal(ticket.weights["stem.1.running_mean"], before.state_dict()["stem.1.running_mean"])


# ------------------------------------------------------------------------------- edge-popup

def test_edge_popup_keeps_per_layer_top_k_of_score_magnitude():
    ticket, _, _ = _cached("edge_popup", 0.3, "resnet20", 3)
    mask, scores, i = ticket.mask, ticket.scores, 0
    assert (scores >= 0).all()  # |score|
    for name, m in mask.layers.items():
        n = m.numel()
        s, keep = scores[i:i + n], m.reshape(-1)
        i += n
        assert int(keep.sum()) == kept_count(0.3, n), name
        if not keep.all():
            assert s[keep].min() >= s[~keep].max(), name
    assert i == scores.numel()
    assert [r["phase"] for r in ticket.history] == ["search"] * 3


def test_edge_popup_weights_are_signed_constants_and_batchnorm_is_non_affine():
    ticket, _, _ = _cached("edge_popup", 0.3, "resnet20", 3)
    state = ticket.weights
    for name in ticket.mask.layers:
        w = state[name]
        std = math.sqrt(2 / w[0].numel())
        assert torch.allclose(w.abs(), torch.full_like(w, std)), name
        frac_pos = (w > 0).float().mean().item()
        assert 0.3 < frac_pos < 0.7, name  # seeded random signs
    bns = [k[:-len(".running_mean")] for k in state if k.endswith(".running_mean")]
    assert bns
    for b in bns:
        assert torch.equal(state[b + ".weight"], torch.ones_like(state[b + ".weight"]))
        assert torch.equal(state[b + ".bias"], torch.zeros_like(state[b + ".bias"]))


def test_edge_popup_strong_ticket_is_far_above_chance():
    cfg = _cfg("edge_popup", 0.5)
    ticket, _, _ = _cached("edge_popup", 0.5)
    acc = _ticket_accuracy(cfg, ticket)
    print(f"edge-popup mlp_digits κ=0.5 strong-ticket accuracy {acc:.4f}, search {ticket.seconds:.1f}s")
    assert acc > 0.5
    assert ticket.mask.kept == sum(kept_count(0.5, m.numel()) for m in ticket.mask.layers.values())


# ------------------------------------------------------------------------------------ both

@pytest.mark.parametrize("method", ["gates", "edge_popup"])
def test_model_left_unchanged_and_search_deterministic(method):
    cfg = _cfg(method, 0.2, model_name="resnet20", epochs=2, length=0.5)
    data = _digits()
    torch.manual_seed(0)
    model = models.build(cfg.model.name, data.input_shape, data.num_classes)
    model.fc.bias.requires_grad_(False)
    model.eval()
    before = copy.deepcopy(model.state_dict())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ctx = SearchContext(cfg=cfg, model=model, data=data, device=torch.device("cpu"))
    a = METHODS[method].search(ctx)
    b = METHODS[method].search(ctx)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and not model.training
    assert a.mask.sha256() == b.mask.sha256()
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    assert a.weights.keys() == before.keys()
    c = METHODS[method].search(SearchContext(cfg=C.load(None, [*_overrides(cfg), "seed=1"]), model=model,
                                             data=data, device=torch.device("cpu")))
    assert c.mask.sha256() != a.mask.sha256()


def _overrides(cfg):
    s = cfg.search
    return [f"search.method={s.method}", f"search.density={s.density}", f"model.name={cfg.model.name}",
            f"training.epochs={cfg.training.epochs}", f"search.length={s.length}"]


def test_gates_end_to_end_through_the_pipeline(tmp_path):
    overrides = ["search.method=gates", "search.density=0.5", "training.epochs=10", "search.length=1.0",
                 "training.dense_baseline=false", "resources.device=cpu"]
    cfg = C.load(None, overrides)
    summary = pipeline.run(cfg, tmp_path / "run", progress=False)
    assert summary["strong_ticket"] is True and summary["retrained"] is False
    assert summary["retrain_seconds"] == 0
    assert summary["achieved_density"] == Mask.load(tmp_path / "run" / "mask.pt").density
    assert abs(summary["final_search_metrics"]["expected_density"] - 0.5) <= 0.01
    print(f"gates pipeline (10 search epochs) test accuracy {summary['test_accuracy']:.4f}")
    assert summary["test_accuracy"] > 0.5
    # The strong ticket does not depend on the search-point weights (everything is re-drawn), so
    # the same search on a fresh model reproduces the saved mask and the pipeline's accuracy.
    ticket, _, _ = _search(cfg)
    saved = Mask.load(tmp_path / "run" / "mask.pt")
    assert ticket.mask.sha256() == saved.sha256() == summary["mask_sha256"]
    data = _digits()
    model = models.build(cfg.model.name, data.input_shape, data.num_classes)
    model.load_state_dict(ticket.weights)
    saved.apply_(model)
    assert evaluate(model, data)["test_accuracy"] == summary["test_accuracy"]


# ------------------------------------------------------------------- search.strong_init

def _weights(method, init=None, seed=0):
    extra = ["data.subset=200", f"seed={seed}"] + ([f"search.strong_init={init}"] if init else [])
    ticket, _, model = _search(_cfg(method, 0.5, epochs=1, extra=extra))
    return {n: ticket.weights[n] for n in models.prunable_names(model)}, ticket


@pytest.mark.parametrize("init", ["kaiming_uniform", "signed_constant", "kaiming_normal"])
def test_both_methods_select_from_identical_weights_when_strong_init_is_set(init):
    gates, tg = _weights("gates", init)
    popup, tp = _weights("edge_popup", init)
    assert gates.keys() == popup.keys() and all(torch.equal(gates[n], popup[n]) for n in gates)
    assert tg.extra["strong_init"] == tp.extra["strong_init"] == init
    assert tg.mask.sha256() != tp.mask.sha256()          # only the selection differs
    other, _ = _weights("gates", init, seed=1)
    assert not torch.equal(other["1.weight"], gates["1.weight"])
    for n, w in gates.items():
        fan_in = w[0].numel()
        if init == "signed_constant":
            assert torch.allclose(w.abs(), torch.full_like(w, math.sqrt(2 / fan_in))), n
        elif init == "kaiming_uniform":
            assert w.abs().max() <= math.sqrt(6 / fan_in) and w.std() == pytest.approx(math.sqrt(2 / fan_in), rel=0.1)
        else:
            assert w.std() == pytest.approx(math.sqrt(2 / fan_in), rel=0.1) and w.abs().max() > math.sqrt(6 / fan_in)


def test_strong_init_null_keeps_each_papers_weights_drawn_as_before():
    """Null: gates on He-uniform, edge-popup on signed constants, each from its own generator,
    exactly the draw the methods made before the knob (layer by layer, parameter order)."""
    from cts_ray import runtime
    for method in ("gates", "edge_popup"):
        weights, ticket = _weights(method)
        assert ticket.extra["strong_init"] == {"gates": "kaiming_uniform", "edge_popup": "signed_constant"}[method]
        gen = runtime.generator(0, f"{method}:init")
        for n, w in weights.items():
            old = torch.empty(w.shape)
            if method == "gates":
                nn.init.kaiming_uniform_(old, a=0, nonlinearity="relu", generator=gen)
            else:
                old = torch.where(torch.rand(w.shape, generator=gen) < 0.5, -1.0, 1.0) * math.sqrt(2 / w[0].numel())
            assert torch.equal(w, old), (method, n)


def test_strong_init_config_keeps_old_hashes_and_applies_to_strong_tickets_only():
    from cts_ray.methods import applies
    assert C.load(None, ["search.strong_init=null"]).hash == C.Config().hash == "4b72a4eecf22"
    assert C.load(None, ["search.strong_init=signed_constant"]).hash != "4b72a4eecf22"
    with pytest.raises(C.ConfigError, match=r"^search.strong_init: 'he' is not allowed; choose one of: null, "
                                            r"kaiming_uniform, signed_constant, kaiming_normal$"):
        C.load(None, ["search.strong_init=he"])
    assert applies("gates", "search.strong_init") and applies("edge_popup", "search.strong_init")
    assert not any(applies(m, "search.strong_init") for m in ("cts", "ltr", "snip", "random"))
