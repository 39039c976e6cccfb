"""Operations: hot reload (SIGHUP and file changes) under load, keeping the last good config."""
import re
import signal
import subprocess
import time

import dns.message
import dns.query

from conftest import require, wait_for

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

    # Fixed again: applied, and /readyz is plain ready once more.
    d.config.write_text(config(nsd.port, "10.1.0.77", 0))
    d.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: answer(d) == ["10.1.0.77"], timeout=3)
    assert d.http("/readyz") == (200, "ready\n")


def test_file_change_reloads_without_a_signal(daemon, nsd):
    d = daemon(config(nsd.port, "10.1.0.10", 1))
    time.sleep(1.1)  # a new modification time even on coarse-grained file systems
    d.config.write_text(config(nsd.port, "10.1.0.42", 1))
    assert wait_for(lambda: answer(d) == ["10.1.0.42"], timeout=5)
