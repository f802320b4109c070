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
from cts_ray.distributed import World
from cts_ray.methods import METHODS, SearchContext
from cts_ray.train import train_epochs

from ddp_world import run_world

SHORT = ["training.epochs=4", "training.milestones=[3]", "search.length=0.5"]
PIPELINE_METHODS = ("cts", "ltr", "snip")


def _dense(cfg, data, model, epochs: int = 3):
    records = list(train_epochs(model, data, cfg.training, start=0, end=epochs, order_seed=1))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, records


def _digits_dense():
    cfg = C.load(None, SHORT)
    data = D.load(cfg.data)
    torch.manual_seed(0)
    return _dense(cfg, data, models.build("mlp_digits", data.input_shape, data.num_classes))


def digits_checks(folder: str) -> dict:
    """Everything compared on digits, as one rank computes it (or the one process)."""
    state, records = _digits_dense()
    out = {"world": World.current(), "dense": state, "records": records}
    cfg = C.load(None, SHORT)
    data = D.load(cfg.data)
    torch.manual_seed(0)
    model = models.build("mlp_digits", data.input_shape, data.num_classes)
    ticket = METHODS["cts"].search(SearchContext(cfg=cfg, model=model, data=data, device=torch.device("cpu")))
    out["theta"], out["cts_mask"] = ticket.scores, ticket.mask.flat()
    for method in PIPELINE_METHODS:
        seen = []
        summary = pipeline.run(C.load(None, SHORT + [f"search.method={method}", "search.density=0.2"]),
                               Path(folder) / method, progress=False, on_record=lambda r, p: seen.append(r))
        out[method] = {k: summary[k] for k in ("mask_sha256", "test_accuracy", "achieved_density")}
        out[method]["records"] = len(seen)
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


@pytest.fixture(scope="module")
def digits(tmp_path_factory, one_thread):
    tmp = tmp_path_factory.mktemp("ddp")
    one = digits_checks(str(tmp / "one"))
    two = run_world(digits_checks, 2, tmp / "two", str(tmp / "two"))
    return one, two


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_two_workers_train_the_one_worker_weights(digits):
    one, two = digits
    assert [w["world"] for w in two] == [World(0, 2), World(1, 2)] and one["world"] == World()
    for rank in two:
        assert _max_diff(one["dense"], rank["dense"]) < 1e-5
        for a, b in zip(one["records"], rank["records"]):
            assert a["test_accuracy"] == b["test_accuracy"]
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
            assert a["train_accuracy"] == b["train_accuracy"]
    # every rank reads the same evaluation numbers
    assert [{k: r[k] for k in ("test_loss", "test_accuracy")} for r in two[0]["records"]] == \
        [{k: r[k] for k in ("test_loss", "test_accuracy")} for r in two[1]["records"]]


def test_two_workers_find_the_one_worker_cts_ltr_and_snip_masks(digits):
    one, two = digits
    for rank in two:
        assert torch.allclose(one["theta"], rank["theta"], atol=1e-4)
        overlap = (one["cts_mask"] & rank["cts_mask"]).sum() / one["cts_mask"].sum()
        assert overlap >= 0.99
        for method in PIPELINE_METHODS:
            assert {k: v for k, v in rank[method].items() if k != "records"} == \
                {k: v for k, v in one[method].items() if k != "records"}, method
    assert torch.equal(two[0]["cts_mask"], two[1]["cts_mask"])   # θ is replicated exactly
    # only rank 0 reports records (and writes the run folder: rank 1 would have refused it as taken)
    assert all(two[0][m]["records"] == one[m]["records"] > 0 and two[1][m]["records"] == 0
               for m in PIPELINE_METHODS)


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
