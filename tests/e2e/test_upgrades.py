"""Upgrades that lose no query: mskdns started with sockets passed the way systemd passes them
(LISTEN_FDS, LISTEN_PID, from fd 3 on), stopped and started again on the same sockets under load;
and started once by Debian's systemd-socket-activate as a real service manager."""

import os
import signal
import socket
import struct
import subprocess
import threading
import time

import dns.message
import dns.query

from conftest import Daemon, free_port, recv_exact, require
from test_upstream_budget import LimitedUpstream

A = "boot-abcd1234.c2.kafka-serverless.us-east-1.amazonaws.com"
SO_RCVBUFFORCE = 33


def config(port, upstream):
    return f"""
[dns]
listen = ["127.0.0.1:{port}"]
upstreams = ["{upstream.addr}"]
allow = ["127.0.0.0/8"]
rate_limit = 0

[admin]
listen = "127.0.0.1:0"

[[clusters]]
bootstrap = "{A}"
addresses = ["10.1.0.10"]
ttl = 60
"""


def passed_sockets():
    """A UDP and a TCP socket on one port of 127.0.0.1, as a .socket unit holds them (the UDP one
    with a receive buffer for the restart gap, as ReceiveBuffer= sizes it)."""
    for _ in range(20):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
        udp.bind(("127.0.0.1", 0))
        port = udp.getsockname()[1]
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            tcp.bind(("127.0.0.1", port))
        except OSError:
            udp.close()
            tcp.close()
            continue
        tcp.listen(1024)
        return udp, tcp, port
    raise RuntimeError("no port for both")


def activated(tmp_path, text, udp, tcp, name):
    """mskdns with `udp` and `tcp` passed as fds 3 and 4, LISTEN_PID its own pid."""
    def place():
        os.dup2(udp.fileno(), 3)
        os.dup2(tcp.fileno(), 4)

    return Daemon(
        text,
        tmp_path,
        name=name,
        env={"LISTEN_FDS": "2", "LISTEN_FDNAMES": "dns-udp:dns-tcp"},
        preexec_fn=place,
        pass_fds=(3, 4),
        wrap=lambda argv: ["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", *argv],
    )


class TcpClient:
    """Queries over TCP one after another, as a stub resolver does (RFC 7766 6.2.1): when the
    connection closes with a query unanswered, it is asked again on a new connection."""

    def __init__(self, port, names):
        self.port, self.names = port, names
        self.answered, self.retried, self.failed = 0, 0, []
        self.stopped = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def connect(self):
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        s.settimeout(10)
        return s

    def run(self):
        s, i = self.connect(), 0
        while not self.stopped:
            q = dns.message.make_query(self.names[i % len(self.names)], "A")
            wire = q.to_wire()
            for attempt in range(5):
                try:
                    s.sendall(struct.pack(">H", len(wire)) + wire)
                    n = struct.unpack(">H", recv_exact(s, 2))[0]
                    r = dns.message.from_wire(recv_exact(s, n))
                    assert r.id == q.id and r.answer, r
                    self.answered += 1
                    break
                except (OSError, EOFError):
                    self.retried += 1
                    s.close()
                    s = self.connect()
            else:
                self.failed.append(q.question[0].name)
            i += 1
            time.sleep(0.005)
        s.close()

    def stop(self):
        self.stopped = True
        self.thread.join(timeout=20)


def test_restarts_on_passed_sockets_under_load_lose_no_query(tmp_path):
    require("dnsperf")
    up = LimitedUpstream()
    udp, tcp, port = passed_sockets()
    text = config(port, up)
    d = activated(tmp_path, text, udp, tcp, "gen-0.toml")
    assert d.dns == [("127.0.0.1", port)], d.dns
    # Warm the forwarded names: the load is MSK names and cached names.
    fwd = [f"w{i}.example.test." for i in range(20)]
    for n in fwd:
        assert dns.query.udp(dns.message.make_query(n, "A"), "127.0.0.1", port=port, timeout=3).answer
    names = tmp_path / "names"
    names.write_text("".join(f"{n} A\n" for n in [A, *fwd] * 50))
    perf = subprocess.Popen(
        ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(names), "-l", "20", "-Q", "5000", "-t", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    client = TcpClient(port, [A, *fwd])
    try:
        for gen in (1, 2):
            time.sleep(6)
            assert d.stop() == 0, "a clean exit on SIGTERM"
            d = activated(tmp_path, text, udp, tcp, f"gen-{gen}.toml")
        out, _ = perf.communicate(timeout=60)
    finally:
        client.stop()
        d.stop()
        up.stop()
    sent = [line for line in out.splitlines() if "Queries sent" in line]
    lost = [line for line in out.splitlines() if "Queries lost" in line]
    assert sent and int(sent[0].split()[2]) > 90000, out
    assert lost and lost[0].split()[2] == "0", out
    assert client.answered > 1000 and not client.failed, (client.answered, client.failed)


def test_a_passed_socket_no_listener_takes_is_a_start_error(tmp_path):
    up = LimitedUpstream()
    udp, tcp, port = passed_sockets()
    try:
        try:
            # dns.listen names another address (port 0): the passed pair has no listener.
            Daemon(config(0, up), tmp_path, env={"LISTEN_FDS": "2"},
                   preexec_fn=lambda: (os.dup2(udp.fileno(), 3), os.dup2(tcp.fileno(), 4)),
                   pass_fds=(3, 4), wrap=lambda argv: ["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", *argv])
        except RuntimeError as e:
            assert f"127.0.0.1:{port}" in str(e) and "matches no configured listener" in str(e), e
        else:
            raise AssertionError("mskdns started with a passed socket it did not use")
    finally:
        for s in (udp, tcp):
            s.close()
        up.stop()


def test_systemd_socket_activate_starts_it_on_the_first_query(tmp_path):
    tool = require("systemd-socket-activate")
    up = LimitedUpstream()
    port = free_port()
    cfg = tmp_path / "mskdns.toml"
    cfg.write_text(config(port, up))
    from conftest import BIN
    act = subprocess.Popen(
        [tool, "--datagram", "-l", f"127.0.0.1:{port}", "--fdname=dns-udp", str(BIN), "--config", str(cfg)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "AWS_EC2_METADATA_DISABLED": "true"},
    )
    try:
        time.sleep(0.5)
        # The first datagram starts mskdns, which reads it from the passed socket and answers it.
        r = dns.query.udp(dns.message.make_query(A, "A"), "127.0.0.1", port=port, timeout=15)
        assert [x.address for x in r.answer[0]] == ["10.1.0.10"]
        # It took the UDP socket and bound TCP itself, on the same address.
        r = dns.query.tcp(dns.message.make_query(A, "A"), "127.0.0.1", port=port, timeout=5)
        assert r.answer
    finally:
        act.send_signal(signal.SIGTERM)
        try:
            out, _ = act.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            act.kill()
            out, _ = act.communicate()
        up.stop()
    assert f"listening dns 127.0.0.1:{port}" in out, out


def test_a_producer_through_the_ports_proxy_loses_and_doubles_nothing_across_restarts(tmp_path):
    """The proxy's bootstrap listener passed by the service manager; the process stopped and
    started again twice while a confluent-kafka producer writes through it. Draining closes each
    connection at a request boundary with no response pending, so no request is cut half-way and
    none is answered to nobody: every message the producer was told was delivered is in the broker,
    and none twice (without idempotence, a request whose answer was lost would be sent again)."""
    from confluent_kafka import Consumer, Producer
    from confluent_kafka.admin import AdminClient, NewTopic
    from test_proxy import ADVERTISE, Cluster, port_range

    cluster = Cluster(tmp_path, tls=False)
    boot_sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    boot_sock.bind((ADVERTISE, 0))
    boot_sock.listen(128)
    port = boot_sock.getsockname()[1]
    first, last = port_range()
    text = f"""
[dns]
listen = ["127.0.0.1:0"]
upstreams = ["127.0.0.1:9"]

[admin]
listen = "127.0.0.1:0"

[[proxies]]
listen = "{ADVERTISE}:{port}"
upstream = "{cluster.upstream}"
advertise_host = "{ADVERTISE}"
broker_ports = "{first}-{last}"
state_file = "{tmp_path / 'proxy-state.json'}"
shutdown_grace_secs = 10
upstream_tls = false
"""

    def start(gen):
        return Daemon(
            text, tmp_path, name=f"proxy-{gen}.toml", env={"LISTEN_FDS": "1", "LISTEN_FDNAMES": "kafka"},
            preexec_fn=lambda: os.dup2(boot_sock.fileno(), 3), pass_fds=(3,),
            wrap=lambda argv: ["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", *argv],
        )

    d = start(0)
    topic = f"upgrade-{os.getpid()}-{int(time.time())}"
    boot = f"{ADVERTISE}:{port}"
    try:
        admin = AdminClient({"bootstrap.servers": boot})
        admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])[topic].result(timeout=30)
        delivered, failed = [], []

        def report(err, msg):
            (failed if err else delivered).append(msg.value().decode())

        p = Producer({"bootstrap.servers": boot, "linger.ms": 1, "acks": "all", "enable.idempotence": False,
                      "max.in.flight.requests.per.connection": 5, "batch.num.messages": 20,
                      "message.timeout.ms": 120000, "reconnect.backoff.max.ms": 500})
        # A steady stream (about 5,000 a second, in small batches): a request is nearly always
        # on its way when the proxy is stopped.
        n, sent = 40000, 0
        start_at = time.time()
        restarts = [2.0, 5.0]
        while sent < n:
            p.produce(topic, value=f"m-{sent:05d}".encode(), callback=report)
            sent += 1
            p.poll(0)
            if sent % 25 == 0:
                time.sleep(0.005)
            if restarts and time.time() - start_at > restarts[0]:
                restarts.pop(0)
                assert d.stop() == 0
                d = start(3 - len(restarts))
        assert p.flush(120) == 0
        assert not failed, failed[:5]
        c = Consumer({"bootstrap.servers": boot, "group.id": f"g-{topic}", "auto.offset.reset": "earliest"})
        c.subscribe([topic])
        read = []
        deadline = time.time() + 60
        while len(read) < len(delivered) and time.time() < deadline:
            m = c.poll(1.0)
            if m is not None and not m.error():
                read.append(m.value().decode())
        c.close()
    finally:
        d.stop()
        cluster.stop()
        boot_sock.close()
    assert len(delivered) == n
    assert sorted(read) == sorted(set(read)), "a message is in the broker twice"
    assert set(delivered) == set(read)


def test_a_producer_through_the_sni_proxy_across_restarts(client_host, tmp_path):
    """SNI mode on passed sockets (the proxy's listener, and the DNS listener the client host
    resolves the cluster through), restarted twice while an idempotent confluent-kafka producer on
    the client host writes through it: TLS passes through untouched, so a connection is closed at
    the end of the grace and a request cut with it is sent again; every message the producer was
    told was delivered is in the broker once, and the producer needed no restart."""
    import json
    import sys
    import uuid

    from test_proxy_sni import SERVERLESS, MskBroker, sni_daemon_config

    port = free_port()
    broker = MskBroker(tmp_path, port, SERVERLESS)
    h = client_host
    dns_udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dns_udp.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
    dns_udp.bind((h.host_ip, 53))
    dns_tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    dns_tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    dns_tcp.bind((h.host_ip, 53))
    dns_tcp.listen(128)
    sni = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sni.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sni.bind((h.host_ip, port))
    sni.listen(128)
    text = sni_daemon_config(SERVERLESS, port, h.host_ip, h.host_ip, f"{h.ip}/32", h.host_ip, "shutdown_grace_secs = 2")

    def start(gen):
        def place():
            for i, s in enumerate((dns_udp, dns_tcp, sni)):
                os.dup2(s.fileno(), 3 + i)

        return Daemon(text, tmp_path, name=f"sni-{gen}.toml", env={"LISTEN_FDS": "3"}, preexec_fn=place,
                      pass_fds=(3, 4, 5), wrap=lambda argv: ["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", *argv])

    d = start(0)
    script = os.path.join(os.path.dirname(__file__), "kafka_produce.py")
    topic = f"sni-{uuid.uuid4().hex[:8]}"
    producer = subprocess.Popen(
        ["ip", "netns", "exec", h.name, sys.executable, script, f"{SERVERLESS[0]}:{port}", str(broker.ca.file), topic,
         "6000", "10"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        for gen in (1, 2):
            time.sleep(4)
            assert d.stop() == 0
            d = start(gen)
        out, err = producer.communicate(timeout=240)
    finally:
        if producer.poll() is None:
            producer.kill()
        d.stop()
        broker.stop()
        for s in (dns_udp, dns_tcp, sni):
            s.close()
    assert producer.returncode == 0, err[-4000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["unsent"] == 0 and not result["failed"], result["failed"][:5]
    assert len(result["delivered"]) == 6000
    assert sorted(result["read"]) == sorted(set(result["read"])), "a message is in the broker twice"
    assert set(result["read"]) == set(result["delivered"])
