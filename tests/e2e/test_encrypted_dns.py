"""DNS over TLS (RFC 7858) and DNS over HTTPS (RFC 8484) against the real binary, with a test CA:
kdig (+tls, +https, +https-get), dig +https, dnspython's DoH (HTTP/1.1 and HTTP/2, POST and GET)
and DoT clients, and curl over HTTP/2 and HTTP/1.1 give the answers UDP gives, for cluster names,
zone names and forwarded names. Then Cache-Control, each HTTP error, a view chosen by a DoH
listener, answers out of order on one TCP and one DoT connection, and strangers."""
import os
import re
import socket
import ssl
import struct
import subprocess
import time

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from conftest import BIN, recv_exact, relay, require
from pki import CA

A = "boot-abcd1234.c2.kafka-serverless.us-east-1.amazonaws.com"
ZONE = """$ORIGIN kafka.internal.
$TTL 300
@     IN SOA ns hostmaster 1 3600 600 86400 45
@     IN NS  ns
ns    IN A   10.0.5.2
proxy 120 IN A 10.0.5.20
"""
HOST = "dns.test"  # the name the certificate carries (and the DoH URL's host)
# (name, type): a cluster, a zone name, a forwarded name, forwarded NXDOMAIN, zone NXDOMAIN.
CASES = [(A, "A"), ("proxy.kafka.internal", "A"), ("www.example.test", "A"), ("www.example.test", "AAAA"),
         ("nope.example.test", "A"), ("absent.kafka.internal", "A")]


@pytest.fixture
def pki(tmp_path):
    ca = CA(tmp_path / "dns-ca")
    cert, key, _ = ca.issue("dns", dns=[HOST], ips=["127.0.0.1"])
    return ca, cert, key


def config(pki, tmp_path, upstream_port, extra_dns="", extra=""):
    ca, cert, key = pki
    (tmp_path / "internal.zone").write_text(ZONE)
    return f"""
[dns]
listen = ["127.0.0.1:0"]
listen_dot = ["127.0.0.1:0"]
listen_doh = ["127.0.0.1:0"]
tls_cert = "{cert}"
tls_key = "{key}"
upstreams = ["127.0.0.1:{upstream_port}"]
upstream_timeout_ms = 2000
{extra_dns}

[admin]
listen = "127.0.0.1:0"

[[clusters]]
bootstrap = "{A}"
addresses = ["10.1.0.10", "10.1.1.10"]
ttl = 60

[[zones]]
file = "{tmp_path / 'internal.zone'}"
{extra}
"""


def summary(r):
    """What a user compares: the rcode and the answer's records (TTLs left out: they count down)."""
    return dns.rcode.to_text(r.rcode()), sorted(
        f"{rr.name} {dns.rdatatype.to_text(rr.rdtype)} {x}" for rr in r.answer for x in rr
    )


def kdig(port, ca_file, *args):
    out = subprocess.run(
        [require("kdig"), "@127.0.0.1", "-p", str(port), f"+tls-ca={ca_file}", f"+tls-hostname={HOST}", *args],
        capture_output=True, text=True, timeout=20,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def curl(port, ca_file, *args, path="/dns-query"):
    """curl to the DoH listener as https://dns.test:PORT; returns (status, headers, body)."""
    out = subprocess.run(
        [require("curl"), "-s", "--cacert", str(ca_file), "--resolve", f"{HOST}:{port}:127.0.0.1", "-D", "-",
         "-o", "/dev/stdout", *args, f"https://{HOST}:{port}{path}"],
        capture_output=True, timeout=20,
    )
    assert out.returncode == 0, out.stderr
    head, _, body = out.stdout.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
    return status, headers, body


def test_every_client_gets_the_answers_udp_gives(daemon, nsd, pki, tmp_path):
    ca = pki[0]
    d = daemon(config(pki, tmp_path, nsd.port))
    (dot,), (doh,) = d.dot, d.doh
    url = f"https://{HOST}:{doh[1]}/dns-query"
    tls_ctx = ssl.create_default_context(cafile=str(ca.file))
    for name, rtype in CASES:
        q = dns.message.make_query(name, rtype)
        want = summary(dns.query.udp(q, "127.0.0.1", port=d.port, timeout=3))
        got = {
            "dnspython tls": dns.query.tls(q, "127.0.0.1", port=dot[1], ssl_context=tls_ctx, server_hostname=HOST, timeout=5),
        }
        for version in (dns.query.HTTPVersion.H1, dns.query.HTTPVersion.H2):
            for post in (True, False):
                got[f"dnspython {version.name} post={post}"] = dns.query.https(
                    q, url, verify=ssl.create_default_context(cafile=str(ca.file)), bootstrap_address="127.0.0.1", http_version=version, post=post, timeout=5
                )
        for flag in ("--http2", "--http1.1"):
            status, headers, body = post_curl(doh[1], ca.file, flag, q.to_wire())
            assert status == 200 and headers["content-type"] == "application/dns-message", (flag, status)
            got[f"curl {flag}"] = dns.message.from_wire(body)
        for who, r in got.items():
            assert summary(r) == want, (who, name, rtype)
        # kdig and dig print what they got; the answer lines must carry the same records.
        for mode in ("+tls", "+https", "+https-get"):
            text = kdig(dot[1] if mode == "+tls" else doh[1], ca.file, mode, name, rtype)
            assert f"status: {want[0]}" in text, (mode, text)
            for record in want[1]:
                assert record.split()[-1] in text, (mode, record, text)
    text = subprocess.run([require("dig"), "@127.0.0.1", "-p", str(doh[1]), "+https", "+short", A],
                          capture_output=True, text=True, timeout=20).stdout
    assert sorted(text.split()) == ["10.1.0.10", "10.1.1.10"]
    for transport in ("dot", "doh"):
        assert d.metric("mskdns_queries_total", transport=transport) >= len(CASES)


def test_dnsperf_loses_nothing_over_dot_and_doh(daemon, nsd, pki, tmp_path):
    """dnsperf's DoH client takes one response per TLS record it reads and waits for the socket
    before the next: with many answers in one record it timed most of them out. Many queries in
    flight on several connections, each answered."""
    d = daemon(config(pki, tmp_path, nsd.port))
    (dot,), (doh,) = d.dot, d.doh
    queries = tmp_path / "queries.txt"
    queries.write_text("".join(f"{A.replace('boot', f'b{i}', 1)} A\nwww.example.test A\nproxy.kafka.internal A\n" for i in range(30)))
    for mode, port in (("doh", doh[1]), ("dot", dot[1])):
        out = subprocess.run(
            [require("dnsperf"), "-m", mode, "-s", "127.0.0.1", "-p", str(port), "-d", str(queries),
             "-l", "2", "-c", "4", "-q", "100", "-t", "2"],
            capture_output=True, text=True, timeout=30,
        ).stdout
        completed = int(re.search(r"Queries completed:\s+(\d+)", out).group(1))
        lost = int(re.search(r"Queries lost:\s+(\d+)", out).group(1))
        noerror = int(re.search(r"NOERROR (\d+)", out).group(1))
        assert lost == 0 and completed >= 1000 and noerror == completed, (mode, out)


def post_curl(port, ca_file, flag, wire):
    """POSTs one wire-format query with curl (the body from stdin)."""
    out = subprocess.run(
        [require("curl"), "-s", flag, "--cacert", str(ca_file), "--resolve", f"{HOST}:{port}:127.0.0.1", "-D", "-",
         "-H", "content-type: application/dns-message", "--data-binary", "@-", f"https://{HOST}:{port}/dns-query"],
        input=wire, capture_output=True, timeout=20,
    )
    assert out.returncode == 0, out.stderr
    head, _, body = out.stdout.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0].startswith("HTTP/2" if flag == "--http2" else "HTTP/1.1"), lines[0]
    headers = {k.lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def test_cache_control_and_http_errors(daemon, nsd, pki, tmp_path):
    ca = pki[0]
    d = daemon(config(pki, tmp_path, nsd.port))
    port = d.doh[0][1]

    def max_age(name, rtype="A"):
        status, headers, _ = post_curl(port, ca.file, "--http2", dns.message.make_query(name, rtype).to_wire())
        assert status == 200
        return int(headers["cache-control"].removeprefix("max-age="))

    assert max_age(A) == 60  # the cluster's ttl
    assert max_age("proxy.kafka.internal") == 120  # the zone record's own TTL
    assert 0 < max_age("www.example.test") <= 300  # forwarded: the TTL left
    assert 0 < max_age("nope.example.test") <= 30  # NXDOMAIN: the SOA's (negative) TTL

    good = dns.message.make_query(A, "A").to_wire()
    import base64
    b64 = base64.urlsafe_b64encode(good).rstrip(b"=").decode()
    assert curl(port, ca.file, "--http2", path=f"/dns-query?dns={b64}")[0] == 200
    assert curl(port, ca.file, "--http1.1", path=f"/dns-query?dns={b64}")[0] == 200
    cases = [
        (400, ["--http2"], "/dns-query"),  # GET without dns=
        (400, ["--http2"], "/dns-query?dns=***"),  # not base64url
        (400, ["--http2"], "/dns-query?dns=AAAA"),  # three bytes: not a DNS message
        (404, ["--http2"], f"/other?dns={b64}"),
        (405, ["--http2", "-X", "PUT"], "/dns-query"),
    ]
    for want, args, path in cases:
        assert curl(port, ca.file, *args, path=path)[0] == want, (want, path)
    body = tmp_path / "body"
    body.write_bytes(good)
    assert curl(port, ca.file, "--http1.1", "-H", "content-type: text/plain", "--data-binary", f"@{body}")[0] == 415
    body.write_bytes(b"\0" * 70_000)
    for flag in ("--http2", "--http1.1"):
        assert curl(port, ca.file, flag, "-H", "content-type: application/dns-message",
                    "--data-binary", f"@{body}")[0] == 413, flag
    body.write_bytes(b"\x12\x34\x01")
    assert curl(port, ca.file, "--http2", "-H", "content-type: application/dns-message",
                "--data-binary", f"@{body}")[0] == 400
    # The DNS id may be 0 (RFC 8484 section 4.1): it is answered as any other.
    q = dns.message.make_query(A, "A")
    q.id = 0
    status, _, out = post_curl(port, ca.file, "--http2", q.to_wire())
    assert status == 200 and dns.message.from_wire(out).id == 0
    assert d.alive()


def test_a_view_selected_by_a_doh_listener(daemon, nsd, pki, tmp_path):
    ca = pki[0]
    text = config(pki, tmp_path, nsd.port, extra=f"""
[[views]]
name = "route53-rule-vpc-a"
listeners = ["127.0.0.3:0"]
[[views.clusters]]
bootstrap = "{A}"
addresses = ["10.77.0.1"]
""").replace('listen_doh = ["127.0.0.1:0"]', 'listen_doh = ["127.0.0.1:0", "127.0.0.3:0"]')
    d = daemon(text)
    assert [h for h, _ in d.doh] == ["127.0.0.1", "127.0.0.3"]
    q = dns.message.make_query(A, "A")
    url = lambda h, p: f"https://{HOST}:{p}/dns-query"
    plain = dns.query.https(q, url(*d.doh[0]), verify=ssl.create_default_context(cafile=str(ca.file)), bootstrap_address="127.0.0.1",
                            http_version=dns.query.HTTPVersion.H2)
    viewed = dns.query.https(q, url(*d.doh[1]), verify=ssl.create_default_context(cafile=str(ca.file)), bootstrap_address="127.0.0.3",
                             http_version=dns.query.HTTPVersion.H2)
    assert summary(plain)[1] == [f"{A}. A 10.1.0.10", f"{A}. A 10.1.1.10"]
    assert summary(viewed)[1] == [f"{A}. A 10.77.0.1"]


def read_answer(sock):
    size = struct.unpack(">H", recv_exact(sock, 2))[0]
    return dns.message.from_wire(recv_exact(sock, size))


def test_a_slow_miss_does_not_hold_back_the_answers_behind_it(daemon, nsd, pki, tmp_path):
    """On one TCP and one DoT connection: a forwarded name whose upstream takes a second, then a
    cluster name: the cluster's answer comes first, the forwarded one after it (RFC 7766 6.2.1.1)."""
    ca = pki[0]
    slow = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    slow.bind(("127.0.0.1", 0))
    relay(slow, nsd.port, delay=1.0)
    d = daemon(config(pki, tmp_path, slow.getsockname()[1]))
    ctx = ssl.create_default_context(cafile=str(ca.file))
    for kind in ("tcp", "dot"):
        port = d.port if kind == "tcp" else d.dot[0][1]
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        s = ctx.wrap_socket(raw, server_hostname=HOST) if kind == "dot" else raw
        with s:
            first = dns.message.make_query("www.example.test", "A" if kind == "tcp" else "AAAA")
            second = dns.message.make_query(A, "A")
            for q in (first, second):
                w = q.to_wire()
                s.sendall(struct.pack(">H", len(w)) + w)
            started = time.monotonic()
            a1 = read_answer(s)
            took = time.monotonic() - started
            a2 = read_answer(s)
        assert a1.id == second.id and took < 0.5, (kind, took)
        assert a2.id == first.id and a2.rcode() == dns.rcode.NOERROR and a2.answer, kind
    slow.close()


def test_strangers_get_no_handshake_and_a_bad_key_is_named(daemon, nsd, pki, tmp_path):
    ca, cert, key = pki
    d = daemon(config(pki, tmp_path, nsd.port, extra_dns='allow = ["10.0.0.0/8"]'))
    ctx = ssl.create_default_context(cafile=str(ca.file))
    for port in (d.dot[0][1], d.doh[0][1]):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with pytest.raises((ssl.SSLError, OSError)):
                ctx.wrap_socket(raw, server_hostname=HOST)
    assert d.metric("mskdns_tcp_connections_rejected_total", reason="not_allowed", transport="dot") == 1
    assert d.metric("mskdns_tcp_connections_rejected_total", reason="not_allowed", transport="doh") == 1
    assert d.metric("mskdns_tls_handshake_errors_total") == 0
    # `mskdns check` names the key whose file does not load, and the missing pair.
    bad = tmp_path / "bad.toml"
    bad.write_text(config(pki, tmp_path, nsd.port).replace(str(key), str(cert)))
    out = subprocess.run([str(BIN), "check", str(bad)], capture_output=True, text=True)
    assert out.returncode != 0 and "dns.tls_key" in out.stderr, out.stderr
    bad.write_text(config(pki, tmp_path, nsd.port).replace(f'tls_cert = "{cert}"\n', ""))
    out = subprocess.run([str(BIN), "check", str(bad)], capture_output=True, text=True)
    assert out.returncode != 0 and "dns.tls_cert" in out.stderr, out.stderr
