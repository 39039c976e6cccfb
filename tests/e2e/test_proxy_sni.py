"""The SNI proxy (`mode = "sni"`): TLS passes through untouched, routed by the ClientHello's name.

The first tests' broker is a TLS echo server with a certificate for its MSK name from a test CA;
the client verifies that certificate through the proxy, which never holds the key. Then real Kafka
clients (confluent-kafka, kafka-python) on a client host of their own (a network namespace whose
resolv.conf names mskdns) produce and consume through the proxy to Tansu behind a TLS terminator
that holds a certificate for the MSK names, with certificate and host-name checks on; and two
instances behind a round-robin load balancer, in both proxy modes.
"""

import json
import socket
import ssl
import struct
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from conftest import free_port, require, wait_for
from pki import CA
from test_proxy import Cluster, Tansu, end, port_range, proxy_config, spawn

ROUNDTRIP = Path(__file__).with_name("kafka_roundtrip.py")

NAME = "b-1.demo.abc123.c2.kafka.us-east-1.amazonaws.com"
BROKER_IP, PROXY_IP = "127.0.0.10", "127.0.0.20"


class EchoBroker:
    """A TLS server that echoes one line per connection and counts the connections it gets."""

    def __init__(self, tmp_path):
        self.ca = CA(tmp_path / "ca")
        cert, key, _ = self.ca.issue("broker", dns=[NAME])
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(cert, key)
        self.sock = socket.create_server((BROKER_IP, 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self.echo, args=(conn,), daemon=True).start()

    def echo(self, conn):
        try:
            with self.ctx.wrap_socket(conn, server_side=True) as t:
                t.sendall(t.recv(1024))
        except (OSError, ssl.SSLError):
            pass


def config(port, extra=""):
    return f"""
[dns]
listen = ["127.0.0.1:0"]
upstreams = ["127.0.0.1:9"]

[admin]
listen = "127.0.0.1:0"

[[clusters]]
bootstrap = "{NAME}"
addresses = ["{BROKER_IP}"]

[[proxies]]
mode = "sni"
listen = ["{PROXY_IP}:{port}"]
{extra}
"""


def ask(ca_file, server_name, port, payload=b"ping\n", prefix=b"", source=None):
    ctx = ssl.create_default_context(cafile=str(ca_file))
    with socket.create_connection((PROXY_IP, port), timeout=5, source_address=(source, 0) if source else None) as s:
        if prefix:
            s.sendall(prefix)
        with ctx.wrap_socket(s, server_hostname=server_name) as t:
            t.sendall(payload)
            return t.recv(1024)


def pp2(client_ip, client_port, vpce=None):
    tlv = b""
    if vpce:
        v = b"\x01" + vpce.encode()
        tlv = b"\xea" + struct.pack(">H", len(v)) + v
    body = socket.inet_aton(client_ip) + socket.inet_aton(PROXY_IP) + struct.pack(">HH", client_port, 9098) + tlv
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack(">H", len(body)) + body


def test_tls_is_routed_by_server_name_and_verifies_end_to_end(daemon, tmp_path):
    broker = EchoBroker(tmp_path)
    d = daemon(config(broker.port))
    assert d.proxies == [(PROXY_IP, broker.port)]
    assert ask(broker.ca.file, NAME, broker.port) == b"ping\n"
    # Upper case in the ClientHello names the same broker.
    assert ask(broker.ca.file, NAME.upper(), broker.port) == b"ping\n"
    assert broker.accepted == 2
    assert d.metric("mskdns_proxy_sni_connections_total", outcome="routed", cluster="demo.abc123.c2.us-east-1") == 2


def test_a_name_not_served_is_refused_without_connecting(daemon, tmp_path):
    broker = EchoBroker(tmp_path)
    d = daemon(config(broker.port))
    for name in ["b-1.other.ffff99.c2.kafka.us-east-1.amazonaws.com", "example.com"]:
        with pytest.raises(ssl.SSLError, match="(?i)unrecognized.name"):
            ask(broker.ca.file, name, broker.port)
    assert broker.accepted == 0
    assert d.metric("mskdns_proxy_sni_connections_total", outcome="unknown_name") == 2
    # Not TLS at all: closed, counted, nothing connected.
    with socket.create_connection((PROXY_IP, broker.port), timeout=5) as s:
        s.sendall(b"\x00\x00\x00\x10kafka-request...")
        assert s.recv(100) == b""
    assert d.metric("mskdns_proxy_sni_connections_total", outcome="not_tls") == 1
    assert broker.accepted == 0


def test_strangers_are_closed_before_anything_is_read(daemon, tmp_path):
    broker = EchoBroker(tmp_path)
    d = daemon(config(broker.port, 'allow = ["10.0.0.0/8"]'))
    with pytest.raises((ssl.SSLError, OSError)):
        ask(broker.ca.file, NAME, broker.port)
    assert broker.accepted == 0
    assert d.metric("mskdns_proxy_sni_connections_total", outcome="not_allowed") == 1


def test_proxy_protocol_v2_client_and_endpoint_are_checked(daemon, tmp_path):
    broker = EchoBroker(tmp_path)
    extra = 'allow = ["10.0.0.0/8"]\nproxy_protocol = true\nallow_endpoints = ["vpce-0aaa"]'
    d = daemon(config(broker.port, extra))
    # Through the allowed endpoint, from an allowed client: routed.
    assert ask(broker.ca.file, NAME, broker.port, prefix=pp2("10.1.2.3", 40000, "vpce-0aaa")) == b"ping\n"
    assert broker.accepted == 1
    # Another endpoint, no endpoint, a client outside allow, no header: closed, nothing connected.
    for prefix in [pp2("10.1.2.3", 40001, "vpce-0bbb"), pp2("10.1.2.3", 40002), pp2("192.0.2.1", 40003, "vpce-0aaa")]:
        with pytest.raises((ssl.SSLError, OSError)):
            ask(broker.ca.file, NAME, broker.port, prefix=prefix)
    with pytest.raises((ssl.SSLError, OSError)):
        ask(broker.ca.file, NAME, broker.port)
    assert broker.accepted == 1
    assert d.metric("mskdns_proxy_sni_connections_total", outcome="not_allowed") == 3
    assert d.metric("mskdns_proxy_sni_connections_total", outcome="not_tls") == 1


def test_only_the_balancers_in_proxy_protocol_from_may_send_a_header(daemon, tmp_path):
    """A header names the client that `allow` is checked against, so whoever may write one may
    claim any address: with `proxy_protocol_from`, a peer outside it is closed at accept, before
    its header is read, however good the header."""
    broker = EchoBroker(tmp_path)
    extra = 'allow = ["10.0.0.0/8"]\nproxy_protocol = true\nproxy_protocol_from = ["127.0.0.5/32"]'
    d = daemon(config(broker.port, extra))
    assert ask(broker.ca.file, NAME, broker.port, prefix=pp2("10.1.2.3", 40000), source="127.0.0.5") == b"ping\n"
    assert broker.accepted == 1
    with pytest.raises((ssl.SSLError, OSError)):
        ask(broker.ca.file, NAME, broker.port, prefix=pp2("10.1.2.3", 40001), source="127.0.0.6")
    assert broker.accepted == 1
    assert d.metric("mskdns_proxy_sni_connections_total", outcome="not_allowed") == 1


def test_ports_mode_takes_proxy_protocol_headers_only_from_proxy_protocol_from(daemon, tmp_path):
    """The same key for `mode = "ports"`: the header's client is checked against `allow`, and a
    peer outside `proxy_protocol_from` is closed before its header is read."""
    cluster = Cluster(tmp_path, tls=False)
    try:
        first, last = port_range()
        extra = 'allow = ["10.0.0.0/8"]\nproxy_protocol = true\nproxy_protocol_from = ["127.0.0.5/32"]\n'
        d = daemon(proxy_config(tmp_path, cluster, first, last) + extra)
        host, port = d.proxies[0]
        # ApiVersions v0, correlation id 1, no client id.
        request = (10).to_bytes(4, "big") + b"\x00\x12\x00\x00\x00\x00\x00\x01\xff\xff"

        def api_versions(source, client):
            with socket.create_connection((host, port), timeout=5, source_address=(source, 0)) as s:
                s.sendall(pp2(client, 40000) + request)
                try:
                    return s.recv(8)
                except ConnectionResetError:
                    return b""

        answer = api_versions("127.0.0.5", "10.1.2.3")
        assert len(answer) == 8 and answer[4:8] == b"\x00\x00\x00\x01"
        assert api_versions("127.0.0.6", "10.1.2.3") == b""
        assert api_versions("127.0.0.5", "192.0.2.1") == b""
        assert wait_for(lambda: d.metric("mskdns_proxy_connections_rejected_total", reason="not_allowed") == 2, timeout=5)
    finally:
        cluster.stop()


SERVERLESS = (
    "boot-abcd1234.c2.kafka-serverless.us-east-1.amazonaws.com",
    "b1-abcd1234.c2.kafka-serverless.us-east-1.amazonaws.com",
)
MULTI_VPC = ("b-1.iam.demo.abc123.c2.kafka.us-east-1.amazonaws.com",) * 2


class MskBroker:
    """Tansu advertising the MSK broker name `broker`:port, behind haproxy terminating TLS on
    BROKER_IP:port with a certificate for the cluster's names from a test CA. The key stays here."""

    def __init__(self, tmp_path, port, names):
        bootstrap, broker = names
        self.ca = CA(tmp_path / "msk-ca")
        self.tansu = Tansu(tmp_path, advertised=f"tcp://{broker}:{port}")
        _, _, bundle = self.ca.issue("msk-broker", dns=sorted({bootstrap, broker}))
        cfg = tmp_path / "msk-broker.cfg"
        cfg.write_text(f"""
defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m
frontend msk
    bind {BROKER_IP}:{port} ssl crt {bundle}
    default_backend tansu
backend tansu
    server tansu 127.0.0.1:{self.tansu.port}
""")
        self.log = open(tmp_path / "msk-broker.log", "w")
        self.proc = spawn([require("haproxy"), "-db", "-f", str(cfg)], self.log, port, "haproxy", host=BROKER_IP)

    def stop(self):
        end(self.proc)
        self.tansu.stop()


class LoadBalancer:
    """haproxy in TCP mode as an NLB: each new connection to `front`, on any of `ports`, goes to
    the next of `backends` on the same port (round robin), with a PROXY v2 header if asked."""

    def __init__(self, tmp_path, front, ports, backends, send_proxy=False):
        binds = "\n".join(f"    bind {front}:{p}" for p in ports)
        servers = "\n".join(
            f"    server i{i} {b}{' send-proxy-v2' if send_proxy else ''}" for i, b in enumerate(backends)
        )
        cfg = tmp_path / "lb.cfg"
        cfg.write_text(f"""
defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m
frontend nlb
{binds}
    default_backend instances
backend instances
    balance roundrobin
{servers}
""")
        self.log = open(tmp_path / "lb.log", "w")
        self.proc = spawn([require("haproxy"), "-db", "-f", str(cfg)], self.log, ports[0], "haproxy", host=front)

    def stop(self):
        end(self.proc)


@pytest.fixture
def closing():
    """Stops what a test started, in reverse order, however the test ends."""
    started = []
    yield started.append
    for s in reversed(started):
        s.stop()


def sni_daemon_config(names, port, dns, proxy_listen, clients, proxy_answer, extra=""):
    return f"""
[dns]
listen = ["{dns}:53"]
upstreams = ["127.0.0.1:9"]

[admin]
listen = "127.0.0.1:0"

[[clusters]]
bootstrap = "{names[0]}"
addresses = ["{BROKER_IP}"]

[[views]]
name = "client-hosts"
clients = ["{clients}"]
[[views.clusters]]
bootstrap = "{names[0]}"
proxy = ["{proxy_answer}"]

[[proxies]]
mode = "sni"
listen = ["{proxy_listen}:{port}"]
allow = ["{clients}"]
{extra}
"""


def roundtrip(host, client, boot, ca_file, messages=2000):
    """The client's round trip on the client host; its JSON result."""
    topic = f"t-{uuid.uuid4().hex[:8]}"
    r = host.run([sys.executable, ROUNDTRIP, client, boot, ca_file, topic, messages])
    assert r.returncode == 0, r.stderr[-4000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["unsent"] == 0
    assert result["values"] == [f"record-{i:05d}" for i in range(messages)]
    assert result["committed"] == messages
    return result


@pytest.mark.parametrize(
    "client,names",
    [("confluent", SERVERLESS), ("kafka-python", SERVERLESS), ("confluent", MULTI_VPC)],
    ids=["confluent-serverless", "kafka-python-serverless", "confluent-multi-vpc"],
)
def test_kafka_clients_resolving_through_mskdns_produce_and_consume_through_the_sni_proxy(
    daemon, client_host, closing, tmp_path, client, names
):
    port = free_port()
    broker = MskBroker(tmp_path, port, names)
    closing(broker)
    h = client_host
    d = daemon(sni_daemon_config(names, port, h.host_ip, h.host_ip, f"{h.ip}/32", h.host_ip))
    assert d.proxies == [(h.host_ip, port)]
    result = roundtrip(h, client, f"{names[0]}:{port}", broker.ca.file)
    # Metadata keeps the real broker name: nothing was rewritten, the certificate matched it.
    assert result["brokers"] == [f"{names[1]}:{port}"]
    # The only way to the broker from the client host is the proxy, found through mskdns.
    assert d.metric("mskdns_proxy_sni_connections_total", outcome="routed") >= 2
    for outcome in ("unknown_name", "no_sni", "connect_failed", "not_allowed"):
        assert d.metric("mskdns_proxy_sni_connections_total", outcome=outcome) == 0, outcome
    assert d.metric("mskdns_proxy_sni_bytes_total", direction="to_client") > 0


def test_two_sni_instances_behind_one_load_balancer(daemon, client_host, closing, tmp_path):
    """The same configuration but for each instance's own address; the NLB (haproxy, round robin,
    PROXY v2) sends each new connection to the other instance; the client host asks both in turn."""
    port = free_port()
    broker = MskBroker(tmp_path, port, SERVERLESS)
    closing(broker)
    h = client_host
    h.resolvers(h.host_ips)
    # The balancer first: its start-up probe (from this host) then finds no instance to reach.
    closing(LoadBalancer(tmp_path, h.host_ip, [port], [f"{a}:{port}" for a in h.host_ips], send_proxy=True))
    instances = [
        daemon(
            sni_daemon_config(SERVERLESS, port, a, a, f"{h.ip}/32", h.host_ip, "proxy_protocol = true"),
            name=f"instance-{i}.toml",
        )
        for i, a in enumerate(h.host_ips)
    ]
    roundtrip(h, "confluent", f"{SERVERLESS[0]}:{port}", broker.ca.file)
    roundtrip(h, "kafka-python", f"{SERVERLESS[0]}:{port}", broker.ca.file)
    routed = [d.metric("mskdns_proxy_sni_connections_total", outcome="routed") for d in instances]
    assert all(n >= 2 for n in routed), routed
    # allow was checked against the client host's address that the PROXY header carried.
    assert sum(d.metric("mskdns_proxy_sni_connections_total", outcome="not_allowed") for d in instances) == 0


def test_two_port_instances_with_node_id_ports_behind_one_load_balancer(daemon, closing, tmp_path):
    """`mode = "ports"` with `port_assignment = "node_id"`: each instance binds every port of
    broker_ports and asks the cluster for its brokers at start, so either one can take any
    connection; the load balancer alternates between them on every port."""
    from kafka_roundtrip import confluent

    tansu_port = free_port()
    front, backends = "127.0.0.30", ["127.0.0.31", "127.0.0.32"]
    boot = free_port()
    first, last = port_range()
    instances = []
    for i, b in enumerate(backends):
        config = f"""
[dns]
listen = ["127.0.0.1:0"]
upstreams = ["127.0.0.1:9"]

[admin]
listen = "127.0.0.1:0"

[[proxies]]
listen = "{b}:{boot}"
upstream = "127.0.0.1:{tansu_port}"
upstream_tls = false
advertise_host = "{front}"
broker_ports = "{first}-{last}"
port_assignment = "node_id"
"""
        instances.append(daemon(config, name=f"instance-{i}.toml"))
    # The cluster was down when they started: nothing learned, and said so.
    for i, d in enumerate(instances):
        assert wait_for(lambda: "cannot ask the cluster for its brokers" in (tmp_path / f"instance-{i}.log").read_text())
        assert d.metric("mskdns_proxy_broker_ports") == 0
    closing(Tansu(tmp_path, port=tansu_port))
    # A client reaching a broker port of an instance that has relayed no metadata: the instance
    # asks the cluster then. Of the range's ports exactly one is the broker's (ApiVersions is
    # answered there); the others are closed.
    time.sleep(1.1)  # an instance asks the cluster at most once a second
    answered = []
    for p in range(first, last + 1):
        with socket.create_connection((backends[1], p), timeout=10) as s:
            s.sendall((10).to_bytes(4, "big") + b"\x00\x12\x00\x00\x00\x00\x00\x01\xff\xff")
            try:
                if len(s.recv(8)) == 8:
                    answered.append(p)
            except ConnectionResetError:
                pass  # closed with the request unread
    assert len(answered) == 1, answered
    assert instances[1].metric("mskdns_proxy_broker_ports") == 1
    assert instances[1].metric("mskdns_proxy_connections_rejected_total", reason="unknown_broker") == last - first
    closing(LoadBalancer(tmp_path, front, [boot, *range(first, last + 1)], backends))
    result = confluent(f"{front}:{boot}", None, f"t-{uuid.uuid4().hex[:8]}", 2000)
    assert result["values"] == [f"record-{i:05d}" for i in range(2000)]
    assert result["committed"] == 2000
    # One broker, at the same port from either instance.
    (broker,) = result["brokers"]
    assert broker == f"{front}:{answered[0]}"
    for d in instances:
        assert d.metric("mskdns_proxy_connections_total", listener="bootstrap") >= 1
        assert d.metric("mskdns_proxy_connections_total", listener="broker") >= 1
        assert d.metric("mskdns_proxy_port_collisions_total") == 0


def test_a_forward_target_is_asked_for_the_broker_and_the_next_address_tried(daemon, tmp_path):
    """The cluster's target is a resolver in its own VPC (here nsd, authoritative for MSK's
    private zone): the proxy asks it for the broker's name and connects to what it answers; of
    two addresses, one refuses connections and the other is the broker."""
    from conftest import Nsd

    broker = EchoBroker(tmp_path)
    zone = f"""$ORIGIN kafka.us-east-1.amazonaws.com.
$TTL 60
@ IN SOA ns hostmaster 1 3600 600 86400 30
@ IN NS ns
ns IN A 192.0.2.53
{NAME.removesuffix(".kafka.us-east-1.amazonaws.com")} IN A 127.0.0.11
{NAME.removesuffix(".kafka.us-east-1.amazonaws.com")} IN A {BROKER_IP}
"""
    own = Nsd(tmp_path, zone="kafka.us-east-1.amazonaws.com", text=zone, probe="ns.kafka.us-east-1.amazonaws.com.")
    try:
        text = config(broker.port).replace(f'addresses = ["{BROKER_IP}"]', f'forward = ["127.0.0.1:{own.port}"]')
        d = daemon(text)
        for _ in range(4):
            assert ask(broker.ca.file, NAME, broker.port) == b"ping\n"
        assert broker.accepted == 4
        assert d.metric("mskdns_proxy_sni_connections_total", outcome="routed") == 4
    finally:
        own.stop()
