"""Operations: hot reload (SIGHUP and file changes) under load, keeping the last good config."""
import re
import signal
import socket
import subprocess
import time

import dns.exception
import dns.flags
import dns.message
import dns.rdatatype
import dns.query
import dns.rcode

from conftest import Daemon, relay, require, wait_for

A = "boot-abcd1234.c2.kafka-serverless.us-east-1.amazonaws.com"


def config(nsd_port, address, poll_secs, ttl="60"):
    return f"""
[dns]
listen = ["127.0.0.1:0"]
upstreams = ["127.0.0.1:{nsd_port}"]

[admin]
listen = "127.0.0.1:0"

[reload]
poll_secs = {poll_secs}

[[clusters]]
bootstrap = "{A}"
addresses = ["{address}"]
ttl = {ttl}
"""


def answer(d):
    r = dns.query.udp(dns.message.make_query(A, "A"), d.host, port=d.port, timeout=3)
    return [x.to_text() for rrset in r.answer for x in rrset]


def test_sighup_reload_under_load(daemon, nsd, tmp_path):
    d = daemon(config(nsd.port, "10.1.0.10", 0))
    queries = tmp_path / "queries.txt"
    queries.write_text("".join(f"{A.replace('boot', f'b{i}', 1)} A\nwww.example.test A\n" for i in range(50)))
    load = subprocess.Popen(
        [require("dnsperf"), "-s", d.host, "-p", str(d.port), "-d", str(queries), "-l", "4", "-Q", "3000", "-t", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    time.sleep(1)
    d.config.write_text(config(nsd.port, "10.1.0.99", 0))
    d.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: answer(d) == ["10.1.0.99"], timeout=3)
    out = load.communicate(timeout=30)[0]
    completed = int(re.search(r"Queries completed:\s+(\d+)", out).group(1))
    lost = int(re.search(r"Queries lost:\s+(\d+)", out).group(1))
    assert completed > 5000 and lost == 0, out
    assert d.metric("mskdns_config_reloads_total", result="ok") == 1

    # A bad file: the running configuration stays, the error is counted and named on /readyz.
    d.config.write_text(config(nsd.port, "10.1.0.55", 0, ttl='"soon"'))
    d.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: d.metric("mskdns_config_reloads_total", result="error") == 1, timeout=3)
    assert answer(d) == ["10.1.0.99"]
    status, body = d.http("/readyz")
    assert status == 200 and "degraded" in body and "clusters" in body and "ttl" in body, body
    assert d.alive()

    # Other listen addresses need new sockets: refused as a whole, named on /readyz.
    d.config.write_text(config(nsd.port, "10.1.0.66", 0).replace('listen = ["127.0.0.1:0"]', 'listen = ["127.0.0.1:0", "127.0.0.2:0"]', 1))
    d.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: d.metric("mskdns_config_reloads_total", result="error") == 2, timeout=3)
    assert answer(d) == ["10.1.0.99"] and "dns.listen" in d.http("/readyz")[1]

    # Fixed again: applied, and /readyz is plain ready once more.
    d.config.write_text(config(nsd.port, "10.1.0.77", 0))
    d.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: answer(d) == ["10.1.0.77"], timeout=3)
    assert d.http("/readyz") == (200, "ready\n")


def test_sighup_the_moment_it_is_ready_reloads_and_never_ends_it(nsd, tmp_path):
    """`ready` (and systemd's READY=1) is said once every handler is in place: a reload at once,
    as `systemctl reload` right after start sends it, must not meet SIGHUP's default action."""
    for i in range(20):
        d = Daemon(config(nsd.port, "10.1.0.10", 0), tmp_path, name=f"ready-{i}.toml")
        try:
            d.config.write_text(config(nsd.port, "10.1.0.11", 0))
            d.proc.send_signal(signal.SIGHUP)

            def reloaded():
                try:
                    return not d.alive() or answer(d) == ["10.1.0.11"]
                except dns.exception.Timeout:
                    return False

            ok = wait_for(reloaded, timeout=3)
            assert d.alive(), f"run {i}: SIGHUP ended the daemon (exit {d.proc.returncode})"
            assert ok, f"run {i}: not reloaded"
        finally:
            d.stop()


def test_file_change_reloads_without_a_signal(daemon, nsd):
    d = daemon(config(nsd.port, "10.1.0.10", 1))
    time.sleep(1.1)  # a new modification time even on coarse-grained file systems
    d.config.write_text(config(nsd.port, "10.1.0.42", 1))
    assert wait_for(lambda: answer(d) == ["10.1.0.42"], timeout=5)


def test_serve_stale_within_the_window_then_servfail(daemon, nsd):
    """RFC 8767: with the upstream down, an expired answer is served (TTL 30) within the
    window, SERVFAIL after it; with the upstream back, answers are fresh again."""
    d = daemon(f"""
[dns]
listen = ["127.0.0.1:0"]
upstreams = ["127.0.0.1:{nsd.port}"]
upstream_timeout_ms = 200
[admin]
listen = "127.0.0.1:0"
[cache]
serve_stale_secs = 4
""")
    ask = lambda: dns.query.udp(dns.message.make_query("quick.example.test", "A"), d.host, port=d.port, timeout=3)
    r = ask()
    stored = time.monotonic()
    assert [x.to_text() for x in r.answer[0]] == ["192.0.2.12"] and r.answer[0].ttl == 2
    nsd.stop()
    time.sleep(2.2)  # past the TTL, inside the window
    r = ask()
    assert r.rcode() == dns.rcode.NOERROR and [x.to_text() for x in r.answer[0]] == ["192.0.2.12"]
    assert r.answer[0].ttl == 30
    assert d.metric("mskdns_responses_total", outcome="stale") == 1
    time.sleep(max(0, stored + 2 + 4 + 1.2 - time.monotonic()))  # past TTL + window
    assert ask().rcode() == dns.rcode.SERVFAIL
    nsd.start()
    r = ask()
    assert r.rcode() == dns.rcode.NOERROR and r.answer[0].ttl == 2


def test_any_is_answered_per_rfc8482(daemon, nsd):
    d = daemon(config(nsd.port, "10.1.0.10", 0))
    r = dns.query.udp(dns.message.make_query("www.example.test", "ANY"), d.host, port=d.port, timeout=3)
    assert r.rcode() == dns.rcode.NOERROR
    assert [rr.rdtype for rr in r.answer] == [dns.rdatatype.HINFO]
    assert r.answer[0][0].cpu == b"RFC8482"
    # Our own cluster names answer ANY with their addresses.
    r = dns.query.udp(dns.message.make_query(A, "ANY"), d.host, port=d.port, timeout=3)
    assert [x.to_text() for rrset in r.answer for x in rrset] == ["10.1.0.10"]


def test_rate_limit_per_client(daemon, nsd):
    """A client over its limit gets drops and truncated answers; another is unaffected."""
    d = daemon(config(nsd.port, "10.1.0.10", 0).replace(
        "[admin]", "rate_limit = 20\nrate_limit_ipv4_prefix = 32\nrate_limit_exempt = []\n\n[admin]"))
    loud = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    loud.bind(("127.0.0.2", 0))
    loud.settimeout(0.5)
    query = dns.message.make_query(A, "A")
    for i in range(200):
        query.id = i
        loud.sendto(query.to_wire(), (d.host, d.port))
    answered = truncated = 0
    try:
        while True:
            r = dns.message.from_wire(loud.recv(4096))
            if r.flags & dns.flags.TC:
                truncated += 1
            else:
                answered += 1
    except socket.timeout:
        pass
    assert 15 <= answered <= 30, answered
    assert truncated > 20 and answered + truncated < 200, (answered, truncated)
    # The quiet client on another address gets every answer.
    for _ in range(15):
        r = dns.query.udp(dns.message.make_query(A, "A"), d.host, port=d.port, source="127.0.0.3", timeout=3)
        assert [x.to_text() for rrset in r.answer for x in rrset] == ["10.1.0.10"]
    # TCP is not limited: the loud client still gets its answer there.
    r = dns.query.tcp(dns.message.make_query(A, "A"), d.host, port=d.port, source="127.0.0.2", timeout=3)
    assert [x.to_text() for rrset in r.answer for x in rrset] == ["10.1.0.10"]
    assert d.metric("mskdns_responses_total", outcome="rate_limited") > 100


def test_upstream_health_orders_and_probes(daemon, nsd):
    """A silent upstream is marked down by its first timeout and tried last; an active probe
    marks it up again once it answers."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    silent_addr = f"127.0.0.1:{silent.getsockname()[1]}"
    d = daemon(f"""
[dns]
listen = ["127.0.0.1:0"]
upstreams = ["{silent_addr}", "127.0.0.1:{nsd.port}"]
upstream_timeout_ms = 300
[admin]
listen = "127.0.0.1:0"
""")
    ask = lambda n: dns.query.udp(dns.message.make_query(n, "A"), d.host, port=d.port, timeout=3)
    t0 = time.monotonic()
    assert ask("n0.example.test").rcode() == dns.rcode.NXDOMAIN
    assert time.monotonic() - t0 >= 0.25, "the silent upstream was tried first, in config order"
    assert d.metric("mskdns_upstream_up", upstream=silent_addr) == 0
    t0 = time.monotonic()
    assert ask("www.example.test").rcode() == dns.rcode.NOERROR
    assert time.monotonic() - t0 < 0.2, "a down upstream is tried last"
    assert d.metric("mskdns_upstream_up", upstream=f"127.0.0.1:{nsd.port}") == 1

    # It comes back: relay what it receives to nsd. The probe notices within a second or two.
    relay(silent, nsd.port)
    assert wait_for(lambda: d.metric("mskdns_upstream_up", upstream=silent_addr) == 1, timeout=5)
    silent.close()


def test_popular_names_are_prefetched(daemon, nsd):
    """A cached answer asked for in the last tenth of its TTL is refreshed in the background."""
    d = daemon(config(nsd.port, "10.1.0.10", 0))
    ask = lambda: dns.query.udp(dns.message.make_query("warm.example.test", "A"), d.host, port=d.port, timeout=3)
    assert ask().answer[0].ttl == 10
    time.sleep(9.2)
    assert ask().answer[0].ttl <= 1  # still the cached answer, now refreshed behind it
    assert wait_for(lambda: d.metric("mskdns_cache_prefetches_total") == 1, timeout=3)
    hits = d.metric("mskdns_cache_hits_total")
    r = ask()
    assert r.answer[0].ttl >= 9, "the refreshed answer"
    assert d.metric("mskdns_cache_hits_total") == hits + 1 and d.metric("mskdns_cache_misses_total") == 1
