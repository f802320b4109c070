"""The `ray up` cluster file (cluster.yaml) is valid and does what the README promises.

Validation is what `ray up` runs first (ray.autoscaler._private.commands._bootstrap_config):
``prepare_config`` (merges Ray's bundled AWS defaults.yaml, merges setup commands, fills
per-node-type worker counts), then ``validate_config`` (Ray's JSON schema plus its own checks).
Both run offline: for AWS, ``prepare_config`` only reads ray/autoscaler/aws/defaults.yaml.
Between the two, `ray up` also imports the AWS node provider (boto3) and asks EC2 to fill
node-type resources that are left out; cluster.yaml sets every node type's resources, so that
cloud step has nothing to do and is simply not run here. Nothing is mocked; no network, no
boto3, no cloud account.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parent.parent / "cluster.yaml"


def _load() -> dict:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


def _validate(cfg: dict) -> dict:
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def raw() -> dict:
    return _load()


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    return _validate(raw)


def test_cluster_yaml_passes_ray_up_validation(prepared):
    assert prepared["cluster_name"] == "cts-ray"
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_unknown_top_level_key_is_rejected(raw):
    cfg = copy.deepcopy(raw)
    cfg["bogus_key"] = 1
    with pytest.raises(jsonschema.ValidationError, match="bogus_key"):
        _validate(cfg)


def test_unknown_node_type_key_is_rejected(raw):
    cfg = copy.deepcopy(raw)
    worker = next(n for n in cfg["available_node_types"] if n != cfg["head_node_type"])
    cfg["available_node_types"][worker]["bogus_node_key"] = 1
    with pytest.raises(jsonschema.ValidationError, match="bogus_node_key"):
        _validate(cfg)


def test_node_types_gpu_workers_and_disk(raw, prepared):
    types = raw["available_node_types"]
    head = raw["head_node_type"]
    assert types[head]["resources"].get("GPU", 0) == 0
    workers = [n for n in types if n != head]
    assert workers and all(types[n]["resources"].get("GPU", 0) >= 1 for n in workers)
    assert all(types[n].get("min_workers", 0) == 0 for n in workers)  # autoscale from zero
    for name, node in types.items():
        nc = node["node_config"]
        assert re.fullmatch(r"ami-[0-9a-f]{8,17}", nc["ImageId"]), name
        sizes = [m["Ebs"]["VolumeSize"] for m in nc["BlockDeviceMappings"]]
        assert max(sizes) >= 100, name  # the CUDA torch .venv alone is ~7 GB
    assert prepared["max_workers"] >= max(prepared["available_node_types"][n]["max_workers"] for n in workers)


def test_checkout_is_synced_without_local_venv(raw):
    assert raw["file_mounts"] == {"~/cts-ray": "."}
    # A copied local .venv would be the wrong platform and would satisfy make's stamp.
    assert ".gitignore" in raw.get("rsync_filter", [])
    assert any(".venv" in p for p in raw.get("rsync_exclude", []))
    assert ".venv/" in (CLUSTER_YAML.parent / ".gitignore").read_text().splitlines()


def _setup_for(prepared: dict, node_type: str) -> list[str]:
    """The setup commands `ray up` / the autoscaler run on a node of this type."""
    if node_type == prepared["head_node_type"]:
        return prepared["head_setup_commands"]
    node = prepared["available_node_types"][node_type]
    return node.get("worker_setup_commands", prepared["worker_setup_commands"])


def test_every_node_installs_the_project_like_the_readme(prepared):
    for name in prepared["available_node_types"]:
        cmds = _setup_for(prepared, name)
        assert any(re.search(r"cd ~/cts-ray && make setup\b", c) for c in cmds), name
        # Shared storage is mounted before anything writes results.
        assert any("/mnt/efs" in c and "mount" in c for c in cmds), name


def test_ray_is_started_from_the_project_venv(prepared):
    head = " ; ".join(prepared["head_start_ray_commands"])
    worker = " ; ".join(prepared["worker_start_ray_commands"])
    assert "~/cts-ray/.venv/bin/ray start --head" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--dashboard-host=127.0.0.1" in head
    assert "~/cts-ray/.venv/bin/ray start --address=$RAY_HEAD_IP:6379" in worker


def test_head_starts_mlflow_on_loopback(prepared):
    mlflow = [c for c in prepared["head_start_ray_commands"] if "mlflow server" in c]
    assert len(mlflow) == 1
    cmd = mlflow[0]
    assert "~/cts-ray/.venv/bin/mlflow server" in cmd
    assert re.search(r"--host[ =]127\.0\.0\.1\b", cmd)
    assert "0.0.0.0" not in cmd
    assert "sqlite:////mnt/efs/cts-ray/mlflow.db" in cmd
    assert not any("mlflow server" in c for c in prepared["worker_start_ray_commands"])


def test_no_secrets_in_cluster_yaml():
    text = CLUSTER_YAML.read_text()
    secret = re.compile(r"aws_secret|secret_access_key|password|token\s*[:=]", re.IGNORECASE)
    for lineno, line in enumerate(text.splitlines(), 1):
        assert not secret.search(line), f"cluster.yaml:{lineno}: {line.strip()}"
        assert not re.search(r"AKIA[0-9A-Z]{16}", line), f"cluster.yaml:{lineno}"
    cfg = _load()
    assert "ssh_private_key" not in cfg.get("auth", {})
    for node in cfg["available_node_types"].values():
        assert "KeyName" not in node["node_config"]


def test_ssh_is_restricted_on_one_marked_line(raw):
    """SSH (22) only from the range on the `SET THIS` line; its placeholder is no address range."""
    [line] = [ln for ln in CLUSTER_YAML.read_text().splitlines() if "SET THIS:" in ln and "CidrIp" in ln]
    sg = raw["provider"]["security_group"]
    [rule] = sg["IpPermissions"]
    assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22)
    [cidr] = [r["CidrIp"] for r in rule["IpRanges"]]
    assert cidr in line and "0.0.0.0" not in yaml.safe_dump(raw)


@pytest.mark.parametrize("source, says", [(None, "is not an address range"),
                                          ({"IpRanges": [{"CidrIp": "0.0.0.0/0"}]}, "the whole internet"),
                                          ({"Ipv6Ranges": [{"CidrIpv6": "::/0"}]}, "the whole internet")])
def test_security_group_tool_refuses_placeholder_and_world_in_one_line(raw, tmp_path, capsys, source, says):
    """Refused before any AWS call (no credentials here): exit 2 and one line naming the SET THIS line."""
    from cts_ray import cluster_security_group
    cfg = copy.deepcopy(raw)
    if source is not None:
        [rule] = cfg["provider"]["security_group"]["IpPermissions"]
        del rule["IpRanges"]
        rule.update(source)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cluster_security_group.main([str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0] and "'SET THIS' line" in err[0], err
