"""DNS cookies (RFC 7873, RFC 9018 server cookies) against the real binary: dig and kdig learn a
server cookie, a client that returns a valid one is never rate-limited, REFUSED answers are
rate-limited too, and BIND with the same secret makes and accepts the same cookies."""
import os
import socket
import subprocess
import time

import dns.edns
import dns.flags
import dns.message
import dns.query
import dns.rcode

from conftest import free_port, require

A = "boot-abcd1234.c2.kafka-serverless.us-east-1.amazonaws.com"
SECRET = "e5e973e5a6b2a43f48e7dc849e37bfcf"


def config(extra=""):
    return f"""
[dns]
listen = ["127.0.0.1:0"]
upstreams = ["127.0.0.1:1"]
allow = ["127.0.0.1/32", "127.0.0.2/32"]
rate_limit = 5
rate_limit_slip = 2
rate_limit_ipv4_prefix = 32
rate_limit_exempt = []
cookie_secret = "{SECRET}"
{extra}

[admin]
listen = "127.0.0.1:0"

[[clusters]]
bootstrap = "{A}"
addresses = ["10.1.0.10"]
"""


def server_cookie(resp):
    for o in resp.options:
        if o.otype == dns.edns.OptionType.COOKIE:
            return o.client, o.server
    return None


def burst(d, source, client_cookie=None, server=b"", n=60, name=A):
    """Sends n queries from `source` at once; returns (full answers, truncated, refused)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((source, 0))
    s.settimeout(0.5)
    opts = [dns.edns.CookieOption(client_cookie, server)] if client_cookie else []
    for i in range(n):
        q = dns.message.make_query(name, "A", use_edns=0, options=opts)
        q.id = i
        s.sendto(q.to_wire(), (d.host, d.port))
    full = tc = refused = 0
    try:
        while True:
            r = dns.message.from_wire(s.recv(4096))
            if r.rcode() == dns.rcode.REFUSED:
                refused += 1
            elif r.flags & dns.flags.TC:
                tc += 1
            else:
                full += 1
    except socket.timeout:
        pass
    s.close()
    return full, tc, refused


def test_dig_and_kdig_learn_a_server_cookie(daemon):
    d = daemon(config())
    out = subprocess.run([require("dig"), "+cookie", "@" + d.host, "-p", str(d.port), A], capture_output=True, text=True).stdout
    line = next(l for l in out.splitlines() if "COOKIE:" in l)
    cookie = line.split()[2]
    assert line.endswith("(good)"), line
    assert len(cookie) == 48 and cookie[16:24] == "01000000", cookie
    # Sent back, it is accepted (dig checks the echoed client cookie, we the server part).
    out = subprocess.run([require("dig"), f"+cookie={cookie}", "@" + d.host, "-p", str(d.port), A], capture_output=True, text=True).stdout
    assert "(good)" in out and "10.1.0.10" in out, out
    out = subprocess.run([require("kdig"), "+cookie", "@" + d.host, "-p", str(d.port), A], capture_output=True, text=True).stdout
    assert "COOKIE:" in out and "10.1.0.10" in out, out


def test_a_valid_server_cookie_is_never_rate_limited(daemon):
    d = daemon(config())
    client = os.urandom(8)
    q = dns.message.make_query(A, "A", use_edns=0, options=[dns.edns.CookieOption(client, b"")])
    r = dns.query.udp(q, d.host, port=d.port, timeout=3)
    echoed, server = server_cookie(r)
    assert echoed == client and len(server) == 16
    full, tc, _ = burst(d, "127.0.0.1", client, server)
    assert (full, tc) == (60, 0)
    # Without the server cookie (or with someone else's) the same client is limited.
    full, tc, _ = burst(d, "127.0.0.1", client)
    assert full <= 10 and tc > 0, (full, tc)
    full, tc, _ = burst(d, "127.0.0.1", os.urandom(8), server)
    assert full <= 10, full
    # A cookie made for another address is no good from here.
    full, _, _ = burst(d, "127.0.0.2", client, server)
    assert full <= 10, full


def test_refused_answers_are_rate_limited(daemon):
    d = daemon(config())
    _, _, refused = burst(d, "127.0.0.3")
    assert 1 <= refused <= 40, refused
    assert d.metric("mskdns_responses_total", outcome="rate_limited") >= 20


def test_loopback_is_exempt_by_default(daemon):
    d = daemon(config().replace("rate_limit_exempt = []\n", ""))
    full, tc, _ = burst(d, "127.0.0.1")
    assert (full, tc) == (60, 0)


def start_named(tmp_path, port):
    named = require("named")
    (tmp_path / "named").mkdir()
    (tmp_path / "named" / "zone").write_text(
        f"$TTL 60\n@ IN SOA ns hostmaster 1 3600 600 86400 60\n@ IN NS ns\nns IN A 10.0.0.1\n{A}. IN A 10.9.9.9\n"
    )
    conf = tmp_path / "named" / "named.conf"
    conf.write_text(f"""options {{
  directory "{tmp_path}/named";
  listen-on port {port} {{ 127.0.0.1; }};
  listen-on-v6 {{ none; }};
  pid-file none;
  recursion no;
  cookie-algorithm siphash24;
  cookie-secret "{SECRET}";
  require-server-cookie yes;
}};
zone "kafka-serverless.us-east-1.amazonaws.com" {{ type primary; file "zone"; }};
""")
    proc = subprocess.Popen([named, "-g", "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "named" / "log", "w"))
    deadline = time.time() + 15
    while time.time() < deadline:
        try:
            dns.query.udp(dns.message.make_query(A, "A"), "127.0.0.1", port=port, timeout=0.5)
            return proc
        except Exception:
            if proc.poll() is not None:
                raise RuntimeError((tmp_path / "named" / "log").read_text())
    raise RuntimeError("named did not start")


def test_cookies_interoperate_with_bind(daemon, tmp_path):
    """RFC 9018: servers sharing a secret make the same cookie for the same client, address and
    second, and accept each other's."""
    port = free_port()
    named = start_named(tmp_path, port)
    try:
        d = daemon(config())
        client = os.urandom(8)
        opts = [dns.edns.CookieOption(client, b"")]
        for _ in range(5):
            ours = server_cookie(dns.query.udp(dns.message.make_query(A, "A", use_edns=0, options=opts), d.host, port=d.port, timeout=3))[1]
            bind = server_cookie(dns.query.udp(dns.message.make_query(A, "A", use_edns=0, options=opts), "127.0.0.1", port=port, timeout=3))[1]
            # The same second in both (bytes 4-8 of the server cookie; BIND's clock is the time its
            # event loop last looked, which may lag a second behind): else try again.
            if ours[4:8] == bind[4:8]:
                break
            time.sleep(0.3)
        assert ours == bind, (ours.hex(), bind.hex())
        # BIND's cookie lifts our rate limit.
        full, tc, _ = burst(d, "127.0.0.1", client, bind)
        assert (full, tc) == (60, 0)
        # Ours, presented to BIND (which requires a valid server cookie) a few seconds later, is
        # valid there: it answers, where a forged one gets BADCOOKIE.
        time.sleep(2)
        ask = lambda server: dns.query.udp(  # noqa: E731
            dns.message.make_query(A, "A", use_edns=0, options=[dns.edns.CookieOption(client, server)]),
            "127.0.0.1", port=port, timeout=3)
        r = ask(ours)
        assert r.rcode() == dns.rcode.NOERROR and [x.to_text() for rr in r.answer for x in rr] == ["10.9.9.9"]
        forged = ours[:8] + bytes(8)
        assert ask(forged).rcode() == dns.rcode.BADCOOKIE
    finally:
        named.terminate()
        named.wait(timeout=10)
