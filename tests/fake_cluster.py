"""An autoscaling Ray cluster on one machine, shaped like cluster.yaml, running one sweep.

    .venv/bin/python tests/fake_cluster.py OUT SWEEP.yaml [--kill-node] [--set KEY=VALUE ...]

Re-runs itself as PID 1 of new network, PID and mount namespaces (`unshare`, as root), so its Ray
sees no other Ray on the machine, takes the default ports, and everything it started ends with it.
Inside: Ray's fake multi-node provider (each "node" is real Ray processes on this machine) with
cluster.yaml's node types (its logical GPUs, at most 2 workers, a short idle timeout), a head
started the way `ray up` starts it (autoscaler v2), then `cts-ray sweep SWEEP.yaml --address ...`,
then a wait until the idle workers are gone. ``--kill-node``: once a trial has saved its first
epoch, every process of one worker node that runs a Ray Train worker of it is SIGKILLed (its raylet,
everything under it, its agents), as a reclaimed spot instance vanishes. OUT gets:

    fake_cluster.yaml   the autoscaler config generated from cluster.yaml
    timeline.jsonl      the autoscaler's view about every second: {"t", "phase", "status"}
    events.json         seconds since start (t0) of: head up, sweep start/end, scaled down; with
                        --kill-node the kill and the node's id (killed_node)
    status_*.txt        `ray status` after the sweep and at the end
    sweep.log           the sweep's output; sweeps/ its results (storage)
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HEAD_TYPE = "ray.head.default"   # the type the fake provider gives its head node
GCS = "127.0.0.1:6379"           # the fake provider's workers join the head here


def fake_cluster_config(cluster_yaml: Path, max_workers: int = 2, idle_timeout_minutes: float = 0.1) -> dict:
    """cluster.yaml's node types on the fake multi-node provider; every field the autoscaler reads."""
    c = yaml.safe_load(cluster_yaml.read_text())
    types = c["available_node_types"]
    head = types[c["head_node_type"]]
    nodes = {HEAD_TYPE: {"resources": head["resources"], "node_config": {}, "max_workers": 0}}
    for name, t in types.items():
        if name != c["head_node_type"]:
            nodes[name] = {"resources": {**t["resources"], "object_store_memory": 100 * 2**20},
                           "node_config": {}, "min_workers": t.get("min_workers", 0),
                           "max_workers": min(t["max_workers"], max_workers)}
    return {"cluster_name": c["cluster_name"] + "-fake", "max_workers": max_workers,
            "upscaling_speed": c.get("upscaling_speed", 1.0), "idle_timeout_minutes": idle_timeout_minutes,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True},
            "auth": {"ssh_user": "ray"}, "docker": {}, "available_node_types": nodes, "head_node_type": HEAD_TYPE,
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
            "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
            "worker_start_ray_commands": []}


def _run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def _isolate(out: Path, config: Path) -> None:
    """Inside the new namespaces: loopback up; Ray's /tmp/ray is OUT/tmp-ray; and the autoscaler's
    fake-provider defaults file (missing from Ray 2.60's wheel) is the generated config — a bind
    mount seen only here, the installed package is untouched."""
    _run(["ip", "link", "set", "lo", "up"])
    (out / "tmp-ray").mkdir(exist_ok=True)
    Path("/tmp/ray").mkdir(exist_ok=True)
    _run(["mount", "--bind", str(out / "tmp-ray"), "/tmp/ray"])
    import ray.autoscaler._private.fake_multi_node as pkg
    overlay = out / "fake_multi_node"
    shutil.copytree(Path(pkg.__file__).parent, overlay, dirs_exist_ok=True)
    shutil.copy(config, overlay / "example.yaml")
    _run(["mount", "--bind", str(overlay), str(Path(pkg.__file__).parent)])


def _sample(out: Path, phase: list, stop: threading.Event, t0: float) -> None:
    from ray.autoscaler.v2.sdk import get_cluster_status
    with open(out / "timeline.jsonl", "a") as f:
        while True:
            last = stop.is_set()   # one more sample after the stop: the final state
            try:
                status = _plain(get_cluster_status(GCS, timeout=5))
                f.write(json.dumps({"t": round(time.time() - t0, 2), "phase": phase[0], "status": status}) + "\n")
                f.flush()
            except Exception as e:   # the head not up yet, or busy: the next sample will tell
                f.write(json.dumps({"t": round(time.time() - t0, 2), "phase": phase[0], "error": repr(e)}) + "\n")
            if last:
                return
            stop.wait(1.0)


def _plain(o):
    """The autoscaler's status as JSON data (dataclasses.asdict cannot copy its protobuf maps)."""
    if dataclasses.is_dataclass(o):
        return {f.name: _plain(getattr(o, f.name)) for f in dataclasses.fields(o)}
    if isinstance(o, (list, tuple)):
        return [_plain(x) for x in o]
    if hasattr(o, "items"):
        return {str(k): _plain(v) for k, v in o.items()}
    return o if isinstance(o, (str, int, float, bool, type(None))) else str(o)


def _workers(status: dict) -> list:
    return [n for n in status["active_nodes"] + status["idle_nodes"] if n["ray_node_type_name"] != HEAD_TYPE]


def _procs() -> dict:
    """{pid: (parent pid, command line)} of every process (this namespace's: all of the cluster)."""
    out = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            out[int(d.name)] = (ppid, (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except (OSError, ValueError, IndexError):
            continue
    return out


def _train_worker_nodes(procs: dict) -> dict:
    """{node id: its raylet's pid} of the nodes where Ray Train workers run (the raylets they descend from)."""
    nodes = {}
    for pid, (_, cmd) in procs.items():
        if "RayTrainWorker" not in cmd:
            continue
        while pid in procs and "raylet" not in procs[pid][1].split(" ", 1)[0]:
            pid = procs[pid][0]
        if pid in procs:
            flag = next(a for a in procs[pid][1].split() if a.startswith("--node_id="))
            nodes[flag.split("=", 1)[1]] = pid
    return nodes


def _kill_node(node_id: str, raylet: int) -> int:
    """SIGKILL the node's raylet, every process under it (its workers) and every other process
    named by its id (its agents, log monitor). Returns how many."""
    procs = _procs()
    doomed = {p for p, (_, cmd) in procs.items() if node_id in cmd} | {raylet}
    while True:
        more = {p for p, (pp, _) in procs.items() if pp in doomed} - doomed
        if not more:
            break
        doomed |= more
    for p in doomed:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(doomed)


def _kill_a_node_after_first_save(out: Path, sweep: subprocess.Popen, events: dict, t0: float) -> None:
    """Once a trial's progress file exists (its first saved epoch): kill one node of its workers.
    ``events`` gets the nodes its workers ran on then (train_worker_nodes) and the one killed."""
    while sweep.poll() is None:
        if next(out.glob("**/progress/*.pt"), None) is not None:
            nodes = _train_worker_nodes(_procs())
            if nodes:
                node = max(nodes)
                events.update(kill=time.time() - t0, train_worker_nodes=sorted(nodes), killed_node=node,
                              killed_processes=_kill_node(node, nodes[node]))
                return
        time.sleep(0.1)


def inside(out: Path, sweep_args: list[str], scale_down_s: float = 90, kill_node: bool = False) -> int:
    from ray.autoscaler.v2.sdk import get_cluster_status
    t0 = time.time()
    config = out / "fake_cluster.yaml"
    config.write_text(yaml.safe_dump(fake_cluster_config(REPO / "cluster.yaml")))
    _isolate(out, config)
    events = {"t0": t0}   # the others: seconds since t0
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           # as `ray up` starts the head: autoscaler v2, told which instance and node type it is
           "RAY_enable_autoscaler_v2": "1", "RAY_NODE_TYPE_NAME": HEAD_TYPE,
           "RAY_CLOUD_INSTANCE_ID": "fffffffffffffffffffffffffffffffffffffffffffffffffff00000",
           # a lost node declared dead after ~5 s of failed health checks, not ~15 s
           "RAY_health_check_period_ms": "1000",
           # the autoscaler decides every second, not every 5 s (launches, replacements, scale-down)
           "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    head = fake_cluster_config(REPO / "cluster.yaml")["available_node_types"][HEAD_TYPE]["resources"]
    _run([str(BIN / "ray"), "start", "--head", "--port=6379", f"--autoscaling-config={config}",
          f"--num-cpus={head.get('CPU', 0)}", f"--num-gpus={head.get('GPU', 0)}", "--object-store-memory=100000000",
          "--dashboard-host=127.0.0.1", "--disable-usage-stats"], env=env)
    events["head_up"] = time.time() - t0
    phase, stop = ["sweep"], threading.Event()
    sampler = threading.Thread(target=_sample, args=(out, phase, stop, t0), daemon=True)
    sampler.start()
    events["sweep_start"] = time.time() - t0
    with open(out / "sweep.log", "w") as log:
        sweep = subprocess.Popen([str(BIN / "cts-ray"), "sweep", *sweep_args, "--address", GCS, "--quiet"],
                                 stdout=log, stderr=subprocess.STDOUT, env=env, cwd=out)
        if kill_node:
            _kill_a_node_after_first_save(out, sweep, events, t0)
        rc = sweep.wait()
    events["sweep_end"] = time.time() - t0
    events["sweep_rc"] = rc
    (out / "status_after_sweep.txt").write_text(_run([str(BIN / "ray"), "status", f"--address={GCS}"], env=env).stdout)
    phase[0] = "idle"
    deadline = time.time() + scale_down_s
    while time.time() < deadline:
        try:
            if not _workers(_plain(get_cluster_status(GCS, timeout=5))):
                events["scaled_down"] = time.time() - t0
                break
        except Exception:
            pass
        time.sleep(1)
    phase[0] = "end"
    stop.set()
    sampler.join()
    (out / "status_end.txt").write_text(_run([str(BIN / "ray"), "status", f"--address={GCS}"], env=env).stdout)
    (out / "events.json").write_text(json.dumps(events, indent=1))
    return rc   # as PID 1 of the namespace: every process it started ends when it returns


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[0]).resolve()
    if os.getpid() != 1:   # not yet inside: start again as PID 1 of new namespaces
        if os.geteuid() != 0 or not shutil.which("unshare"):
            print("fake_cluster: needs root and util-linux's unshare (new network/PID/mount namespaces)",
                  file=sys.stderr)
            return 2
        out.mkdir(parents=True, exist_ok=True)
        sweep = str(Path(argv[1]).resolve())   # the sweep runs in OUT
        return subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc",
                               sys.executable, __file__, str(out), sweep, *argv[2:]]).returncode
    kill = "--kill-node" in argv
    return inside(out, [a for a in argv[1:] if a != "--kill-node"], kill_node=kill)


if __name__ == "__main__":
    sys.exit(main())
