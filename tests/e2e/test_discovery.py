"""AWS discovery against a moto server on loopback: MSK clusters found by tag (ListClustersV2,
DescribeClusterV2 from moto; GetBootstrapBrokers, which moto lacks, from the MskFront relay in
conftest.py), answered by the real daemon, kept when AWS goes away, restored from the snapshot."""
import json
import os
import subprocess

import boto3
import dns.rcode
import pytest

from conftest import BIN, MskFront, Moto, wait_for
from test_dns import addresses, ask

REGION = "us-east-1"


class Msk:
    """moto's MSK API, with the bootstrap names the front answers for each cluster."""

    def __init__(self, moto):
        self.front = MskFront(moto)
        self.api = boto3.client(
            "kafka", region_name=REGION, endpoint_url=moto.url, aws_access_key_id="test", aws_secret_access_key="test"
        )

    def serverless(self, name, cluster_id, tags):
        arn = self.api.create_cluster_v2(
            ClusterName=name,
            Serverless={"VpcConfigs": [{"SubnetIds": ["subnet-0a1b2c3d"]}]},
            Tags=tags,
        )["ClusterArn"]
        boot = f"boot-{cluster_id}.c1.kafka-serverless.{REGION}.amazonaws.com"
        self.front.bootstrap[arn] = f"{boot}:9098"
        return arn, boot

    def provisioned(self, name, cluster_id, tags):
        arn = self.api.create_cluster_v2(
            ClusterName=name,
            Provisioned={
                "BrokerNodeGroupInfo": {"InstanceType": "kafka.m5.large", "ClientSubnets": ["subnet-0a1b2c3d"]},
                "KafkaVersion": "3.6.0",
                "NumberOfBrokerNodes": 2,
            },
            Tags=tags,
        )["ClusterArn"]
        brokers = [f"b-{n}.{name}.{cluster_id}.c2.kafka.{REGION}.amazonaws.com" for n in (1, 2)]
        self.front.bootstrap[arn] = ",".join(f"{b}:9094" for b in brokers)
        return arn, brokers[0]


def config(tmp_path, extra="", state=True):
    text = f"""
[dns]
listen = ["127.0.0.1:0"]
upstreams = ["127.0.0.1:9"]
unknown_clusters = "nxdomain"

[admin]
listen = "127.0.0.1:0"

[reload]
poll_secs = 0

[discovery.aws]
regions = ["{REGION}"]
refresh_secs = 1
jitter = 0.0
max_backoff_secs = 1
default_target = "addresses=10.9.9.9"
ttl = 30
"""
    if state:
        text += f'state_dir = "{tmp_path / "state"}"\n'
    return text + extra


TAGGED = {"mskdns": "serve"}


def test_tagged_clusters_are_found_and_answered(daemon, moto, tmp_path):
    msk = Msk(moto)
    _, orders = msk.serverless("orders", "a1b2c3d4", {**TAGGED, "mskdns:target": "addresses=10.1.0.10 10.1.1.10"})
    _, payments = msk.serverless("payments", "e5f6a7b8", TAGGED)
    _, audit = msk.serverless("audit", "0c0d0e0f", {"team": "audit"})
    _, ledger = msk.provisioned("ledger", "lx12ab", {**TAGGED, "mskdns:target": "addresses=10.4.4.4"})
    # The file names the ledger cluster itself: explicit entries win over discovered ones.
    d = daemon(
        config(tmp_path, f'\n[[clusters]]\nbootstrap = "{ledger}"\naddresses = ["10.5.5.5"]\n'),
        env=msk.front.env,
    )
    assert wait_for(lambda: addresses(ask(d, orders)) == ["10.1.0.10", "10.1.1.10"], timeout=10)
    # A dynamic broker of the same cluster, in another case: the same cluster key.
    r = ask(d, orders.replace("boot-", "B0037-").upper())
    assert addresses(r) == ["10.1.0.10", "10.1.1.10"]
    assert r.answer[0].ttl == 30
    # No target tag: the configured default target.
    assert addresses(ask(d, payments)) == ["10.9.9.9"]
    # Not tagged: not served (unknown MSK clusters get NXDOMAIN in this config).
    assert ask(d, audit).rcode() == dns.rcode.NXDOMAIN
    assert addresses(ask(d, ledger.replace("b-1.", "b-2.", 1))) == ["10.5.5.5"]
    assert d.metric("mskdns_clusters", source="discovery") == 3
    # Bootstrap names never change for a cluster: asked once each, not on every refresh.
    assert wait_for(lambda: d.metric("mskdns_discovery_refreshes_total", result="ok") >= 3, timeout=10)
    asked = [p for m, p in msk.front.calls if p.endswith("/bootstrap-brokers")]
    assert sorted(asked) == sorted(set(asked)), asked

    # A cluster added in AWS is answered within one refresh.
    arn_events, events = msk.serverless("events", "99aa88bb", {**TAGGED, "mskdns:target": "addresses=10.7.0.1"})
    assert ask(d, events).rcode() == dns.rcode.NXDOMAIN
    assert wait_for(lambda: addresses(ask(d, events)) == ["10.7.0.1"], timeout=5)

    # Untagging it removes it at once (the operator's decision: no grace period).
    msk.api.untag_resource(ResourceArn=arn_events, TagKeys=["mskdns"])
    assert wait_for(lambda: ask(d, events).rcode() == dns.rcode.NXDOMAIN, timeout=5)
    status, body = d.http("/readyz")
    assert (status, body) == (200, "ready\n")


def test_aws_unreachable_keeps_answers_and_a_restart_answers_from_the_snapshot(daemon, moto, tmp_path):
    msk = Msk(moto)
    _, orders = msk.serverless("orders", "a1b2c3d4", {**TAGGED, "mskdns:target": "addresses=10.1.0.10"})
    text = config(tmp_path)
    d = daemon(text, env=msk.front.env)
    assert wait_for(lambda: addresses(ask(d, orders)) == ["10.1.0.10"], timeout=10)
    assert (tmp_path / "state" / "discovery-aws.json").exists()

    # AWS goes away mid-run: the answers stay, /readyz says degraded and why, errors are counted.
    moto.stop()
    msk.front.stop()
    assert wait_for(lambda: "degraded" in d.http("/readyz")[1], timeout=10), d.http("/readyz")
    status, body = d.http("/readyz")
    assert status == 200 and "discovery.aws" in body and "ListClustersV2" in body, body
    errors = d.metric("mskdns_discovery_api_errors_total", operation="ListClustersV2")
    assert errors >= 1
    assert wait_for(lambda: d.metric("mskdns_discovery_api_errors_total", operation="ListClustersV2") > errors, 10)
    assert addresses(ask(d, orders)) == ["10.1.0.10"]
    d.stop()

    # Restarted with AWS still down: answered from the snapshot, from the first query.
    d2 = daemon(text, env=msk.front.env, name="second.toml")
    assert addresses(ask(d2, orders)) == ["10.1.0.10"]
    d2.stop()

    # A corrupt snapshot is reported and ignored; discovery proceeds against a new moto.
    (tmp_path / "state" / "discovery-aws.json").write_text('{"version": 1, "clusters": [{"arn": ')
    (tmp_path / "second-moto").mkdir()
    moto2 = Moto(tmp_path / "second-moto")
    try:
        msk2 = Msk(moto2)
        _, payments = msk2.serverless("payments", "e5f6a7b8", TAGGED)
        d3 = daemon(text, env=msk2.front.env, name="third.toml")
        assert ask(d3, orders).rcode() == dns.rcode.NXDOMAIN
        status, body = d3.http("/readyz")
        assert "snapshot unreadable" in body, body
        assert d3.metric("mskdns_discovery_snapshot_errors_total") == 1
        assert wait_for(lambda: addresses(ask(d3, payments)) == ["10.9.9.9"], timeout=10)
        # The next good refresh rewrites the snapshot, and /readyz is clean again.
        assert wait_for(lambda: d3.http("/readyz") == (200, "ready\n"), timeout=10), d3.http("/readyz")
        saved = json.loads((tmp_path / "state" / "discovery-aws.json").read_text())
        assert [c["bootstrap"] for c in saved["clusters"]] == [payments]
        msk2.front.stop()
    finally:
        moto2.stop()


def test_discover_json_prints_what_would_be_served(moto, tmp_path):
    msk = Msk(moto)
    arn_orders, orders = msk.serverless("orders", "a1b2c3d4", {**TAGGED, "mskdns:target": "vpce-0123456789abcdef0"})
    arn_audit, _ = msk.serverless("audit", "0c0d0e0f", {})
    arn_ledger, ledger = msk.provisioned("ledger", "lx12ab", TAGGED)
    path = tmp_path / "mskdns.toml"
    path.write_text(config(tmp_path, f'\n[[clusters]]\nbootstrap = "{ledger}"\naddresses = ["10.5.5.5"]\n'))
    out = subprocess.run(
        [str(BIN), "--config", str(path), "discover", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **msk.front.env},
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    rows = {c["arn"]: c for c in report["clusters"]}
    assert set(rows) == {arn_orders, arn_ledger}
    o = rows[arn_orders]
    assert (o["name"], o["kind"], o["bootstrap"], o["region"]) == ("orders", "serverless", orders, REGION)
    assert (o["target"], o["target_from"], o["status"]) == ("vpce-0123456789abcdef0", "tag mskdns:target", "served")
    assert o["account"] == arn_orders.split(":")[4]
    l = rows[arn_ledger]
    assert (l["kind"], l["bootstrap"], l["target"]) == ("provisioned", ledger, "addresses=10.9.9.9")
    assert l["status"] == "overridden by clusters[0]"
    assert [(s["arn"], s["reason"]) for s in report["skipped"]] == [(arn_audit, "not tagged mskdns")]
    assert report["errors"] == []
    # It changes nothing: no snapshot written.
    assert not (tmp_path / "state").exists()

    # The table form, and a failing AWS: exit status 1 with the reason on stderr.
    moto.stop()
    msk.front.stop()
    out = subprocess.run(
        [str(BIN), "--config", str(path), "discover"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **msk.front.env},
    )
    assert out.returncode == 1
    assert "ListClustersV2 failed" in out.stderr


def test_an_account_reached_through_an_assumed_role(daemon, moto, tmp_path):
    msk = Msk(moto)
    _, orders = msk.serverless("orders", "a1b2c3d4", TAGGED)
    role = "arn:aws:iam::123456789012:role/mskdns-discovery"
    extra = f'\n[[discovery.aws.accounts]]\nrole_arn = "{role}"\nexternal_id = "mskdns-test"\ndefault_target = "addresses=10.6.6.6"\n'
    d = daemon(config(tmp_path, extra), env=msk.front.env)
    # STS AssumeRole (moto) gave the credentials the MSK calls were signed with.
    assert wait_for(lambda: addresses(ask(d, orders)) == ["10.6.6.6"], timeout=10)
    saved = json.loads((tmp_path / "state" / "discovery-aws.json").read_text())
    assert [(c["scope"], c["target_from"]) for c in saved["clusters"]] == [
        ("accounts[0]", "discovery.aws.accounts[0].default_target")
    ]
    signed = [a for m, a in msk.front.auth if a]
    assert signed and all("Credential=test/" not in a for a in signed), signed[:2]


def test_msk_and_ec2_endpoints_that_stall_are_cut_off_and_answers_kept(daemon, moto, tmp_path):
    """MSK and EC2 endpoints that take calls and never answer (a proxy on the way that hangs):
    each call is cut off within the SDK timeouts set for it (10 s without a byte, 60 s in all),
    counted as a timeout, named on /readyz, while the daemon answers from what it knew; discovery
    goes on when the endpoints answer again; a SIGTERM while calls hang ends the daemon at once."""
    msk = Msk(moto)
    ec2 = moto.ec2
    vpc = ec2.create_vpc(CidrBlock="10.41.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.41.1.0/24", AvailabilityZone="us-east-1a")["Subnet"]["SubnetId"]
    vpce = ec2.create_vpc_endpoint(VpcId=vpc, ServiceName="com.amazonaws.vpce.us-east-1.vpce-svc-0stall",
                                   VpcEndpointType="Interface", SubnetIds=[subnet])["VpcEndpoint"]
    eni = vpce["NetworkInterfaceIds"][0]
    ip = ec2.describe_network_interfaces(NetworkInterfaceIds=[eni])["NetworkInterfaces"][0]["PrivateIpAddress"]
    _, orders = msk.serverless("orders", "a1b2c3d4", {**TAGGED, "mskdns:target": "addresses=10.1.0.10"})
    _, payments = msk.serverless("payments", "e5f6a7b8", {**TAGGED, "mskdns:target": vpce["VpcEndpointId"]})
    env = {**msk.front.env, "AWS_ENDPOINT_URL": msk.front.url}  # EC2 through the front too
    d = daemon(config(tmp_path, "\n[aws]\nrefresh_secs = 1\n"), env=env)
    try:
        assert wait_for(lambda: addresses(ask(d, payments)) == [ip], timeout=15)
        assert addresses(ask(d, orders)) == ["10.1.0.10"]

        msk.front.stall = {"kafka", "ec2"}
        timeouts = lambda: d.metric("mskdns_discovery_api_errors_total", kind="timeout")
        assert wait_for(lambda: timeouts() >= 1 and d.metric("mskdns_ec2_errors_total") >= 1, timeout=75), \
            d.log_text()[-3000:]
        status, body = d.http("/readyz")
        assert status == 200 and "degraded" in body and "timeout" in body, body
        assert addresses(ask(d, orders)) == ["10.1.0.10"] and addresses(ask(d, payments)) == [ip]
        assert d.alive()

        # The endpoints answer again: discovery and the EC2 refresh go on.
        msk.front.stall = set()
        ok = d.metric("mskdns_discovery_refreshes_total", result="ok")
        assert wait_for(lambda: d.metric("mskdns_discovery_refreshes_total", result="ok") > ok, timeout=75)
        assert wait_for(lambda: d.http("/readyz") == (200, "ready\n"), timeout=30), d.http("/readyz")

        # A SIGTERM while both calls hang: the daemon ends at once.
        msk.front.stall = {"kafka", "ec2"}
        stalled = lambda s: sum(1 for c in list(msk.front.log) if c[1] == s and c[4] == "stalled")
        seen = (stalled("kafka"), stalled("ec2"))
        assert wait_for(lambda: stalled("kafka") > seen[0] and stalled("ec2") > seen[1], timeout=15)
        d.assert_stops_at_once()
    finally:
        msk.front.stop()
