"""cts_ray/sweep/adapters.py reaches inside Ray where it has no public API: these fail, naming the
adapter, when Ray changes under it."""
import json
import subprocess
import sys

# A sweep's first run fails; resumed through the adapter with other callbacks, Tune must report
# to those, not to the ones pickled with the first run.
RESUMED_WITH_NEW_CALLBACKS = r"""
import json, os, sys, tempfile
import ray
from ray import tune
from cts_ray.sweep.adapters import restored_tuner

root = tempfile.mkdtemp()
flag = os.path.join(root, "fail")
open(flag, "w").close()

def trainable(config):
    if os.path.exists(flag):
        raise RuntimeError("the first run fails")
    tune.report({"x": 1})

class Seen(tune.Callback):
    def __init__(self):
        self.results = []
    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.results.append(result["x"])

ray.init(num_cpus=1, include_dashboard=False, configure_logging=False, log_to_driver=False)
first, second = Seen(), Seen()
tune.Tuner(trainable, run_config=tune.RunConfig(name="t", storage_path=root, callbacks=[first], verbose=0)).fit()
os.unlink(flag)
restored_tuner(os.path.join(root, "t"), trainable, [second]).fit()
print(json.dumps({"first": first.results, "second": second.results}))
"""


def test_a_restored_tuner_reports_to_the_callbacks_it_is_given(tmp_path):
    p = subprocess.run([sys.executable, "-c", RESUMED_WITH_NEW_CALLBACKS], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert p.returncode == 0, f"cts_ray.sweep.adapters.restored_tuner failed under this Ray:\n{p.stderr[-3000:]}"
    seen = json.loads(p.stdout.strip().splitlines()[-1])
    assert seen == {"first": [], "second": [1]}, (
        f"cts_ray.sweep.adapters.restored_tuner: the resumed trial reported to {seen}, not to the callbacks "
        "given; Ray's Tuner.restore changed how it keeps callbacks: update the adapter")
