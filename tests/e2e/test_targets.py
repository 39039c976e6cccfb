"""Targets and views: VPC endpoints read from EC2 (moto), per-cluster forwarding (a second nsd),
views by client network and by listener, AZ affinity, provisioned names, `mskdns explain`."""
import subprocess

import dns.message
import dns.query
import dns.rcode
import pytest

from conftest import BIN, Nsd, free_port, wait_for

A = "boot-abcd1234.c2.kafka-serverless.us-east-1.amazonaws.com"
B = "boot-ef567890.c3.kafka-serverless.us-east-1.amazonaws.com"


def ask(host, port, name, rtype="A", source=None):
    q = dns.message.make_query(name, rtype)
    return dns.query.udp(q, host, port=port, source=source, timeout=3)


def addresses(resp):
    return [r.to_text() for rrset in resp.answer for r in rrset]


def endpoint(moto, cidr, azs):
    """An interface VPC endpoint with one subnet (and so one network interface) per AZ."""
    ec2 = moto.ec2
    vpc = ec2.create_vpc(CidrBlock=cidr)["Vpc"]["VpcId"]
    base = cidr.rsplit(".", 2)[0]
    subnets = [
        ec2.create_subnet(VpcId=vpc, CidrBlock=f"{base}.{i + 1}.0/24", AvailabilityZone=az)["Subnet"]["SubnetId"]
        for i, az in enumerate(azs)
    ]
    ep = ec2.create_vpc_endpoint(
        VpcId=vpc, ServiceName="com.amazonaws.vpce.us-east-1.vpce-svc-0123", VpcEndpointType="Interface", SubnetIds=subnets
    )["VpcEndpoint"]
    enis = ec2.describe_network_interfaces(NetworkInterfaceIds=ep["NetworkInterfaceIds"])["NetworkInterfaces"]
    by_az = {e["AvailabilityZone"]: e["PrivateIpAddress"] for e in enis}
    return ep["VpcEndpointId"], subnets, by_az, enis


def base_config(nsd_port, listen='["127.0.0.1:0"]'):
    return f"""
[dns]
listen = {listen}
upstreams = ["127.0.0.1:{nsd_port}"]
upstream_timeout_ms = 500

[admin]
listen = "127.0.0.1:0"

[aws]
refresh_secs = 1
"""


def test_vpc_endpoints_from_ec2(daemon, nsd, moto):
    ep_a, _, ips_a, enis_a = endpoint(moto, "10.11.0.0/16", ["us-east-1a", "us-east-1b"])
    ep_b, _, ips_b, _ = endpoint(moto, "10.12.0.0/16", ["us-east-1a", "us-east-1c"])
    d = daemon(base_config(nsd.port) + f"""
[[clusters]]
bootstrap = "{A}"
vpc_endpoint = "{ep_a}"

[[clusters]]
bootstrap = "{B}"
vpc_endpoint = "{ep_b}"
""", env=moto.env)
    assert wait_for(lambda: d.http("/readyz")[0] == 200), d.http("/readyz")
    assert sorted(addresses(ask(d.host, d.port, A))) == sorted(ips_a.values())
    assert sorted(addresses(ask(d.host, d.port, B.replace("boot", "b0523", 1)))) == sorted(ips_b.values())

    # A network interface that changes in EC2 shows in answers within one refresh interval.
    moto.ec2.assign_private_ip_addresses(NetworkInterfaceId=enis_a[0]["NetworkInterfaceId"], PrivateIpAddresses=["10.11.1.99"])
    assert wait_for(lambda: "10.11.1.99" in addresses(ask(d.host, d.port, A)), timeout=3)

    # EC2 gone: the last known addresses keep being served, /readyz says degraded and why.
    before = sorted(addresses(ask(d.host, d.port, A)))
    moto.stop()
    assert wait_for(lambda: "degraded" in d.http("/readyz")[1], timeout=10), d.http("/readyz")
    status, body = d.http("/readyz")
    assert status == 200 and "DescribeVpcEndpoints" in body
    assert sorted(addresses(ask(d.host, d.port, A))) == before
    assert d.metric("mskdns_ec2_errors_total", operation="DescribeVpcEndpoints") >= 1


def test_az_affinity(daemon, nsd, moto):
    ep, subnets, ips, _ = endpoint(moto, "10.13.0.0/16", ["us-east-1a", "us-east-1b", "us-east-1c"])
    d = daemon(base_config(nsd.port) + f"""
[[clusters]]
bootstrap = "{A}"
vpc_endpoint = "{ep}"

[[views]]
name = "prefer-b"
clients = ["127.0.0.2/32"]
subnet = "{subnets[1]}"
az_affinity = "prefer"

[[views]]
name = "only-c"
clients = ["127.0.0.3/32"]
az = "us-east-1c"
az_affinity = "only"
""", env=moto.env)
    assert wait_for(lambda: d.http("/readyz")[0] == 200)
    # The subnet's AZ comes from EC2 (DescribeSubnets): wait for it to be applied.
    assert wait_for(lambda: addresses(ask(d.host, d.port, A, source="127.0.0.2"))[0] == ips["us-east-1b"], timeout=5)
    prefer = addresses(ask(d.host, d.port, A, source="127.0.0.2"))
    assert prefer[0] == ips["us-east-1b"] and sorted(prefer) == sorted(ips.values())
    assert addresses(ask(d.host, d.port, A, source="127.0.0.3")) == [ips["us-east-1c"]]
    assert sorted(addresses(ask(d.host, d.port, A, source="127.0.0.1"))) == sorted(ips.values())


def test_views_by_client_network(daemon, nsd):
    d = daemon(base_config(nsd.port) + f"""
[[clusters]]
bootstrap = "{A}"
addresses = ["10.1.0.10"]

[[clusters]]
bootstrap = "{B}"
addresses = ["10.2.0.10"]

[[views]]
name = "vpc-two"
clients = ["127.0.0.2/32"]
[[views.clusters]]
bootstrap = "{A}"
addresses = ["10.21.0.10"]

[[views]]
name = "vpc-three"
clients = ["127.0.0.3/32"]
[[views.clusters]]
bootstrap = "{A}"
addresses = ["10.31.0.10"]
""")
    name = A.replace("boot", "b0037", 1)
    assert addresses(ask(d.host, d.port, name, source="127.0.0.1")) == ["10.1.0.10"]
    assert addresses(ask(d.host, d.port, name, source="127.0.0.2")) == ["10.21.0.10"]
    assert addresses(ask(d.host, d.port, name, source="127.0.0.3")) == ["10.31.0.10"]
    # A view inherits the clusters it does not override.
    assert addresses(ask(d.host, d.port, B, source="127.0.0.2")) == ["10.2.0.10"]


def test_views_by_listener_port(daemon, nsd):
    # A Route 53 outbound rule may target any port: one port per client VPC selects its view.
    p1, p2 = free_port(), free_port()
    d = daemon(base_config(nsd.port, listen=f'["127.0.0.1:0", "127.0.0.1:{p1}", "127.0.0.1:{p2}"]') + f"""
[[clusters]]
bootstrap = "{A}"
addresses = ["10.1.0.10"]

[[views]]
name = "account-1"
listeners = ["127.0.0.1:{p1}"]
[[views.clusters]]
bootstrap = "{A}"
addresses = ["10.41.0.10"]

[[views]]
name = "account-2"
listeners = ["127.0.0.1:{p2}"]
[[views.clusters]]
bootstrap = "{A}"
addresses = ["10.42.0.10"]
""")
    assert addresses(ask("127.0.0.1", d.port, A)) == ["10.1.0.10"]
    assert addresses(ask("127.0.0.1", p1, A)) == ["10.41.0.10"]
    assert addresses(ask("127.0.0.1", p2, A)) == ["10.42.0.10"]
    tcp = dns.query.tcp(dns.message.make_query(A, "A"), "127.0.0.1", port=p2, timeout=3)
    assert addresses(tcp) == ["10.42.0.10"]


MSK_ZONE = """$ORIGIN kafka-serverless.us-east-1.amazonaws.com.
$TTL 120
@ IN SOA ns hostmaster 1 3600 600 86400 60
@ IN NS ns
ns IN A 10.50.0.1
boot-fwd0001.c1 IN A 10.50.1.1
b0007-fwd0001.c1 IN A 10.50.1.7
boot-abcd1234.c2 IN A 10.50.9.9
"""


def test_cluster_forwarding_to_its_own_resolver(daemon, nsd, tmp_path):
    """Per-cluster conditional forwarding: only that cluster's names go to its resolver."""
    own = Nsd(tmp_path, zone="kafka-serverless.us-east-1.amazonaws.com", text=MSK_ZONE,
              probe="ns.kafka-serverless.us-east-1.amazonaws.com.")
    try:
        d = daemon(base_config(nsd.port) + f"""
[[clusters]]
bootstrap = "boot-fwd0001.c1.kafka-serverless.us-east-1.amazonaws.com"
forward = ["127.0.0.1:{own.port}"]

[[clusters]]
bootstrap = "{A}"
addresses = ["10.1.0.10"]
""")
        r = ask(d.host, d.port, "boot-fwd0001.c1.kafka-serverless.us-east-1.amazonaws.com")
        assert addresses(r) == ["10.50.1.1"] and r.answer[0].ttl == 120
        assert addresses(ask(d.host, d.port, "B0007-FWD0001.c1.kafka-serverless.us-east-1.amazonaws.com")) == ["10.50.1.7"]
        # The other cluster is answered from its own target, not from that resolver.
        assert addresses(ask(d.host, d.port, A)) == ["10.1.0.10"]
        assert d.metric("mskdns_cluster_answers_total", cluster="fwd0001.c1.us-east-1") == 2
    finally:
        own.stop()


def test_provisioned_names_resolve_per_broker(daemon, nsd):
    d = daemon(base_config(nsd.port) + """
[[clusters]]
bootstrap = "b-1.orders.ab12cd.c3.kafka.us-east-1.amazonaws.com"
addresses = ["10.60.0.100"]
brokers = { "1" = ["10.60.0.1"], "2" = ["10.60.0.2"], "3" = ["10.60.0.3", "fd00::60:3"] }
""")
    broker = "b-{}.orders.ab12cd.c3.kafka.us-east-1.amazonaws.com"
    assert addresses(ask(d.host, d.port, broker.format(1))) == ["10.60.0.1"]
    assert addresses(ask(d.host, d.port, broker.format(2))) == ["10.60.0.2"]
    assert addresses(ask(d.host, d.port, broker.format(3))) == ["10.60.0.3"]
    assert addresses(ask(d.host, d.port, broker.format(3), "AAAA")) == ["fd00::60:3"]
    assert addresses(ask(d.host, d.port, broker.format(9))) == ["10.60.0.100"]


def test_explain(tmp_path, nsd):
    cfg = tmp_path / "explain.toml"
    cfg.write_text(base_config(nsd.port) + f"""
[[clusters]]
bootstrap = "{A}"
addresses = ["10.1.0.10"]

[[views]]
name = "vpc-two"
clients = ["127.0.0.2/32"]
[[views.clusters]]
bootstrap = "{A}"
vpc_endpoint = "vpce-0abc"
""")
    run = lambda *args: subprocess.run([str(BIN), "--config", str(cfg), "explain", *args], capture_output=True, text=True, check=True).stdout
    out = run(A.replace("boot", "b97", 1), "--client", "127.0.0.2")
    assert "broker b97" in out and "view:    vpc-two" in out and "vpce-0abc" in out and "views[0].clusters[0]" in out
    out = run(A, "--client", "10.9.9.9")
    assert "view:    default" in out and "addresses 10.1.0.10" in out
    assert "not an MSK name" in run("www.example.test")
