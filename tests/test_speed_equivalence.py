"""Each speed measure leaves results as they were: in-place masking and on-device metrics against a
plain reference loop (bitwise), torch.compile (equal up to float rounding), the dense-run cache."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from cts_ray import config as C, models, pipeline
from cts_ray.cache import DenseCache
from cts_ray.data import load
from cts_ray.masking import Mask, kept_count, layer_shapes
from cts_ray.models import prunable
from cts_ray.runtime import derive_seed
from cts_ray.train import lr_at, train_epochs

QUICK = ["training.epochs=3", "training.milestones=[2]", "search.length=0.5", "search.density=0.1"]


def _setup():
    cfg = C.load(None, ["training.epochs=2", "training.milestones=[1]", "training.weight_decay=0.001"])
    data = load(cfg.data, torch.device("cpu"))
    torch.manual_seed(0)
    model = models.build(cfg.model.name, data.input_shape, data.num_classes)
    shapes = layer_shapes(model)
    d = sum(s.numel() for s in shapes.values())
    mask = Mask.top_k(torch.rand(d, generator=torch.Generator().manual_seed(3)), kept_count(0.2, d), shapes)
    return cfg, data, model, mask


def test_in_place_masked_training_equals_a_plain_masked_copy_loop():
    """train_epochs keeps masked weights at zero in place and sums metrics on the device; a naive
    loop that multiplies fresh masked copies into every forward and syncs every step agrees bit
    for bit on every kept weight."""
    cfg, data, model, mask = _setup()
    t = cfg.training
    ref = copy.deepcopy(model)
    list(train_epochs(model, data, t, start=0, end=t.epochs, order_seed=7, mask=mask))

    names = list(prunable(ref))
    m = {n: mask.layers[n].to(torch.float32) for n in names}
    opt = torch.optim.SGD([p for p in ref.parameters()], lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    for epoch in range(t.epochs):
        for g in opt.param_groups:
            g["lr"] = lr_at(t, epoch)
        ref.train()
        gen = torch.Generator().manual_seed(derive_seed(7, f"epoch:{epoch}"))
        for x, y in data.train_batches(t.batch_size, gen):
            params = dict(ref.named_parameters())
            masked = {n: params[n] * m[n] for n in names}
            loss = F.cross_entropy(functional_call(ref, masked, (x,)).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for n in names:   # weight decay must not pull on pruned weights either
                params[n].grad.mul_(m[n])
            opt.step()
            loss.item()   # the per-step host sync the project avoids
    ours, theirs = dict(model.named_parameters()), dict(ref.named_parameters())
    for n in ours:
        keep = m[n].bool() if n in m else torch.ones_like(ours[n], dtype=torch.bool)
        assert torch.equal(ours[n][keep], theirs[n][keep]), n
        if n in m:
            assert (ours[n][~keep] == 0).all()


def test_compiled_training_matches_eager():
    cfg, data, model, mask = _setup()
    init = copy.deepcopy(model.state_dict())
    runs = {}
    for compiled in (False, True):
        model.load_state_dict(init)
        recs = list(train_epochs(model, data, cfg.training, start=0, end=2, order_seed=1, mask=mask, compile=compiled))
        runs[compiled] = (copy.deepcopy(model.state_dict()), recs[-1]["test_accuracy"])
    (eager, acc_e), (comp, acc_c) = runs[False], runs[True]
    assert acc_e == acc_c
    for k in eager:
        assert torch.allclose(eager[k], comp[k], rtol=1e-4, atol=1e-5), k


def test_dense_cache_hit_gives_the_same_ticket(tmp_path):
    cfg = C.load(None, QUICK + ["training.dense_baseline=false"])
    cache = DenseCache(tmp_path / "cache")
    plain = pipeline.run(cfg, tmp_path / "plain", progress=False)
    miss = pipeline.run(cfg, tmp_path / "miss", progress=False, cache=cache)
    hit = pipeline.run(cfg, tmp_path / "hit", progress=False, cache=cache)
    assert plain["mask_sha256"] == miss["mask_sha256"] == hit["mask_sha256"]
    assert plain["test_accuracy"] == miss["test_accuracy"] == hit["test_accuracy"]
    assert hit["pretrain_seconds"] == miss["pretrain_seconds"]   # the cached run's time is still counted


def _cts(over):
    from cts_ray.methods import METHODS, SearchContext
    cfg = C.load(None, over)
    data = load(cfg.data, torch.device("cpu"))
    torch.manual_seed(derive_seed(cfg.seed, "init"))
    model = models.from_config(cfg.model, data.input_shape, data.num_classes)
    return METHODS["cts"].search(SearchContext(cfg=cfg, model=model, data=data, device=torch.device("cpu")))


@pytest.mark.parametrize("over", [
    [],
    # the most sensitive variant: per-layer rescaling amplifies any rounding difference into the masks
    ["search.controller=lagrange", "search.rescale=layer", "search.loss_scale=100", "search.lr_drop_at=epoch"],
], ids=["default", "lagrange-rescaled"])
def test_compiled_search_step_finds_the_eager_masks(over):
    """torch.compile of the search step (mask, its backward and the controller fused; noise and Adam
    as eager): the same masks as the eager search for the same seed, on CPU."""
    eager = _cts(over + ["resources.compile_search=false"])
    compiled = _cts(over + ["resources.compile_search=true"])
    assert compiled.extra["compiled"] and not eager.extra["compiled"]
    assert compiled.mask.sha256() == eager.mask.sha256()
    assert torch.allclose(compiled.scores, eager.scores, rtol=1e-5, atol=1e-6)
    assert [h["objective"] for h in compiled.history] == pytest.approx([h["objective"] for h in eager.history],
                                                                       rel=1e-5)


def test_counter_noise_is_logistic_and_new_every_step():
    """The fused step's noise: logistic (Kolmogorov–Smirnov distance from σ under the 0.1 % critical
    value), uncorrelated between keys, with the index and with its neighbour."""
    from cts_ray.methods.cts import counter_noise, draw_key
    n = 200_000
    g = torch.Generator().manual_seed(0)
    a, b = counter_noise(draw_key(g), n), counter_noise(draw_key(g), n)
    empirical = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = (empirical - torch.sigmoid(a.double().sort().values)).abs().max().item()
    assert ks < 1.95 / n ** 0.5, ks
    assert abs(a.mean().item()) < 0.02 and a.var().item() == pytest.approx(torch.pi ** 2 / 3, rel=0.02)
    corr = lambda x, y: torch.corrcoef(torch.stack([x, y]))[0, 1].abs().item()
    assert corr(a, b) < 0.01 and corr(a, torch.arange(n, dtype=torch.float32)) < 0.01
    assert corr(a[1:], a[:-1]) < 0.01


class _Reseeded:
    """A SearchContext whose noise generator has another seed: the same search with another stream."""

    def __init__(self, ctx, seed):
        self.__dict__.update(ctx.__dict__)
        self._seed, self._ctx = seed, ctx

    def generator(self, tag, device="cpu"):
        g = self._ctx.generator(tag, device)
        return torch.Generator(device=device).manual_seed(self._seed) if tag == "noise" else g


def _cts_ctx(over, noise_seed=None):
    from cts_ray.methods import METHODS, SearchContext
    cfg = C.load(None, over)
    data = load(cfg.data, torch.device("cpu"))
    torch.manual_seed(derive_seed(cfg.seed, "init"))
    model = models.from_config(cfg.model, data.input_shape, data.num_classes)
    ctx = SearchContext(cfg=cfg, model=model, data=data, device=torch.device("cpu"))
    return METHODS["cts"].search(ctx if noise_seed is None else _Reseeded(ctx, noise_seed))


def test_fused_step_is_the_same_search_with_another_noise_stream():
    """search.step: fused differs from exact only as another noise stream of the exact step does: the
    overlap of its mask with exact's, the density it holds and the objective it reaches all lie
    where another stream's do. Eager and compiled fused steps find the same search (logit's last-bit
    rounding aside) and a fused search repeats itself."""
    exact = _cts_ctx(QUICK)
    other = _cts_ctx(QUICK, noise_seed=12345)
    fused = _cts_ctx(QUICK + ["search.step=fused"])
    eager = _cts_ctx(QUICK + ["search.step=fused", "resources.compile_search=false"])
    assert fused.extra["compiled"] and not eager.extra["compiled"] and not exact.extra["compiled"]

    def overlap(a, b):
        a, b = a.mask.flat().bool(), b.mask.flat().bool()
        return ((a & b).sum() / a.sum()).item()
    assert exact.mask.sha256() != other.mask.sha256() and exact.mask.sha256() != fused.mask.sha256()
    assert abs(overlap(exact, fused) - overlap(exact, other)) < 0.1, (overlap(exact, fused), overlap(exact, other))
    last = lambda t, k: t.history[-1][k]
    for key, tol in (("expected_density", 0.25), ("objective", 0.5)):
        spread = abs(last(exact, key) - last(other, key)) + tol * last(exact, key)
        assert abs(last(fused, key) - last(exact, key)) <= spread, (key, last(exact, key), last(other, key), last(fused, key))
    assert overlap(fused, eager) > 0.99
    assert [h["objective"] for h in fused.history] == pytest.approx([h["objective"] for h in eager.history], rel=1e-3)
    assert _cts_ctx(QUICK + ["search.step=fused"]).mask.sha256() == fused.mask.sha256()


@pytest.mark.parametrize("objective", ["kl_reverse", "feature_mse"])
def test_teacher_outputs_computed_once_per_example_change_nothing(monkeypatch, objective):
    """Without batch-statistics layers the frozen teacher's outputs (logits, features) are computed
    once per example and reused every epoch: bit for bit the search that computes them every step."""
    from cts_ray.methods import cts
    cached = _cts([f"search.objective={objective}"])
    monkeypatch.setattr(cts, "teacher_outputs", lambda *args: None)
    per_step = _cts([f"search.objective={objective}"])
    assert cached.extra["teacher_cached"] and not per_step.extra["teacher_cached"]
    assert cached.mask.sha256() == per_step.mask.sha256() and torch.equal(cached.scores, per_step.scores)
    assert [h["objective"] for h in cached.history] == [h["objective"] for h in per_step.history]


def test_teacher_outputs_are_cached_only_where_they_do_not_depend_on_the_batch():
    from torch import nn

    from cts_ray.methods.cts import batch_independent
    assert batch_independent(models.build("lenet_300_100", (1, 28, 28), 10))
    assert batch_independent(models.build("conv4", (3, 32, 32), 10))
    assert not batch_independent(models.build("resnet20", (3, 32, 32), 10))      # BatchNorm
    assert not batch_independent(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1)))
    assert batch_independent(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.0)))
