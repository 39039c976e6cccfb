"""Hostile clients and upstreams against the real binary: what used to crash a listener, hold a
slot or poison the cache, and what the daemon does now."""
import socket
import struct
import threading
import time

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.tsig
import dns.tsigkeyring
import dns.exception
import dns.rrset
import pytest

from conftest import Nsd, wait_for

PROV_ZONE = """$ORIGIN kafka.us-east-1.amazonaws.com.
$TTL 120
@ IN SOA ns hostmaster 1 3600 600 86400 60
@ IN NS ns
ns IN A 10.70.0.1
b-1.orders.ab12cd.c3 IN A 10.70.1.1
b-2.orders.ab12cd.c3 IN A 10.70.1.2
"""


def base(nsd_port, extra=""):
    return f"""
[dns]
listen = ["127.0.0.1:0"]
upstreams = ["127.0.0.1:{nsd_port}"]
upstream_timeout_ms = 500
udp_threads = 2
{extra}

[admin]
listen = "127.0.0.1:0"
"""


def ask(d, name, rtype="A", rdclass="IN", timeout=3):
    q = dns.message.make_query(name, rtype, rdclass)
    return dns.query.udp(q, d.host, port=d.port, timeout=timeout)


def addresses(resp):
    return [r.to_text() for rrset in resp.answer for r in rrset]


def test_provisioned_cluster_with_forward_target_keeps_udp_alive(daemon, nsd, tmp_path):
    """A provisioned broker name of a cluster whose target is `forward` reached `unreachable!`
    and ended a UDP thread; after `udp_threads` such queries UDP answered nothing."""
    own = Nsd(tmp_path, zone="kafka.us-east-1.amazonaws.com", text=PROV_ZONE,
              probe="ns.kafka.us-east-1.amazonaws.com.")
    try:
        d = daemon(base(nsd.port) + f"""
[[clusters]]
bootstrap = "b-1.orders.ab12cd.c3.kafka.us-east-1.amazonaws.com"
forward = ["127.0.0.1:{own.port}"]
""")
        for _ in range(5):
            r = ask(d, "b-1.orders.ab12cd.c3.kafka.us-east-1.amazonaws.com")
            assert addresses(r) == ["10.70.1.1"]
        assert addresses(ask(d, "B-2.Orders.ab12cd.c3.kafka.us-east-1.amazonaws.com")) == ["10.70.1.2"]
        assert addresses(ask(d, "www.example.test")) == ["192.0.2.10"]
        # Answers from the resolver count once per upstream answer (cache hits do not).
        assert d.metric("mskdns_cluster_answers_total", cluster="orders.ab12cd.c3.us-east-1") == 2
        assert d.metric("mskdns_panics_total") == 0
        assert d.http("/healthz") == (200, "ok\n")
    finally:
        own.stop()


def test_non_in_class_for_our_names_is_refused(daemon, nsd):
    d = daemon(base(nsd.port) + """
[[clusters]]
bootstrap = "boot-abcd1234.c2.kafka-serverless.us-east-1.amazonaws.com"
addresses = ["10.1.0.10"]
""")
    name = "boot-abcd1234.c2.kafka-serverless.us-east-1.amazonaws.com"
    for rdclass in ("CH", "HS"):
        r = ask(d, name, "A", rdclass)
        assert r.rcode() == dns.rcode.REFUSED and not r.answer and not r.authority
        assert not r.flags & dns.flags.AA
    r = ask(d, name)
    assert r.rcode() == dns.rcode.NOERROR and addresses(r) == ["10.1.0.10"]


def raw_udp(d, pkt, timeout=2):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(pkt, (d.host, d.port))
        return s.recv(65535)


def test_opt_outside_additional_is_formerr(daemon, nsd):
    d = daemon(base(nsd.port))
    q = dns.message.make_query("www.example.test", "A")
    wire = bytearray(q.to_wire())
    # One answer record: an OPT owned by the root.
    wire[6:8] = struct.pack("!H", 1)
    wire += b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)
    r = dns.message.from_wire(raw_udp(d, bytes(wire)), question_only=True)
    assert r.rcode() == dns.rcode.FORMERR
    # The same in the authority section.
    wire[6:8] = b"\x00\x00"
    wire[8:10] = struct.pack("!H", 1)
    r = dns.message.from_wire(raw_udp(d, bytes(wire)), question_only=True)
    assert r.rcode() == dns.rcode.FORMERR


def test_tsig_signed_query_gets_notauth_badkey(daemon, nsd):
    d = daemon(base(nsd.port))
    keyring = dns.tsigkeyring.from_text({"mskdns-test.": "c2VjcmV0c2VjcmV0c2VjcmV0"})
    q = dns.message.make_query("www.example.test", "A")
    q.use_tsig(keyring, keyname="mskdns-test.")
    with pytest.raises(dns.tsig.PeerBadKey):
        dns.query.udp(q, d.host, port=d.port, timeout=3)
    # The answer is unsigned and says BADKEY: read it without verifying.
    raw = raw_udp(d, q.to_wire())
    header = struct.unpack("!HHHHHH", raw[:12])
    assert header[1] & 0xF == 9  # NOTAUTH
    assert header[5] == 1  # the TSIG record
    # TSIG RDATA ends with the original id, the error (17: BADKEY) and an empty other-data.
    assert raw[-6:] == struct.pack("!HHH", q.id, 17, 0)


def tcp_query(name, rtype="A", qid=None):
    q = dns.message.make_query(name, rtype)
    if qid is not None:
        q.id = qid
    w = q.to_wire()
    return struct.pack("!H", len(w)) + w


def closed_within(sock, seconds):
    """True when the peer closes `sock` (EOF or reset) within `seconds`, reading and discarding."""
    sock.settimeout(0.2)
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if sock.recv(65536) == b"":
                return True
        except socket.timeout:
            continue
        except ConnectionResetError:
            return True
    return False


def connect(d, source="127.0.0.1", rcvbuf=None):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.bind((source, 0))
    s.connect((d.host, d.port))
    return s


def tcp_works(d, source="127.0.0.1"):
    try:
        r = dns.query.tcp(dns.message.make_query("www.example.test", "A"), d.host, port=d.port, timeout=3,
                          source=source)
        return addresses(r) == ["192.0.2.10"]
    except (OSError, EOFError, dns.exception.DNSException):
        return False


def test_tcp_clients_that_never_read_are_closed_by_the_write_timeout(daemon, nsd):
    """Two connections that never read their answers used to hold both slots forever."""
    d = daemon(base(nsd.port, "max_tcp_connections = 2\ntcp_write_timeout_ms = 500\ntcp_idle_timeout_ms = 30000"))
    hogs = [connect(d, rcvbuf=4096) for _ in range(2)]
    burst = b"".join(tcp_query("big.example.test", "TXT", qid=i) for i in range(3000))
    for h in hogs:
        h.setblocking(False)
        try:
            h.send(burst)
        except BlockingIOError:
            pass
    time.sleep(0.3)
    assert not tcp_works(d), "both slots are held"
    assert wait_for(lambda: tcp_works(d), timeout=15), "the write timeout freed a slot"
    assert d.metric("mskdns_tcp_connections_rejected_total", reason="limit") >= 1
    for h in hogs:
        h.close()


def test_tcp_zero_length_message_closes_the_connection(daemon, nsd):
    d = daemon(base(nsd.port, "tcp_idle_timeout_ms = 30000"))
    s = connect(d)
    s.sendall(b"\x00\x00")
    assert closed_within(s, 3)
    s.close()


def test_tcp_per_client_cap_and_allow_at_accept(daemon, nsd):
    d = daemon(base(nsd.port, 'max_tcp_connections_per_client = 2\nallow = ["127.0.0.1/32", "127.0.0.2/32"]')
               .replace('listen = ["127.0.0.1:0"]', 'listen = ["127.0.0.1:0"]'))
    held = [connect(d) for _ in range(2)]
    time.sleep(0.2)
    third = connect(d)
    assert closed_within(third, 3), "a third connection from the same address is closed"
    assert tcp_works(d, source="127.0.0.2"), "another client still gets in"
    assert d.metric("mskdns_tcp_connections_rejected_total", reason="per_client") >= 1
    for s in held + [third]:
        s.close()
    assert wait_for(lambda: tcp_works(d), timeout=5)
    # A client outside `allow` is closed at accept, before anything is read or answered.
    stranger = connect(d, source="127.0.0.3")
    stranger.sendall(tcp_query("www.example.test"))
    assert closed_within(stranger, 3)
    stranger.close()
    assert d.metric("mskdns_tcp_connections_rejected_total", reason="not_allowed") >= 1
    # Over UDP it still gets REFUSED.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.bind(("127.0.0.3", 0))
        u.settimeout(3)
        u.sendto(dns.message.make_query("www.example.test", "A").to_wire(), (d.host, d.port))
        assert dns.message.from_wire(u.recv(4096)).rcode() == dns.rcode.REFUSED


def test_stray_datagrams_do_not_end_an_upstream_attempt(daemon, nsd):
    """A short datagram, a query with our id and an answer with another id arrive before the
    real answer: each used to end the attempt with SERVFAIL."""
    up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    up.bind(("127.0.0.1", 0))
    up.settimeout(10)

    def serve():
        while True:
            try:
                data, peer = up.recvfrom(4096)
            except OSError:
                return
            q = dns.message.from_wire(data)
            up.sendto(data[:5], peer)
            up.sendto(data, peer)  # QR clear: a query, not an answer
            wrong = dns.message.make_response(q)
            wrong.id = (q.id + 1) & 0xFFFF
            up.sendto(wrong.to_wire(), peer)
            other = dns.message.make_response(dns.message.make_query("other.example.test", "A"))
            other.id = q.id
            up.sendto(other.to_wire(), peer)
            time.sleep(0.05)
            r = dns.message.make_response(q)
            r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", "192.0.2.77"))
            up.sendto(r.to_wire(), peer)

    threading.Thread(target=serve, daemon=True).start()
    try:
        d = daemon(base(up.getsockname()[1]))
        r = ask(d, "stray.example.test")
        assert r.rcode() == dns.rcode.NOERROR and addresses(r) == ["192.0.2.77"]
        up_label = f"127.0.0.1:{up.getsockname()[1]}"
        assert d.metric("mskdns_upstream_ignored_datagrams_total", upstream=up_label) == 4
        assert d.metric("mskdns_upstream_up", upstream=up_label) == 1
    finally:
        up.close()


def test_file_descriptor_limit_sizes_inflight_and_never_marks_upstreams_down(daemon, nsd, tmp_path):
    """With 256 open files, 400 slow misses used to hit EMFILE, which marked a healthy upstream
    down and failed unrelated names."""
    import resource

    from conftest import relay

    slow = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    slow.bind(("127.0.0.1", 0))
    relay(slow, nsd.port, delay=1.0)
    limit = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))  # noqa: E731
    cfg = base(slow.getsockname()[1]).replace("upstream_timeout_ms = 500", "upstream_timeout_ms = 3000")
    d = daemon(cfg, preexec_fn=limit)
    assert d.metric("mskdns_open_files_limit") == 256
    assert d.metric("mskdns_inflight_limit") == 96
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        for i in range(400):
            c.sendto(dns.message.make_query(f"n{i}.example.test", "A").to_wire(), (d.host, d.port))
        c.settimeout(8)
        rcodes = []
        try:
            while len(rcodes) < 400:
                rcodes.append(dns.message.from_wire(c.recv(4096)).rcode())
        except socket.timeout:
            pass
    assert len(rcodes) == 400, "every query is answered"
    assert rcodes.count(dns.rcode.NXDOMAIN) >= 96, "the in-flight ones resolve"
    label = f"127.0.0.1:{slow.getsockname()[1]}"
    assert d.metric("mskdns_upstream_up", upstream=label) == 1
    assert d.metric("mskdns_upstream_errors_total", upstream=label, kind="io") == 0
    assert d.metric("mskdns_upstream_errors_total", upstream=label, kind="local") == 0
    r = ask(d, "www.example.test", timeout=5)
    assert addresses(r) == ["192.0.2.10"]
    slow.close()


def test_soft_open_file_limit_is_raised_to_the_hard_limit(daemon, nsd):
    import resource

    d = daemon(base(nsd.port), preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096)))
    assert d.metric("mskdns_open_files_limit") == 4096
    limits = open(f"/proc/{d.proc.pid}/limits").read()
    line = next(l for l in limits.splitlines() if l.startswith("Max open files"))
    assert line.split()[3:5] == ["4096", "4096"], line


def test_endpoint_addresses_survive_a_restart_while_ec2_is_down(daemon, nsd, moto, tmp_path):
    """The last addresses read from EC2 are kept in the state directory and served at start,
    before (and without) EC2 answering."""
    from test_targets import endpoint

    ep, subnets, ips, _ = endpoint(moto, "10.21.0.0/16", ["us-east-1a", "us-east-1b"])
    state = tmp_path / "state"
    name = "boot-abcd1234.c2.kafka-serverless.us-east-1.amazonaws.com"
    cfg = base(nsd.port) + f"""
[aws]
refresh_secs = 1
state_dir = "{state}"

[[clusters]]
bootstrap = "{name}"
vpc_endpoint = "{ep}"

[[views]]
name = "b"
clients = ["127.0.0.2/32"]
subnet = "{subnets[1]}"
az_affinity = "only"
"""
    d = daemon(cfg, env=moto.env)
    assert wait_for(lambda: (state / "ec2.json").exists(), timeout=10)
    assert sorted(addresses(ask(d, name))) == sorted(ips.values())
    d.stop()
    moto.stop()
    d = daemon(cfg, env=moto.env)
    # At once, with EC2 unreachable: the saved addresses, and the view's saved AZ.
    assert sorted(addresses(ask(d, name))) == sorted(ips.values())
    q = dns.message.make_query(name, "A")
    r = dns.query.udp(q, d.host, port=d.port, source="127.0.0.2", timeout=3)
    assert addresses(r) == [ips["us-east-1b"]]
    status, body = d.http("/readyz")
    assert status == 200 and body.startswith("degraded"), body
