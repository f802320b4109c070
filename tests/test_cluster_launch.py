"""The cluster path, run for real: `ray up` / `ray exec` / `ray down` of cluster.yaml, an autoscaling
cluster running a sweep across nodes, and the fixes found on the way (issue 12).

Only what cannot exist here is replaced, at the boundary: the AWS API by moto, and `ssh` / `rsync` by
stand-ins on PATH that record their arguments (and run nothing). Everything else is Ray's own CLI
code. The autoscaling cluster is Ray's fake multi-node provider (every node real Ray processes) in
its own network / PID / mount namespaces (tests/fake_cluster.py).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
import yaml

from conftest import BIN, REPO, _free_port, _ray_start, _stop_cluster
from cts_ray.sweep import tables

SSH_FROM = "198.51.100.7/32"   # a documentation range (RFC 5737) as the user's address

STANDIN = textwrap.dedent("""\
    #!{python}
    import json, os, sys
    with open(os.environ["CTS_STANDIN_LOG"], "a") as f:
        f.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + "\\n")
    """)


def _remote(argv: list) -> str:
    """The command line a recorded ssh call runs on the node: what sshd hands to the login shell."""
    target = next(i for i, a in enumerate(argv) if "@" in a and not a.startswith("-"))
    return " ".join(argv[target + 1:])


def _inner(argv: list) -> str:
    """The command inside Ray's `bash --login -c -i 'source ~/.bashrc; ... && (CMD)'` wrapper."""
    script = shlex.split(_remote(argv))[-1]
    return script.split(" && (", 1)[1][:-1]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """`ray up --yes`, `ray exec`, `ray down --yes` of cluster.yaml against moto, once."""
    tmp = tmp_path_factory.mktemp("launch")
    # The checkout without what .gitignore names: Ray hashes every file under the "." file mount.
    checkout = tmp / "cts-ray"
    shutil.copytree(REPO, checkout, ignore=shutil.ignore_patterns(
        ".venv", ".git", "results", "mlruns", "data", "*.egg-info", "__pycache__", ".pytest_cache"))
    (checkout / ".venv").mkdir()   # a local venv and git dir, which must not be sent
    cluster_yaml = checkout / "cluster.yaml"   # the user's one edit: the range they ssh from
    cluster_yaml.write_text(cluster_yaml.read_text().replace("SET-THIS/32", SSH_FROM))
    (checkout / ".git").mkdir()
    bindir, log = tmp / "bin", tmp / "standins.jsonl"
    bindir.mkdir()
    for name in ("ssh", "rsync"):
        (bindir / name).write_text(STANDIN.format(python=sys.executable))
        (bindir / name).chmod(0o755)
    out = {"log": log, "checkout": checkout}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
        mp.setenv("CTS_STANDIN_LOG", str(log))
        mp.setenv("HOME", str(tmp / "home"))   # Ray writes the cluster's ssh key under ~/.ssh
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-west-2",
                     # Ray attaches AWS's managed EC2/S3 policies to the role it creates
                     "MOTO_IAM_LOAD_MANAGED_POLICIES": "true", "MOTO_EC2_LOAD_DEFAULT_AMIS": "false"}.items():
            mp.setenv(k, v)
        mp.chdir(checkout)
        import boto3
        from moto import mock_aws
        from ray.autoscaler._private import commands
        from ray.autoscaler._private.aws import config as aws_config
        from ray.autoscaler._private.aws import node_provider
        from ray.scripts.scripts import down, exec as ray_exec, up

        from cts_ray import cluster_security_group
        # Ray's fixed waits: IAM propagation (15 s twice), polls (5 s), tag batching (1 s)
        mp.setattr(aws_config, "time", types.SimpleNamespace(sleep=lambda s: None, time=time.time))
        mp.setattr(commands, "POLL_INTERVAL", 0.1)
        mp.setattr(node_provider, "TAG_BATCH_DELAY", 0.05)
        with mock_aws():
            ec2 = boto3.client("ec2", region_name="us-west-2")

            def instances():
                return [i for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]]

            # the README's launch: the security group first, then `ray up`
            out["sg_rc"] = cluster_security_group.main(["cluster.yaml"])
            # standalone_mode=False: the click commands as `ray up ...` runs them, exceptions raised
            up.main(["cluster.yaml", "--yes", "--no-config-cache", "--disable-usage-stats"], standalone_mode=False)
            out["after_up"] = instances()
            out["groups"] = ec2.describe_security_groups()["SecurityGroups"]
            out["n_up"] = len(log.read_text().splitlines())
            ray_exec.main(["cluster.yaml", "cd ~/cts-ray && .venv/bin/cts-ray sweep tune_configs/quickstart.yaml "
                           "--address auto"], standalone_mode=False)
            out["n_exec"] = len(log.read_text().splitlines())
            down.main(["cluster.yaml", "--yes"], standalone_mode=False)
            out["after_down"] = instances()
    out["calls"] = [json.loads(line) for line in log.read_text().splitlines()]
    return out


def _prepared() -> dict:
    from ray.autoscaler._private.util import prepare_config
    return prepare_config(yaml.safe_load((REPO / "cluster.yaml").read_text()))


def test_ray_up_launches_the_head_and_sets_it_up(launched):
    cfg = _prepared()
    head_type = cfg["available_node_types"][cfg["head_node_type"]]["node_config"]
    [head] = launched["after_up"]
    assert head["State"]["Name"] == "running"
    assert head["InstanceType"] == head_type["InstanceType"] and head["ImageId"] == head_type["ImageId"]
    tags = {t["Key"]: t["Value"] for t in head["Tags"]}
    assert tags["ray-cluster-name"] == "cts-ray" and tags["ray-node-type"] == "head"
    assert tags["Name"] == "ray-cts-ray-head"
    assert tags["ray-user-node-type"] == cfg["head_node_type"] and tags["ray-node-status"] == "up-to-date"

    calls = launched["calls"][:launched["n_up"]]
    host = f"ubuntu@{head['PublicIpAddress']}"
    assert all(host in " ".join(c) for c in calls)
    # the checkout, without the local .venv and .git, to ~/cts-ray
    [sync] = [c for c in calls if c[0] == "rsync" and c[-1].endswith(":~/cts-ray/")]
    assert sync[-2] == "./"
    args = list(zip(sync, sync[1:]))
    for pattern in ("/.venv", "**/.git"):
        assert ("--exclude", pattern) in args, sync
    assert ("--filter", "dir-merge,- .gitignore") in args

    ssh = [_inner(c) for c in calls if c[0] == "ssh"]
    assert ssh[0] == "uptime"   # Ray's "is ssh up" probe
    # every setup command, then the head's, then the start commands, in order, nothing else
    run = [c for c in ssh if not c.startswith("mkdir -p ")][1:]
    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    setup = raw["setup_commands"] + raw["head_setup_commands"]
    assert run[:len(setup)] == setup
    starts = run[len(setup):]
    assert len(starts) == len(cfg["head_start_ray_commands"])
    for sent, cmd in zip(starts, cfg["head_start_ray_commands"]):
        assert sent.endswith(cmd)   # after the `export RAY_...;` Ray puts in front
    assert "export RAY_enable_autoscaler_v2=1;" in starts[1]
    assert "~/cts-ray/.venv/bin/ray start --head --port=6379" in starts[1]
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in starts[1]
    [mlflow] = [c for c in starts if "mlflow server" in c]
    assert "~/cts-ray/.venv/bin/mlflow server --host 127.0.0.1 --port 5000" in mlflow


def test_the_cluster_lets_in_only_its_owner(launched):
    """The launched head's security group: SSH only from the range on cluster.yaml's SET THIS line,
    every other port only from the group itself, nothing from 0.0.0.0/0 (which Ray alone adds)."""
    assert launched["sg_rc"] == 0
    [head] = launched["after_up"]
    [gid] = [g["GroupId"] for g in head["SecurityGroups"]]
    [group] = [g for g in launched["groups"] if g["GroupId"] == gid]
    assert group["GroupName"] == yaml.safe_load((REPO / "cluster.yaml").read_text())["provider"][
        "security_group"]["GroupName"]
    rules = sorted((p["IpProtocol"], p.get("FromPort"), p.get("ToPort"),
                    tuple(r["CidrIp"] for r in p["IpRanges"]) + tuple(r["CidrIpv6"] for r in p["Ipv6Ranges"]),
                    tuple(g["GroupId"] for g in p["UserIdGroupPairs"]), tuple(p["PrefixListIds"]))
                   for p in group["IpPermissions"])
    assert rules == [("-1", None, None, (), (gid,), ()), ("tcp", 22, 22, (SSH_FROM,), (), ())], rules
    assert "0.0.0.0/0" not in json.dumps(group["IpPermissions"]) and "::/0" not in json.dumps(group["IpPermissions"])


def test_security_group_tool_repairs_a_group_ray_opened(monkeypatch):
    """A group an earlier plain `ray up` made (Ray's rules: all from itself, SSH from 0.0.0.0/0):
    the tool leaves exactly the intra-group rule and SSH from the configured range, twice over."""
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(k, "testing")
    import boto3
    from moto import mock_aws

    from cts_ray import cluster_security_group
    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    cfg["provider"]["security_group"]["IpPermissions"][0]["IpRanges"] = [{"CidrIp": SSH_FROM}]
    with mock_aws():
        ec2 = boto3.client("ec2", region_name=cfg["provider"]["region"])
        vpc = cluster_security_group._ray_vpc(cfg)
        gid = ec2.create_security_group(GroupName=cfg["provider"]["security_group"]["GroupName"],
                                        Description="Ray's", VpcId=vpc)["GroupId"]
        ec2.authorize_security_group_ingress(GroupId=gid, IpPermissions=[
            {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": gid}]},
            {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
        for _ in range(2):
            assert cluster_security_group.ensure(cfg) == (gid, vpc)
            [group] = ec2.describe_security_groups(GroupIds=[gid])["SecurityGroups"]
            assert cluster_security_group._flatten(group["IpPermissions"]) == {
                ("-1", None, None, "UserIdGroupPairs", gid), ("tcp", 22, 22, "IpRanges", SSH_FROM)}


def test_ray_exec_reaches_the_head_and_ray_down_terminates_everything(launched):
    [head] = launched["after_up"]
    [sent] = launched["calls"][launched["n_up"]:launched["n_exec"]]
    assert f"ubuntu@{head['PublicIpAddress']}" in sent
    assert _inner(sent) == "cd ~/cts-ray && .venv/bin/cts-ray sweep tune_configs/quickstart.yaml --address auto"
    down = launched["calls"][launched["n_exec"]:]
    assert [_inner(c) for c in down] == ["ray stop"]
    assert launched["after_down"] and {i["State"]["Name"] for i in launched["after_down"]} == {"terminated"}


def test_ray_down_finds_the_venvs_ray(launched, tmp_path):
    """Replays, with bash, what ray up's setup sent and then `ray down`'s `ray stop`, in a home like
    the AMI's (its ~/.bashrc returns early for non-interactive shells; no `ray` on the PATH)."""
    home = tmp_path / "home"
    (home / "cts-ray" / ".venv" / "bin").mkdir(parents=True)
    ray = home / "cts-ray" / ".venv" / "bin" / "ray"
    ray.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'ray-calls'}\n")
    ray.chmod(0o755)
    (home / ".bashrc").write_text("case $- in *i*) ;; *) return;; esac\n")
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "TERM": "dumb"}
    assert shutil.which("ray", path=env["PATH"]) is None
    calls = launched["calls"]
    [stop] = [c for c in calls[launched["n_exec"]:] if c[0] == "ssh"]

    def on_head(argv):
        return subprocess.run(["bash", "-c", _remote(argv)], env=env, capture_output=True, text=True, timeout=60)

    assert on_head(stop).returncode != 0   # before setup: not found
    path_setup = [c for c in calls[:launched["n_up"]] if c[0] == "ssh" and ".bashrc" in _inner(c)]
    assert path_setup, "no setup command puts the venv's bin on the PATH"
    for argv in path_setup * 2:   # twice: a repeated `ray up` adds nothing more
        assert on_head(argv).returncode == 0
    assert (home / ".bashrc").read_text().count("cts-ray/.venv/bin") == 1
    p = on_head(stop)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "ray-calls").read_text().split() == ["stop"]


SWEEP_HALF_GPU = {"name": "frac", "base": str(REPO / "configs" / "digits.yaml"), "storage": "sweeps",
                  "set": {"training.epochs": 6, "training.milestones": [3], "resources.cpus": 1,
                          "resources.gpus": 0.5},
                  "grid": {"seed": [0, 1, 2, 3]}}


def _peak_concurrency(spans):
    """Most spans open at one instant (an end at the same instant as a start does not overlap it)."""
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans], key=lambda e: (e[0], e[1]))
    open_, peak = 0, 0
    for _, d in events:
        open_ += d
        peak = max(peak, open_)
    return peak


def test_peak_concurrency_counts_overlaps_only():
    assert _peak_concurrency([(0, 2), (1, 3)]) == 2
    assert _peak_concurrency([(0, 1), (1, 2)]) == 1
    assert _peak_concurrency([(0, 5), (1, 2), (3, 4)]) == 2
    assert _peak_concurrency([(0, 5), (1, 4), (2, 3)]) == 3


def test_autoscaler_adds_gpu_workers_for_half_gpu_trials_and_removes_them(tmp_path):
    """A fake multi-node cluster from cluster.yaml's node types (tests/fake_cluster.py) runs a real
    `cts-ray sweep --address` whose four trials each ask for half a GPU; only the head (no GPU)
    exists at the start."""
    assert os.geteuid() == 0 and shutil.which("unshare"), \
        "this test needs root and util-linux's unshare (new network/PID/mount namespaces); CI runs as root"
    sweep = tmp_path / "frac.yaml"
    sweep.write_text(yaml.safe_dump(SWEEP_HALF_GPU))
    out = tmp_path / "cluster"
    p = subprocess.run([sys.executable, str(REPO / "tests" / "fake_cluster.py"), str(out), str(sweep)],
                       capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    import ray.autoscaler._private.fake_multi_node as fake
    assert not (Path(fake.__file__).parent / "example.yaml").exists()   # seen only inside the namespace
    events = json.loads((out / "events.json").read_text())
    assert events["sweep_rc"] == 0, (out / "sweep.log").read_text()[-3000:]

    config = yaml.safe_load((out / "fake_cluster.yaml").read_text())
    gpu_types = {n for n, t in config["available_node_types"].items() if t["resources"].get("GPU", 0) >= 1}
    samples = [json.loads(line) for line in (out / "timeline.jsonl").read_text().splitlines()]
    status = [s for s in samples if "status" in s]
    first = status[0]["status"]
    assert [n["ray_node_type_name"] for n in first["active_nodes"] + first["idle_nodes"]] == ["ray.head.default"]
    # the autoscaler asked for GPU workers while trials waited, and they came up
    launches = [s["t"] for s in status if any(p["ray_node_type_name"] in gpu_types
                                              for p in s["status"]["pending_launches"])]
    assert launches, "the autoscaler never launched a GPU worker"
    workers = {}
    for s in status:
        for n in s["status"]["active_nodes"] + s["status"]["idle_nodes"]:
            if n["ray_node_type_name"] in gpu_types:
                workers.setdefault(n["node_id"], s["t"])
    assert len(workers) == config["max_workers"] == 2   # 4 trials x 0.5 GPU: two one-GPU workers

    trials = tables.read(out / "sweeps" / "frac", "trials").to_pylist()
    # every trial's rows, exactly once
    assert sorted(t["seed"] for t in trials) == [0, 1, 2, 3] and {t["status"] for t in trials} == {"finished"}
    epochs = tables.read(out / "sweeps" / "frac", "epochs").to_pylist()
    assert len({(r["trial_id"], r["phase"], r["epoch"], r["round"]) for r in epochs}) == len(epochs)
    assert {r["trial_id"] for r in epochs} == {t["trial_id"] for t in trials}
    # ran on the autoscaled workers (never the head); a one-GPU node held two half-GPU trials at once
    # and never more. Which later trial pairs with which depends on when the second worker joins.
    assert {t["node_id"] for t in trials} <= set(workers)
    assert {json.loads(t["config"])["resources"]["gpus"] for t in trials} == {0.5}
    peak = {n: _peak_concurrency([(t["started_at"], t["ended_at"]) for t in trials if t["node_id"] == n])
            for n in {t["node_id"] for t in trials}}
    assert max(peak.values()) == 2 and all(v <= 2 for v in peak.values()), peak
    # idle workers removed
    assert "scaled_down" in events, "the idle GPU workers were not removed"
    assert status[-1]["phase"] == "end"
    end = status[-1]["status"]
    assert [n["ray_node_type_name"] for n in end["active_nodes"] + end["idle_nodes"]] == ["ray.head.default"]
    assert "ray.head.default" in (out / "status_end.txt").read_text()
    print(f"\nautoscaling timeline (s): head up {events['head_up']:.1f}, first GPU launch requested "
          f"{launches[0]:.1f}, workers up {sorted(round(v, 1) for v in workers.values())}, sweep "
          f"{events['sweep_start']:.1f}-{events['sweep_end']:.1f}, scaled down {events['scaled_down']:.1f}; trials "
          + ", ".join(f"{t['node_id'][-2:]}:{t['started_at'] - events['t0']:.1f}-{t['ended_at'] - events['t0']:.1f}"
                      for t in sorted(trials, key=lambda t: t["started_at"])))


# One trial (a second costs ~45 s here: its start-up and two more node launches, and shows nothing
# new) of 2 workers with a (logical) GPU each: dense to the search point (1 epoch), 4 search epochs,
# 7 of retraining; gloo on the CPU beside the reserved GPU (the fake nodes have no CUDA)
SWEEP_TWO_WORKERS = {"name": "two", "base": str(REPO / "configs" / "digits.yaml"), "storage": "sweeps",
                     "set": {"training.epochs": 8, "training.milestones": [6], "training.dense_baseline": False,
                             "search.density": 0.2, "resources.workers": 2, "resources.gpus": 1,
                             "resources.cpus": 1, "resources.device": "cpu"}}
EPOCHS = 1 + 4 + 7


def test_a_two_worker_trial_spans_two_gpu_nodes_and_survives_losing_one(tmp_path):
    """A trial of 2 Ray Train workers with a GPU each on the fake autoscaling cluster: the autoscaler
    launches two GPU nodes and the trial's workers run on both. Once it has saved an epoch, one of
    its nodes is killed outright (tests/fake_cluster.py --kill-node, a reclaimed spot instance): the
    autoscaler replaces it, Ray Train restarts the group, the trial goes on from its last saved
    epoch, and the tables hold every epoch exactly once."""
    assert os.geteuid() == 0 and shutil.which("unshare"), \
        "this test needs root and util-linux's unshare (new network/PID/mount namespaces); CI runs as root"
    sweep = tmp_path / "two.yaml"
    sweep.write_text(yaml.safe_dump(SWEEP_TWO_WORKERS))
    out = tmp_path / "cluster"
    p = subprocess.run([sys.executable, str(REPO / "tests" / "fake_cluster.py"), str(out), str(sweep), "--kill-node"],
                       capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:] + (out / "sweep.log").read_text()[-3000:]
    events = json.loads((out / "events.json").read_text())
    assert events["sweep_rc"] == 0 and "kill" in events, (out / "sweep.log").read_text()[-3000:]

    samples = [json.loads(line) for line in (out / "timeline.jsonl").read_text().splitlines()]
    status = [s for s in samples if "status" in s]
    [head] = [n["node_id"] for n in status[0]["status"]["active_nodes"] + status[0]["status"]["idle_nodes"]]
    launches = [s["t"] for s in status if s["status"]["pending_launches"]]
    gpu = {}   # GPU node id: when first seen up
    for s in status:
        for n in s["status"]["active_nodes"] + s["status"]["idle_nodes"]:
            if n["ray_node_type_name"] == "ray.worker.gpu":
                gpu.setdefault(n["node_id"], s["t"])
    # before the kill: the workers on two GPU nodes (never the head); then one in the lost one's place
    before, killed = events["train_worker_nodes"], events["killed_node"]
    assert len(before) == 2 and set(before) <= set(gpu) and killed in before, (before, gpu)
    [replacement] = [n for n, t in gpu.items() if t > events["kill"]]
    assert len(gpu) == 3, gpu

    root = out / "sweeps" / "two"
    [row] = tables.read(root, "trials").to_pylist()
    assert row["status"] == "finished", row["error"]
    # the restarted group, which wrote the row: the survivor and the replacement (rank 0's is node_id)
    after = json.loads(row["worker_node_ids"])
    assert sorted(after) == sorted({*before, replacement} - {killed}) and row["node_id"] == after[0], (after, killed)
    assert head not in after
    keys = [(r["trial_id"], r["phase"], r["epoch"], r["round"]) for r in tables.read(root, "epochs").to_pylist()]
    assert len(keys) == len(set(keys)) == EPOCHS   # every epoch once: none lost, none twice
    # the new group went on from the saved epoch: it reported that epoch again, never the dense one
    results = [json.loads(line) for line in next((root / "tune").glob("*/result.json")).read_text().splitlines()]
    steps = [r["step"] for r in results]
    again = [s for s in steps if steps.count(s) > 1]
    assert again and min(again) > 1, steps
    resumed = next(r for r in results if r["step"] == min(again))
    print(f"\nnode-loss timeline (s): head up {events['head_up']:.1f}, sweep start {events['sweep_start']:.1f}, GPU "
          f"launch requested {launches[0]:.1f}, GPU nodes up {sorted(round(gpu[n], 1) for n in before)}, kill "
          f"{events['kill']:.1f} (node ..{killed[-2:]}, {events['killed_processes']} processes), replacement "
          f"..{replacement[-2:]} up {gpu[replacement]:.1f}, trial resumed at {resumed['phase']} epoch "
          f"{resumed.get('epoch')} (step {resumed['step']}), trial {row['started_at'] - events['t0']:.1f}-"
          f"{row['ended_at'] - events['t0']:.1f}, sweep end {events['sweep_end']:.1f}, scaled down "
          f"{events.get('scaled_down', float('nan')):.1f}")


def test_storage_uri_is_refused_in_one_line(tmp_path):
    """The README's cluster sweep with `--set storage=s3://...`: refused before Ray starts, and no
    local folder named 's3:' appears."""
    for uri in ("s3://bucket/cts-ray", "gs://bucket/x", "file:///tmp/x"):
        p = subprocess.run([str(BIN / "cts-ray"), "sweep", str(REPO / "tune_configs" / "quickstart.yaml"),
                            "--set", f"storage={uri}"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1, p.stderr
        assert lines[0].startswith(f"cts-ray: error: storage: '{uri}' is a URI; a sweep needs a folder every node "
                                   "sees"), lines[0]
        assert "EFS or NFS" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_address_of_a_cluster_with_token_auth(tmp_path, tmp_path_factory):
    """A head with token authentication on. `cts-ray sweep --address HOST:PORT` with the token in
    ~/.ray/auth_token: without RAY_AUTH_MODE, one line saying what to set; with it, the sweep runs."""
    home, temp, port = tmp_path / "home", tmp_path_factory.mktemp("tokray"), _free_port()   # short: socket paths
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("cts0ray0test0token0" * 2)
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    base.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0")
    _ray_start(["--head", f"--port={port}", "--num-cpus=1", f"--temp-dir={temp}", "--node-ip-address=127.0.0.1",
                "--include-dashboard=false", "--disable-usage-stats"], {**base, "RAY_AUTH_MODE": "token"})
    try:
        sweep = tmp_path / "tok.yaml"
        sweep.write_text(yaml.safe_dump({"name": "tok", "base": str(REPO / "configs" / "digits.yaml"),
                                         "storage": str(tmp_path / "sweeps"),
                                         "set": {"training.epochs": 1, "training.milestones": [],
                                                 "search.method": "random", "resources.cpus": 1}}))
        cmd = [str(BIN / "cts-ray"), "sweep", str(sweep), "--address", f"127.0.0.1:{port}", "--quiet"]
        # Ray's driver retries the refused connection for ~20 s; 2 tries suffice here
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                           env={**base, "RAY_gcs_server_port_wait_time_s": "2"})
        assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-3000:]
        last = p.stderr.strip().splitlines()[-1]
        assert last.startswith(f"cts-ray: error: --address 127.0.0.1:{port}: the cluster has token authentication "
                               "on") and "set RAY_AUTH_MODE=token" in last, p.stderr[-3000:]
        assert "Traceback" not in p.stderr

        p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                           env={**base, "RAY_AUTH_MODE": "token"})
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        [row] = tables.read(tmp_path / "sweeps" / "tok", "trials").to_pylist()
        assert row["status"] == "finished"
    finally:
        _stop_cluster(temp)
