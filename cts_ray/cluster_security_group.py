"""The cluster's security group, made before `ray up` so that SSH is open only to its owner.

Ray's AWS launcher (2.60) fills rules only into a group it has just created, and then always adds
SSH (22) from every address (a /0 range) next to `provider.security_group.IpPermissions`; a group that already has
rules it uses as it is. So this creates (or repairs) the group named in cluster.yaml, in the VPC
`ray up` will pick, with exactly: all traffic from the group itself (Ray's intra-cluster rule) and
the `IpPermissions` of cluster.yaml (SSH from the range on its `SET THIS` line). Run from the
checkout's root, in the environment that runs `ray up` (Ray and boto3; no torch):

    python -m cts_ray.cluster_security_group cluster.yaml && ray up cluster.yaml
"""
from __future__ import annotations

import copy
import ipaddress
import sys
from typing import Any

import yaml

from cts_ray.errors import EXIT_BAD_INPUT, EXIT_FAILED, ConfigError

# A rule as a hashable tuple: (protocol, from port, to port, source kind, source), one per source.
Rule = tuple[str, Any, Any, str, str]
_SOURCES = {"IpRanges": "CidrIp", "Ipv6Ranges": "CidrIpv6", "UserIdGroupPairs": "GroupId",
            "PrefixListIds": "PrefixListId"}


def _check_ranges(perms: list[dict]) -> None:
    """Every address range must be a real network narrower than the whole internet."""
    ranges = [r[key] for p in perms for kind, key in (("IpRanges", "CidrIp"), ("Ipv6Ranges", "CidrIpv6"))
              for r in p.get(kind, [])]
    if not ranges:
        raise ConfigError("provider.security_group.IpPermissions: no address range; set the SSH rule's "
                          "CidrIp on the 'SET THIS' line to the range you ssh from (e.g. 203.0.113.7/32)")
    for cidr in ranges:
        try:
            net = ipaddress.ip_network(str(cidr), strict=False)
        except ValueError:
            raise ConfigError(f"provider.security_group: CidrIp {cidr!r} is not an address range; set the "
                              "'SET THIS' line to the range you ssh from (e.g. 203.0.113.7/32: "
                              "your IP from https://checkip.amazonaws.com)") from None
        if net.prefixlen == 0:
            raise ConfigError(f"provider.security_group: CidrIp {cidr!r} is the whole internet; set the "
                              "'SET THIS' line to the range you ssh from (e.g. 203.0.113.7/32)")


def _flatten(perms: list[dict]) -> set[Rule]:
    rules = set()
    for p in perms:
        ports = (None, None) if str(p["IpProtocol"]) == "-1" else (p.get("FromPort"), p.get("ToPort"))
        for kind, key in _SOURCES.items():
            rules |= {(str(p["IpProtocol"]), *ports, kind, s[key]) for s in p.get(kind, [])}
    return rules


def _permission(rule: Rule) -> dict:
    proto, lo, hi, kind, source = rule
    perm: dict = {"IpProtocol": proto, kind: [{_SOURCES[kind]: source}]}
    return perm if lo is None else {**perm, "FromPort": lo, "ToPort": hi}


def _ray_vpc(cfg: dict) -> str:
    """The VPC `ray up` will put the nodes in: Ray's own subnet choice, run on a copy."""
    from ray.autoscaler._private.aws.config import _configure_subnet, _resource
    chosen = _configure_subnet(copy.deepcopy(cfg))
    subnet = chosen["available_node_types"][cfg["head_node_type"]]["node_config"]["SubnetIds"][0]
    return _resource("ec2", cfg).Subnet(subnet).vpc_id


def _group_id(ec2, cfg: dict, name: str, vpc: str) -> str:
    found = ec2.describe_security_groups(Filters=[{"Name": "vpc-id", "Values": [vpc]},
                                                  {"Name": "group-name", "Values": [name]}])["SecurityGroups"]
    if found:
        return found[0]["GroupId"]
    tags = [{"Key": "ray-autoscaler", "Value": "true"}, {"Key": "ray-cluster-name", "Value": cfg["cluster_name"]}]
    return ec2.create_security_group(
        GroupName=name, VpcId=vpc, Description=f"Ray cluster {cfg['cluster_name']}: SSH from its owner only",
        TagSpecifications=[{"ResourceType": "security-group", "Tags": tags}])["GroupId"]


def ensure(cfg: dict) -> tuple[str, str]:
    """Create or repair the group: exactly the intra-group rule and cluster.yaml's rules. Returns
    (group id, VPC id)."""
    import boto3
    sg = cfg["provider"].get("security_group") or {}
    perms = sg.get("IpPermissions") or []
    _check_ranges(perms)
    name = sg.get("GroupName") or f"ray-autoscaler-{cfg['cluster_name']}"
    ec2 = boto3.client("ec2", region_name=cfg["provider"]["region"])
    vpc = _ray_vpc(cfg)
    gid = _group_id(ec2, cfg, name, vpc)
    want = _flatten([{"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": gid}]}, *perms])
    [group] = ec2.describe_security_groups(GroupIds=[gid])["SecurityGroups"]
    have = _flatten(group["IpPermissions"])
    if have - want:   # e.g. SSH from every address, which Ray added to a group it made
        ec2.revoke_security_group_ingress(GroupId=gid, IpPermissions=[_permission(r) for r in sorted(have - want)])
    if want - have:
        ec2.authorize_security_group_ingress(GroupId=gid, IpPermissions=[_permission(r) for r in sorted(want - have)])
    return gid, vpc


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = args[0] if args else "cluster.yaml"
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
        gid, vpc = ensure(cfg)
    except ConfigError as e:
        print(f"{path}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:   # boto3/botocore: credentials, permissions, the network
        print(f"{path}: error: the security group could not be made: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED
    ranges = ", ".join(sorted(r[4] for r in _flatten(cfg["provider"]["security_group"]["IpPermissions"])))
    print(f"security group {gid} in {vpc}: {ranges} as cluster.yaml says; everything else only from within "
          "the group. Now: ray up " + path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
