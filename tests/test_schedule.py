"""The shared-work grid searcher (cts_ray/sweep/schedule.py): a trial is handed out only when it can
run without waiting on another trial's dense run or LTR rounds, LTR chains first."""
from ray.tune.search import Searcher

from cts_ray.sweep.schedule import SharedWorkGrid, Work, plan, shares_work
from cts_ray.sweep.spec import validate

from conftest import REPO


def _grid(tmp_path):
    # seed 0: an LTR chain of 2 / 5 / 8 rounds and two CTS trials; seed 1: one CTS trial
    work = [Work({"search.method": "ltr", "search.density": d, "seed": 0}, "dense-ltr0", "chain0", r)
            for d, r in ((0.64, 2), (0.33, 5), (0.17, 8))]
    work += [Work({"search.method": "cts", "seed": 0, "i": i}, "dense0", None, 0) for i in range(2)]
    work += [Work({"search.method": "cts", "seed": 1}, "dense1", None, 0)]
    return SharedWorkGrid(work, tmp_path)


def _cache(tmp_path, key):
    (tmp_path / key).mkdir()
    (tmp_path / key / "dense.pt").write_bytes(b"")


def test_trials_are_handed_out_only_when_they_can_run_without_waiting(tmp_path):
    g = _grid(tmp_path)
    first = [g.suggest(f"t{i}") for i in range(4)]
    # the LTR chain's shallowest trial first (critical path), then one trial per unstarted dense run
    assert first[0] == {"search.method": "ltr", "search.density": 0.64, "seed": 0}
    assert {first[1]["seed"], first[2]["seed"]} == {0, 1} and first[3] is None
    assert g.suggest("t9") is None                 # everything else would wait
    _cache(tmp_path, "dense0")                      # seed 0's dense run is now in the cache
    assert g.suggest("t4") == {"search.method": "cts", "seed": 0, "i": 1}
    assert g.suggest("t5") is None                  # the 5-round LTR trial waits for the 2-round one
    g.on_trial_complete("t0")
    assert g.suggest("t6") == {"search.method": "ltr", "search.density": 0.33, "seed": 0}
    g.on_trial_complete("t6", error=True)           # ended, even if failed: its successor trains the rounds
    assert g.suggest("t7")["search.density"] == 0.17
    assert g.suggest("t8") == Searcher.FINISHED


def test_a_dense_run_whose_trainer_failed_is_trained_by_the_next_trial(tmp_path):
    g = SharedWorkGrid([Work({"seed": 0, "i": i}, "d", None, 0) for i in range(2)], tmp_path)
    assert g.suggest("a") == {"seed": 0, "i": 0} and g.suggest("b") is None
    g.on_trial_complete("a", error=True)            # no dense.pt written
    assert g.suggest("b") == {"seed": 0, "i": 1}


def test_state_survives_save_and_restore(tmp_path):
    g = _grid(tmp_path)
    g.suggest("t0")
    g.save(str(tmp_path / "state.pkl"))
    h = SharedWorkGrid([], tmp_path / "other")
    h.restore(str(tmp_path / "state.pkl"))
    assert h.running == {"t0": 0} and len(h.todo) == 5
    assert h.suggest("t1") == g.suggest("t1")


def test_plan_finds_shared_dense_runs_and_ltr_chains(tmp_path):
    spec = validate({"name": "p", "base": str(REPO / "configs" / "digits.yaml"), "storage": str(tmp_path),
                     "grid": {"search.method": ["ltr", "cts"], "search.density": [0.64, 0.41], "seed": [0, 1]}})
    work = plan(spec, spec.grid_points())
    assert shares_work(work)
    ltr = [w for w in work if w.chain]
    assert len({w.chain for w in ltr}) == 2 and sorted({w.rounds for w in ltr}) == [2, 4]
    assert len({w.dense for w in work}) == 2        # one per seed (dense_baseline: every method trains to the end)
    seeds_only = validate({"name": "q", "base": str(REPO / "configs" / "digits.yaml"), "storage": str(tmp_path),
                           "grid": {"seed": [0, 1, 2]}})
    assert not shares_work(plan(seeds_only, seeds_only.grid_points()))
