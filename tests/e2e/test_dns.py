"""End to end: the real mskdns binary, queried with dnspython, dig and kdig, forwarding to nsd."""
import os
import random
import socket
import struct
import subprocess
import threading
import time

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from conftest import BIN, relay, require

A = "boot-abcd1234.c2.kafka-serverless.us-east-1.amazonaws.com"
B = "boot-ef567890.c3.kafka-serverless.us-east-1.amazonaws.com"


def two_clusters(upstream_port, extra=""):
    return f"""
[dns]
listen = ["127.0.0.1:0"]
upstreams = ["127.0.0.1:{upstream_port}"]
upstream_timeout_ms = 500

[admin]
listen = "127.0.0.1:0"

[[clusters]]
bootstrap = "{A}"
addresses = ["10.1.0.10", "10.1.1.10"]
ttl = 60

[[clusters]]
bootstrap = "{B}"
addresses = ["10.2.0.10", "fd00::2:10"]
ttl = 30
{extra}
"""


def ask(d, name, rtype="A", tcp=False, **kw):
    q = dns.message.make_query(name, rtype, **kw)
    send = dns.query.tcp if tcp else dns.query.udp
    return send(q, d.host, port=d.port, timeout=3)


def addresses(resp):
    return sorted(r.to_text() for rrset in resp.answer for r in rrset)


def test_each_cluster_answers_its_own_addresses(daemon, nsd):
    d = daemon(two_clusters(nsd.port))
    for first in ["boot", "b1", "b97", "b0437", "b0001"]:
        name_a = A.replace("boot", first, 1)
        name_b = B.replace("boot", first, 1)
        ra = ask(d, name_a)
        rb = ask(d, name_b)
        assert ra.rcode() == dns.rcode.NOERROR
        assert addresses(ra) == ["10.1.0.10", "10.1.1.10"], name_a
        assert addresses(rb) == ["10.2.0.10"], name_b
        assert ra.answer[0].ttl == 60 and rb.answer[0].ttl == 30
        assert ra.flags & dns.flags.AA
    assert addresses(ask(d, B, "AAAA")) == ["fd00::2:10"]
    assert d.metric("mskdns_cluster_answers_total", cluster="abcd1234.c2.us-east-1") == 5


def test_mixed_case_is_echoed(daemon, nsd):
    d = daemon(two_clusters(nsd.port))
    name = "B0437-AbCd1234.C2.Kafka-Serverless.US-EAST-1.amazonaws.COM."
    r = ask(d, name)
    assert r.question[0].name.to_text() == name
    assert addresses(r) == ["10.1.0.10", "10.1.1.10"]
    assert r.answer[0].name.to_text() == name
    # The same through dig, a different client implementation.
    out = subprocess.run(
        [require("dig"), "-p", str(d.port), "@127.0.0.1", name, "A", "+noall", "+question", "+answer"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert f";{name}" in out
    assert sorted(line.split()[-1] for line in out.splitlines() if line and not line.startswith(";")) == ["10.1.0.10", "10.1.1.10"]


def test_other_family_is_nodata_with_soa(daemon, nsd):
    d = daemon(two_clusters(nsd.port))
    for rtype in ["AAAA", "TXT", "MX"]:
        r = ask(d, A.replace("boot", "b12", 1), rtype)
        assert r.rcode() == dns.rcode.NOERROR
        assert r.answer == []
        assert len(r.authority) == 1 and r.authority[0].rdtype == dns.rdatatype.SOA
        assert r.authority[0].name.to_text() == "kafka-serverless.us-east-1.amazonaws.com."
        assert r.authority[0].ttl == 60


def test_tcp_answers_equal_udp(daemon, nsd):
    d = daemon(two_clusters(nsd.port))
    cases = [(A, "A"), (A.replace("boot", "b7", 1), "AAAA"), (B, "AAAA"), (B, "A"), ("www.example.test", "A"),
             ("nope.example.test", "A"), ("www.example.test", "AAAA")]
    for name, rtype in cases:
        u, t = ask(d, name, rtype), ask(d, name, rtype, tcp=True)
        assert u.rcode() == t.rcode(), name
        assert addresses(u) == addresses(t), name
        assert [r.to_text() for r in u.authority] == [r.to_text() for r in t.authority] or name.startswith("nope"), name
    # kdig over TCP sees the same cluster answer.
    out = subprocess.run(
        [require("kdig"), "-p", str(d.port), "@127.0.0.1", "+tcp", "+short", A.replace("boot", "b97", 1), "A"],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    assert sorted(out) == ["10.1.0.10", "10.1.1.10"]


def test_edns_is_echoed_and_big_answers_truncate(daemon, nsd):
    many = ", ".join(f'"10.9.0.{i}"' for i in range(1, 41))
    extra = f'[[clusters]]\nbootstrap = "boot-many.c1.kafka-serverless.eu-west-1.amazonaws.com"\naddresses = [{many}]\n'
    d = daemon(two_clusters(nsd.port, extra))
    r = ask(d, A, use_edns=0, payload=4096)
    assert r.edns == 0 and r.payload == 1232
    assert ask(d, A).edns == -1, "no OPT in the answer to a query without one"
    big = "b3-many.c1.kafka-serverless.eu-west-1.amazonaws.com"
    r = ask(d, big)
    assert r.flags & dns.flags.TC and r.answer == []
    assert len(addresses(ask(d, big, tcp=True))) == 40
    assert len(addresses(ask(d, big, use_edns=0, payload=1232))) == 40
    # A forwarded answer too large for 512 bytes is truncated too, and complete over TCP.
    r = ask(d, "big.example.test", "TXT")
    assert r.flags & dns.flags.TC
    assert len(ask(d, "big.example.test", "TXT", tcp=True).answer[0]) == 13


def test_forwarded_names_are_cached(daemon, nsd):
    d = daemon(two_clusters(nsd.port))
    r1 = ask(d, "www.example.test")
    assert addresses(r1) == ["192.0.2.10"] and r1.answer[0].ttl == 300
    hits = d.metric("mskdns_cache_hits_total")
    time.sleep(1.1)
    r2 = ask(d, "WWW.Example.Test")
    assert addresses(r2) == ["192.0.2.10"]
    assert r2.answer[0].ttl < 300, "the TTL counts down in cached answers"
    assert r2.question[0].name.to_text() == "WWW.Example.Test."
    assert d.metric("mskdns_cache_hits_total") == hits + 1
    # NXDOMAIN is cached too (RFC 2308), with the SOA minimum as its TTL.
    n1 = ask(d, "missing.example.test")
    assert n1.rcode() == dns.rcode.NXDOMAIN and n1.authority[0].ttl == 30
    hits = d.metric("mskdns_cache_hits_total")
    n2 = ask(d, "missing.example.test")
    assert n2.rcode() == dns.rcode.NXDOMAIN
    assert d.metric("mskdns_cache_hits_total") == hits + 1
    # With the upstream gone, cached names still answer; new ones get SERVFAIL in time.
    nsd.stop()
    assert addresses(ask(d, "www.example.test")) == ["192.0.2.10"]
    t0 = time.monotonic()
    r = ask(d, "other.example.test")
    took = time.monotonic() - t0
    assert r.rcode() == dns.rcode.SERVFAIL
    assert took < 2 * 0.5, f"SERVFAIL took {took:.2f}s"


def test_servfail_in_time_when_upstream_is_silent(daemon, tmp_path):
    # A bound socket that never answers: every attempt must time out.
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    silent2 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent2.bind(("127.0.0.1", 0))
    d = daemon(f"""
[dns]
listen = ["127.0.0.1:0"]
upstreams = ["127.0.0.1:{silent.getsockname()[1]}", "127.0.0.1:{silent2.getsockname()[1]}"]
upstream_timeout_ms = 400
[admin]
listen = "127.0.0.1:0"
""")
    t0 = time.monotonic()
    r = ask(d, "www.example.test")
    took = time.monotonic() - t0
    assert r.rcode() == dns.rcode.SERVFAIL
    assert took < 2 * 0.4 + 0.15, f"SERVFAIL took {took:.2f}s"
    assert d.metric("mskdns_upstream_errors_total", kind="timeout") >= 1


def test_one_upstream_query_per_name_in_flight(daemon, nsd, tmp_path):
    """Fifty clients ask for one name at once; the upstream sees it once."""
    relay_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    relay_sock.bind(("127.0.0.1", 0))
    seen = []
    relay(relay_sock, nsd.port, delay=0.3, seen=seen)  # holds each query 300 ms
    d = daemon(f"""
[dns]
listen = ["127.0.0.1:0"]
upstreams = ["127.0.0.1:{relay_sock.getsockname()[1]}"]
upstream_timeout_ms = 2000
[admin]
listen = "127.0.0.1:0"
""")
    results = []
    threads = [threading.Thread(target=lambda: results.append(ask(d, "www.example.test"))) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 50 and all(addresses(r) == ["192.0.2.10"] for r in results)
    # Retransmissions repeat the same query (same id); one id means one upstream query.
    ids = {struct.unpack(">H", q[:2])[0] for q in seen}
    assert len(ids) == 1, f"upstream asked {len(ids)} different queries"
    assert all(q[2:] == seen[0][2:] for q in seen)
    relay_sock.close()


def test_clients_outside_allow_are_refused(daemon, nsd):
    d = daemon(two_clusters(nsd.port).replace("upstream_timeout_ms = 500", 'upstream_timeout_ms = 500\nallow = ["127.0.0.2/32"]'))
    q = dns.message.make_query(A, "A")
    r = dns.query.udp(q, "127.0.0.1", port=d.port, source="127.0.0.1", timeout=3)
    assert r.rcode() == dns.rcode.REFUSED and r.answer == []
    # Over TCP a stranger is closed at accept: no work is done for it, not even a REFUSED.
    with pytest.raises((ConnectionResetError, EOFError, BrokenPipeError)):
        dns.query.tcp(dns.message.make_query("www.example.test", "A"), "127.0.0.1", port=d.port, source="127.0.0.1", timeout=3)
    assert d.metric("mskdns_tcp_connections_rejected_total", reason="not_allowed") == 1
    r = dns.query.udp(q, "127.0.0.1", port=d.port, source="127.0.0.2", timeout=3)
    assert addresses(r) == ["10.1.0.10", "10.1.1.10"]
    assert d.metric("mskdns_responses_total", outcome="refused") == 1


def mutations(rng, valid):
    """Random bytes, truncated queries and bit-flipped queries."""
    kind = rng.randrange(4)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 600))
    if kind == 1:
        return valid[: rng.randrange(0, len(valid))]
    if kind == 2:
        b = bytearray(valid)
        for _ in range(rng.randrange(1, 6)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    # A plausible header with garbage after it, QR clear so it is taken for a query.
    return struct.pack(">HHHHHH", rng.randrange(65536), 0x0100, rng.randrange(3), rng.randrange(3), rng.randrange(3), rng.randrange(3)) + rng.randbytes(rng.randrange(0, 300))


def test_garbage_does_not_crash_the_daemon(daemon, nsd):
    d = daemon(two_clusters(nsd.port))
    rng = random.Random(20261123)
    valid = [dns.message.make_query(n, t, use_edns=e).to_wire() for n in (A, "www.example.test", "b1-x.c1.kafka-serverless.us-east-1.amazonaws.com") for t in ("A", "AAAA") for e in (None, 0)]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(10_000):
        s.sendto(mutations(rng, rng.choice(valid)), (d.host, d.port))
        if i % 500 == 0:
            time.sleep(0.01)  # let the receive queue drain: this tests parsing, not overload
    for _ in range(200):
        with socket.create_connection((d.host, d.port), timeout=3) as t:
            pkt = mutations(rng, rng.choice(valid))
            t.sendall(struct.pack(">H", len(pkt)) + pkt)
    # A readable header with a broken question gets FORMERR with the id echoed.
    # (A fresh socket: the first one's receive buffer is full of answers to the garbage.)
    bad = struct.pack(">HHHHHH", 0xBEEF, 0x0100, 1, 0, 0, 0) + b"\x05abc"
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.sendto(bad, (d.host, d.port))
    resp, _ = s.recvfrom(4096)
    assert resp[:2] == b"\xbe\xef"
    assert resp[3] & 0xF == dns.rcode.FORMERR
    assert d.alive()
    assert addresses(ask(d, A)) == ["10.1.0.10", "10.1.1.10"]
    assert addresses(ask(d, "www.example.test")) == ["192.0.2.10"]
    # The garbage connections end once their misses are answered or time out upstream; until then
    # they count against this client's cap of 64 (dns.max_tcp_connections_per_client).
    deadline = time.time() + 15
    while d.metric("mskdns_tcp_connections_active") > 0 and time.time() < deadline:
        time.sleep(0.1)
    assert d.metric("mskdns_tcp_connections_active") == 0
    assert addresses(ask(d, A, tcp=True)) == ["10.1.0.10", "10.1.1.10"]
    assert d.metric("mskdns_responses_total", outcome="formerr") > 0


def test_static_zone_files_answer(daemon, nsd):
    zone = os.path.join(os.path.dirname(__file__), "..", "..", "zones", "kafka.internal.zone")
    d = daemon(two_clusters(nsd.port, f'[[zones]]\nfile = "{os.path.abspath(zone)}"\n'))
    r = ask(d, "proxy.kafka.internal")
    assert r.rcode() == dns.rcode.NOERROR and addresses(r) == ["10.0.5.20"]
    r = ask(d, "absent.kafka.internal")
    assert r.rcode() == dns.rcode.NXDOMAIN and r.authority[0].rdtype == dns.rdatatype.SOA


def test_health_and_metrics_endpoints(daemon, nsd):
    d = daemon(two_clusters(nsd.port))
    assert d.http("/healthz") == (200, "ok\n")
    assert d.http("/readyz") == (200, "ready\n")
    ask(d, A)
    ask(d, "www.example.test")
    _, text = d.http("/metrics")
    for name in ["mskdns_responses_total", "mskdns_cache_misses_total", "mskdns_upstream_duration_seconds_bucket", "mskdns_cluster_answers_total", "mskdns_cache_entries"]:
        assert name in text, name
    # The default cache (64 MiB) sets aside under 3 MiB for its front table.
    assert 0 < d.metric("mskdns_cache_front_reserved_bytes") < 3 * 1024 * 1024


def test_sigterm_stops_cleanly(daemon, nsd):
    d = daemon(two_clusters(nsd.port))
    ask(d, A)
    assert d.stop() == 0


def test_check_names_the_bad_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[clusters]]\nbootstrap = "boot-x.c2.kafka-serverless.us-east-1.amazonaws.com"\naddresses = ["10.0.0.1"]\nttl = 9999999\n')
    r = subprocess.run([str(BIN), "check", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0
    assert "clusters[0].ttl" in r.stderr and "bad.toml" in r.stderr
    bad.write_text('[dns]\nlisten = ["127.0.0.1:53", "not an address"]\n')
    r = subprocess.run([str(BIN), "check", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0 and "dns.listen" in r.stderr


def test_every_example_config_checks(tmp_path):
    """The examples under zones/ cannot rot: each must pass `mskdns check`."""
    zones = os.path.join(os.path.dirname(__file__), "..", "..", "zones")
    examples = [f for f in os.listdir(zones) if f.endswith(".toml")]
    assert examples
    for f in examples:
        r = subprocess.run([str(BIN), "check", os.path.join(zones, f)], capture_output=True, text=True)
        assert r.returncode == 0, f"{f}: {r.stderr}"


def test_runs_on_the_built_in_default(tmp_path):
    """No arguments: loopback, an unprivileged port, upstreams from /etc/resolv.conf.

    Nothing is forwarded here (test traffic stays on loopback): the chosen upstreams are read
    from the log, and a malformed query proves the listener answers.
    """
    # The default ports may be taken on a busy machine; the env layer moves them, nothing else.
    env = {**os.environ, "MSKDNS_DNS__LISTEN": '["127.0.0.1:0"]', "MSKDNS_ADMIN__LISTEN": "127.0.0.1:0", "RUST_LOG": "info"}
    log = open(tmp_path / "default.log", "w+")
    p = subprocess.Popen([str(BIN)], stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    try:
        lines = [p.stdout.readline().strip() for _ in range(3)]
        assert lines[0].startswith("listening dns 127.0.0.1:"), lines
        assert lines[2] == "ready", lines
        port = int(lines[0].rsplit(":", 1)[1])
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(3)
        s.sendto(struct.pack(">HHHHHH", 7, 0x0100, 2, 0, 0, 0), ("127.0.0.1", port))
        resp = s.recv(512)
        assert resp[:2] == b"\x00\x07" and resp[3] & 0xF == dns.rcode.FORMERR
        with open("/etc/resolv.conf") as f:
            servers = [l.split()[1] for l in f if l.startswith("nameserver")]
        assert servers
        deadline = time.time() + 5
        while True:
            log.seek(0)
            text = log.read()
            if all(f"{ip}:53" in text for ip in servers if ":" not in ip) or time.time() > deadline:
                break
            time.sleep(0.05)
        assert all(f"{ip}:53" in text for ip in servers if ":" not in ip), text
    finally:
        p.terminate()
        p.wait(timeout=10)
