"""Data parallelism (cts_ray/distributed.py): 2 gloo workers with global batch B compute what one
worker with batch B computes — dense weights, CTS θ and mask, LTR and SNIP masks, test accuracy —
and every rank reads the same evaluation numbers; with ``model.batchnorm_sync`` the same holds
for ResNet-20 (SyncBatchNorm). A world of one is bit for bit the path without a world."""
from pathlib import Path

import pytest
import torch

from cts_ray import config as C
from cts_ray import data as D
from cts_ray import models, pipeline
from cts_ray.cache import DenseCache
from cts_ray.distributed import World
from cts_ray.masking import Mask
from cts_ray.methods import METHODS, SearchContext
from cts_ray.train import train_epochs

from ddp_world import run_world

SHORT = ["training.epochs=4", "training.milestones=[3]", "search.length=0.5"]
PIPELINE_METHODS = ("cts", "ltr", "snip")
SEARCHED = ("cts", "gates", "edge_popup")   # replicated mask parameters: allclose, masks overlap
SCORED = ("snip", "grasp", "synflow")        # rank 0's scores: the one-worker mask exactly


def _dense(cfg, data, model, epochs: int = 3):
    records = list(train_epochs(model, data, cfg.training, start=0, end=epochs, order_seed=1))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, records


def _digits_dense(more=()):
    cfg = C.load(None, SHORT + list(more))
    data = D.load(cfg.data)
    torch.manual_seed(0)
    return _dense(cfg, data, models.build("mlp_digits", data.input_shape, data.num_classes))


def digits_checks(folder: str) -> dict:
    """Everything compared on digits, as one rank computes it (or the one process)."""
    state, records = _digits_dense()
    out = {"world": World.current(), "dense": state, "records": records}
    # a summed loss (not scaled per shard) and clipping by the global batch's gradient norm
    out["dense_sum_clipped"] = _digits_dense(["training.loss_reduction=sum", "training.lr=0.002",
                                              "training.grad_clip=1"])[0]
    data = D.load(C.load(None, SHORT).data)
    for method in SEARCHED + SCORED:
        cfg = C.load(None, SHORT + [f"search.method={method}"])
        torch.manual_seed(0)
        model = models.build("mlp_digits", data.input_shape, data.num_classes)
        ticket = METHODS[method].search(SearchContext(cfg=cfg, model=model, data=data, device=torch.device("cpu")))
        out[method] = {"scores": ticket.scores, "mask": ticket.mask.flat()}
    cache = DenseCache(Path(folder) / "cache")   # the dense run: trained by the first method, read by the others
    for method in PIPELINE_METHODS:
        seen = []
        summary = pipeline.run(C.load(None, SHORT + [f"search.method={method}", "search.density=0.2"]),
                               Path(folder) / method, progress=False, on_record=lambda r, p: seen.append(r),
                               cache=cache)
        out[f"run:{method}"] = {k: summary[k] for k in ("mask_sha256", "test_accuracy", "achieved_density")}
        out[f"run:{method}"]["records"] = len(seen)
        out[f"run:{method}"]["cached"] = seen[0].get("cached") if seen else None
        if World.current().main:   # the run folder's writer
            out[f"mask:{method}"] = Mask.load(Path(folder) / method / "mask.pt").flat()
    return out


def world_of_one_dense() -> dict:
    return _digits_dense()[0]


def resnet_sync_bn(root: str) -> dict:
    """Two SGD steps of ResNet-20 in float64 (in float32 its gradients at initialisation agree with
    float64's only to ~1e-3, whatever the number of workers)."""
    cfg = C.load(None, ["data.name=mnist", f"data.root={root}", "data.subset=128", "data.test_subset=100",
                        "model.name=resnet20", "model.batchnorm_sync=true", "training.batch_size=64",
                        "training.epochs=1", "training.milestones=[]"])
    data = D.load(cfg.data)
    data.train_x, data.test_x = data.train_x.double(), data.test_x.double()
    model = pipeline.build_model(cfg, data, torch.device("cpu"), False).double()
    state, records = _dense(cfg, data, model, epochs=1)
    synced = any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    return {"state": state, "records": records, "synced": synced}


def test_test_shards_hold_every_test_example_once():
    d = D.load(C.load(None, []).data)
    for size in (2, 3):
        rows = [i for r in range(size) for a, b in d.test_ranges(100, (r, size)) for i in range(a, b)]
        assert sorted(rows) == list(range(d.n_test))
        x = torch.cat([torch.cat([x for x, _ in d.test_batches(100, shard=(r, size))]) for r in range(size)])
        assert x.shape == d.test_x.shape


@pytest.fixture(scope="module")
def digits(tmp_path_factory, one_thread):
    tmp = tmp_path_factory.mktemp("ddp")
    one = digits_checks(str(tmp / "one"))
    two = run_world(digits_checks, 2, tmp / "two", str(tmp / "two"))
    return one, two, tmp / "two"


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_two_workers_train_the_one_worker_weights(digits):
    one, two, _ = digits
    assert [w["world"] for w in two] == [World(0, 2), World(1, 2)] and one["world"] == World()
    for rank in two:
        assert _max_diff(one["dense"], rank["dense"]) < 1e-5
        assert _max_diff(one["dense_sum_clipped"], rank["dense_sum_clipped"]) < 1e-5
        for a, b in zip(one["records"], rank["records"]):
            assert a["test_accuracy"] == b["test_accuracy"]
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
            assert a["train_accuracy"] == b["train_accuracy"]
    # every rank reads the same evaluation numbers
    assert [{k: r[k] for k in ("test_loss", "test_accuracy")} for r in two[0]["records"]] == \
        [{k: r[k] for k in ("test_loss", "test_accuracy")} for r in two[1]["records"]]


def test_two_workers_find_the_one_worker_masks(digits):
    one, two, _ = digits
    for rank in two:
        for method in SEARCHED:
            a, b = one[method], rank[method]
            assert torch.allclose(a["scores"], b["scores"], atol=1e-4), method
            assert (a["mask"] & b["mask"]).sum() / a["mask"].sum() >= 0.99, method
        for method in SCORED:
            assert torch.equal(one[method]["mask"], rank[method]["mask"]), method
        for method in PIPELINE_METHODS:   # CTS's θ is a float reduction apart: a mask may differ at the margin
            skip = ("records", "cached", *(("mask_sha256", "test_accuracy") if method in SEARCHED else ()))
            assert {k: v for k, v in rank[f"run:{method}"].items() if k not in skip} == \
                {k: v for k, v in one[f"run:{method}"].items() if k not in skip}, method
            if rank is not two[0]:
                continue
            a, b = one[f"mask:{method}"], rank[f"mask:{method}"]
            if method in SEARCHED:   # retrained from a mask that may differ in a few weights
                assert (a & b).sum() / a.sum() >= 0.99, method
                assert abs(rank[f"run:{method}"]["test_accuracy"] - one[f"run:{method}"]["test_accuracy"]) <= 0.01
            else:
                assert torch.equal(a, b), method
    for method in SEARCHED:   # the mask parameters are replicated exactly
        assert torch.equal(two[0][method]["scores"], two[1][method]["scores"]), method


def test_only_rank_0_reports_and_writes(digits):
    one, (first, second), folder = digits
    for m in PIPELINE_METHODS:
        assert first[f"run:{m}"]["records"] == one[f"run:{m}"]["records"] > 0 and second[f"run:{m}"]["records"] == 0
        assert (folder / m / "summary.json").is_file()
    assert [first[f"run:{m}"]["cached"] for m in PIPELINE_METHODS] == [False, True, True]
    assert len(list((folder / "cache").iterdir())) == 2   # the dense run and LTR's rounds, written once
    # one run folder per method, no staging folder left (rank 1 made none; had it published after
    # rank 0 it would have refused the folder as taken)
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_a_world_of_one_is_the_path_without_a_world(tmp_path, one_thread):
    (alone,) = run_world(world_of_one_dense, 1, tmp_path)
    plain = world_of_one_dense()
    assert all(torch.equal(alone[k], plain[k]) for k in plain)


def test_sync_batchnorm_resnet20_on_two_workers(tmp_path, mnist_root, one_thread):
    one = resnet_sync_bn(mnist_root)
    two = run_world(resnet_sync_bn, 2, tmp_path, mnist_root)
    assert not one["synced"] and all(r["synced"] for r in two)
    for rank in two:
        assert _max_diff(one["state"], rank["state"]) < 1e-9
        assert rank["records"][0]["test_accuracy"] == one["records"][0]["test_accuracy"]
        assert rank["records"][0]["test_loss"] == pytest.approx(one["records"][0]["test_loss"], rel=1e-6)
