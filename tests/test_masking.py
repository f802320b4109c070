"""The one masking mechanism: exact budgets, deterministic ties, reports, exact zeros in training."""
import pytest
import torch

from cts_ray import config as C
from cts_ray import data as D
from cts_ray import models
from cts_ray.masking import Mask, kept_count, layer_shapes
from cts_ray.train import train_epochs


def _model(name="mlp_digits", shape=(1, 8, 8)):
    torch.manual_seed(0)
    return models.build(name, shape, 10)


@pytest.mark.parametrize("density", [0.5, 0.1, 0.01, 1.0])
def test_top_k_keeps_exactly_rounded_kappa_d(density):
    model = _model()
    shapes = layer_shapes(model)
    d = sum(s.numel() for s in shapes.values())
    mask = Mask.top_k(torch.randn(d), kept_count(density, d), shapes)
    assert mask.kept == round(density * d) and mask.numel == d
    assert list(mask.layers) == models.prunable_names(model)


def test_ties_are_broken_deterministically_towards_lower_index():
    shapes = {"a": torch.Size([2, 3]), "b": torch.Size([4])}
    scores = torch.tensor([1., 0., 1., 1., 0., 1., 1., 0., 0., 1.])  # six tied ones, keep four
    m = Mask.top_k(scores, 4, shapes)
    assert m.flat().nonzero().flatten().tolist() == [0, 2, 3, 5]
    assert Mask.top_k(scores, 4, shapes).sha256() == m.sha256()


@pytest.mark.parametrize("kind", ["distinct", "few values", "all equal", "signed zeros", "nan"])
def test_top_k_by_selection_keeps_what_a_stable_sort_keeps(kind):
    """top_k selects (kthvalue) instead of sorting d scores: the same entries as the stable sort."""
    from cts_ray.masking import top_k_flat
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 1000, 30_000):
        s = {"distinct": lambda: torch.randn(n, generator=g), "few values": lambda: torch.randint(0, 4, (n,), generator=g).float(),
             "all equal": lambda: torch.zeros(n), "signed zeros": lambda: torch.randint(0, 2, (n,), generator=g).float() * -0.0,
             "nan": lambda: torch.where(torch.rand(n, generator=g) < 0.1, float("nan"), torch.randn(n, generator=g))}[kind]()
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            ref = torch.zeros(n, dtype=torch.bool)
            ref[torch.sort(s, descending=True, stable=True).indices[:k]] = True
            assert torch.equal(top_k_flat(s, k), ref), (n, k)


def test_report_save_load_and_hash(tmp_path):
    model = _model()
    shapes = layer_shapes(model)
    d = sum(s.numel() for s in shapes.values())
    mask = Mask.top_k(torch.randn(d, generator=torch.Generator().manual_seed(1)), 1000, shapes)
    rows = mask.report()
    assert [r["layer"] for r in rows] == list(shapes) + ["total"]
    assert sum(r["kept"] for r in rows[:-1]) == rows[-1]["kept"] == 1000
    for r in rows[:-1]:
        assert r["density"] == pytest.approx(r["kept"] / r["numel"])
    mask.save(tmp_path / "m.pt")
    again = Mask.load(tmp_path / "m.pt")
    assert again.sha256() == mask.sha256()
    flipped = Mask({n: m.clone() for n, m in mask.layers.items()})
    first = next(iter(flipped.layers.values()))
    first.view(-1)[0] = ~first.view(-1)[0]
    assert flipped.sha256() != mask.sha256()


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_masked_weights_stay_exactly_zero_through_training(optimizer):
    """SGD with momentum and weight decay, and Adam with weight decay, on a BN network."""
    cfg = C.load(None, ["model.name=resnet20", f"training.optimizer={optimizer}", "training.weight_decay=0.01",
                        "training.lr=0.05", "training.batch_size=128", "training.grad_clip=1.0",
                        "data.subset=512"])
    data = D.load(cfg.data)
    model = _model("resnet20")
    shapes = layer_shapes(model)
    d = sum(s.numel() for s in shapes.values())
    mask = Mask.top_k(torch.rand(d, generator=torch.Generator().manual_seed(0)), kept_count(0.1, d), shapes)
    before = {n: p.detach().clone() for n, p in models.prunable(model).items()}
    records = list(train_epochs(model, data, cfg.training, start=0, end=2,
                                order_seed=0, mask=mask))
    assert len(records) == 2 and all(r["phase"] == "train" for r in records)
    for name, p in models.prunable(model).items():
        m = mask.layers[name]
        assert torch.count_nonzero(p.detach()[~m]) == 0, name
        assert not torch.equal(p.detach()[m], before[name][m]), f"{name}: kept weights did not train"
    # applying the same mask again is a no-op
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mask.apply_(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
