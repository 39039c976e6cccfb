"""The query log against the real binary, read by real readers: dnstap over a Frame Streams socket
captured by `fstrm_capture` and to a file, decoded by the `dnstap` CLI and by `dnstap-ldns`; JSON
lines in Route 53 Resolver's format; sampling; a collector that stops reading, before or after the
handshake; a full disk; a reload that starts and stops the log."""

import json
import signal
import socket
import struct
import subprocess
import threading
import time

import dns.message
import dns.query
import dns.rcode
import pytest

from conftest import Daemon, recv_exact, require, wait_for
from pki import CA
from test_upstream_budget import LimitedUpstream

A = "boot-abcd1234.c2.kafka-serverless.us-east-1.amazonaws.com"
HOST = "dns.test"


def config(upstream, log, allow="127.0.0.1/32", extra_dns=""):
    return f"""
[dns]
listen = ["127.0.0.1:0"]
upstreams = ["{upstream.addr}"]
allow = ["{allow}"]
rate_limit = 0
{extra_dns}

[admin]
listen = "127.0.0.1:0"

[[clusters]]
bootstrap = "{A}"
addresses = ["10.1.0.10"]
ttl = 60

{log}
"""


def ask(d, name, source="127.0.0.1", rtype="A"):
    q = dns.message.make_query(name, rtype)
    return dns.query.udp(q, d.host, port=d.port, source=source, timeout=3)


def queries(d):
    """An MSK name, a forwarded name, the same again (from the cache), and a refused client."""
    assert ask(d, A).answer
    assert ask(d, "www.example.test").answer
    assert ask(d, "www.example.test").answer
    assert ask(d, "www.example.test", source="127.0.0.2").rcode() == dns.rcode.REFUSED


def log_text(d):
    d.log.flush()
    d.log.seek(0)
    return d.log.read()


def decode(tool, path):
    if tool == "dnstap":
        out = subprocess.run(["dnstap", "-r", str(path), "-y"], capture_output=True, text=True, timeout=30)
    else:
        out = subprocess.run(["dnstap-ldns", "-r", str(path), "-y"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def messages(yaml_text):
    """Each dnstap message of the YAML the readers print, as a dict of its top-level fields and the
    text of its DNS messages."""
    out = []
    for doc in yaml_text.split("---"):
        if "type: MESSAGE" not in doc:
            continue
        m = {"text": doc}
        for line in doc.splitlines():
            if not line.startswith("  ") or line.startswith("    "):
                continue  # the message's own fields only (not the top level, not the DNS text)
            s = line.strip()
            for key in ("type", "socket_family", "socket_protocol", "query_address", "query_port",
                        "response_address", "response_port"):
                if s.startswith(key + ":") and key not in m:
                    m[key] = s.split(":", 1)[1].strip().strip("\"")
        out.append(m)
    return out


def check_tap(msgs):
    types = [m.get("type") for m in msgs]
    assert types.count("CLIENT_QUERY") >= 4, types
    assert types.count("CLIENT_RESPONSE") >= 4, types
    assert "FORWARDER_QUERY" in types and "FORWARDER_RESPONSE" in types, types
    clients = [m for m in msgs if m.get("type") == "CLIENT_QUERY" and m.get("socket_protocol") == "UDP"]
    assert len(clients) >= 4, clients
    assert {m.get("query_address") for m in clients} == {"127.0.0.1", "127.0.0.2"}
    assert all(int(m.get("query_port", "0")) > 0 for m in clients)
    text = "\n".join(m["text"] for m in msgs)
    assert A.split(".")[0] in text and "www.example.test" in text
    assert "10.1.0.10" in text and "192.0.2.1" in text
    assert "REFUSED" in text


def test_dnstap_to_a_collector_socket_read_by_fstrm_capture_and_both_decoders(tmp_path):
    for tool in ("fstrm_capture", "dnstap", "dnstap-ldns"):
        require(tool)
    up = LimitedUpstream()
    sock = tmp_path / "dnstap.sock"
    capture = tmp_path / "capture.tap"
    cap = subprocess.Popen(
        ["fstrm_capture", "-t", "protobuf:dnstap.Dnstap", "-u", str(sock), "-w", str(capture)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        assert wait_for(sock.exists, 5)
        d = Daemon(config(up, f'[query_log]\nformat = "dnstap"\npath = "unix:{sock}"'), tmp_path)
        try:
            # Records before the collector took the connection are dropped (counted): wait for it.
            assert wait_for(lambda: "dnstap collector connected" in log_text(d), 10)
            queries(d)
            assert wait_for(lambda: d.metric("mskdns_query_log_records_total") >= 4, 5)
        finally:
            d.stop()
        cap.send_signal(signal.SIGTERM)
        cap.wait(timeout=10)
        for tool in ("dnstap", "dnstap-ldns"):
            check_tap(messages(decode(tool, capture)))
    finally:
        if cap.poll() is None:
            cap.kill()
        up.stop()


def test_dnstap_to_a_file_read_by_both_decoders(tmp_path):
    for tool in ("dnstap", "dnstap-ldns"):
        require(tool)
    up = LimitedUpstream()
    path = tmp_path / "log" / "queries.tap"
    d = Daemon(config(up, f'[query_log]\nformat = "dnstap"\npath = "{path}"'), tmp_path)
    try:
        queries(d)
        assert wait_for(lambda: d.metric("mskdns_query_log_records_total") >= 4, 10)
    finally:
        d.stop()
    # The file is a whole Frame Streams stream once the daemon stopped (START … STOP).
    for tool in ("dnstap", "dnstap-ldns"):
        check_tap(messages(decode(tool, path)))


def test_dnstap_says_tcp_for_an_upstream_exchange_that_went_on_over_tcp(nsd, tmp_path):
    """NSD's answer is too big for UDP (TC): mskdns asks again over TCP, and the forwarder
    messages say so; a small answer's stay UDP."""
    require("dnstap")

    class Upstream:
        addr = f"127.0.0.1:{nsd.port}"

    path = tmp_path / "queries.tap"
    d = Daemon(config(Upstream, f'[query_log]\nformat = "dnstap"\npath = "{path}"'), tmp_path)
    try:
        q = dns.message.make_query("big.example.test", "TXT")
        assert len(dns.query.tcp(q, d.host, port=d.port, timeout=5).answer[0]) == 13
        assert ask(d, "www.example.test").answer
        assert wait_for(lambda: d.metric("mskdns_query_log_records_total") >= 2, 10)
    finally:
        d.stop()
    forwarded = {m["type"] + " " + ("big" if "big.example.test" in m["text"] else "www"): m.get("socket_protocol")
                 for m in messages(decode("dnstap", path)) if m.get("type", "").startswith("FORWARDER_")}
    assert forwarded == {"FORWARDER_QUERY big": "TCP", "FORWARDER_RESPONSE big": "TCP",
                         "FORWARDER_QUERY www": "UDP", "FORWARDER_RESPONSE www": "UDP"}, forwarded


def test_dnstap_names_the_dot_and_doh_transports(tmp_path):
    require("dnstap")
    require("kdig")
    ca = CA(tmp_path / "ca")
    cert, key, _ = ca.issue("dns", dns=[HOST], ips=["127.0.0.1"])
    up = LimitedUpstream()
    path = tmp_path / "queries.tap"
    extra = f'listen_dot = ["127.0.0.1:0"]\nlisten_doh = ["127.0.0.1:0"]\ntls_cert = "{cert}"\ntls_key = "{key}"'
    d = Daemon(config(up, f'[query_log]\nformat = "dnstap"\npath = "{path}"', extra_dns=extra), tmp_path)
    try:
        q = dns.message.make_query(A, "A")
        r = dns.query.https(q, f"https://{HOST}:{d.doh[0][1]}/dns-query", bootstrap_address="127.0.0.1", verify=str(ca.file))
        assert r.answer
        out = subprocess.run(["kdig", "@127.0.0.1", "-p", str(d.dot[0][1]), "+tls", f"+tls-ca={ca.file}",
                              f"+tls-hostname={HOST}", A], capture_output=True, text=True, timeout=10)
        assert "10.1.0.10" in out.stdout, out.stdout + out.stderr
        assert wait_for(lambda: d.metric("mskdns_query_log_records_total") >= 2, 10)
    finally:
        d.stop()
    # dnstap-ldns cannot decode these two socket protocols: the dnstap CLI can.
    msgs = messages(decode("dnstap", path))
    clients = [m for m in msgs if m.get("type") == "CLIENT_QUERY"]
    assert sorted(m.get("socket_protocol") for m in clients) == ["DOH", "DOT"], clients
    assert all(m.get("query_address") == "127.0.0.1" and int(m.get("query_port")) > 0 for m in clients)


def test_json_lines_in_route53_form(tmp_path):
    ca = CA(tmp_path / "ca")
    cert, key, _ = ca.issue("dns", dns=[HOST], ips=["127.0.0.1"])
    up = LimitedUpstream()
    path = tmp_path / "queries.json"
    log = f"""[query_log]
format = "json"
path = "{path}"
account_id = "111122223333"
region = "us-east-1"
vpc_id = "vpc-0123456789abcdef0"
instance_id = "i-0123456789abcdef0"
"""
    doh = f'listen_doh = ["127.0.0.1:0"]\ntls_cert = "{cert}"\ntls_key = "{key}"'
    d = Daemon(config(up, log, extra_dns=doh), tmp_path)
    try:
        queries(d)
        q = dns.message.make_query("doh.example.test", "A")
        r = dns.query.https(q, f"https://{HOST}:{d.doh[0][1]}/dns-query", bootstrap_address="127.0.0.1", verify=str(ca.file))
        assert r.answer
        assert wait_for(lambda: path.exists() and len(path.read_text().splitlines()) >= 5, 5)
    finally:
        d.stop()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    by_name = {}
    for x in lines:
        by_name.setdefault(x["query_name"], []).append(x)
    msk = by_name[A + "."][0]
    assert msk["query_type"] == "A" and msk["query_class"] == "IN" and msk["rcode"] == "NOERROR"
    assert msk["answers"] == [{"Rdata": "10.1.0.10", "Type": "A", "Class": "IN"}]
    assert msk["srcaddr"] == "127.0.0.1" and isinstance(msk["srcport"], str) and int(msk["srcport"]) > 0
    assert msk["transport"] == "UDP" and msk["version"] == "1.100000"
    assert msk["account_id"] == "111122223333" and msk["region"] == "us-east-1"
    assert msk["vpc_id"] == "vpc-0123456789abcdef0" and msk["srcids"] == {"instance": "i-0123456789abcdef0"}
    assert msk["query_timestamp"].endswith("Z") and len(msk["query_timestamp"]) == 20
    assert msk["outcome"] == "cluster" and msk["cluster"].startswith("abcd1234")
    fwd = by_name["www.example.test."]
    assert [x["outcome"] for x in fwd] == ["forwarded", "cache_hit", "refused"]
    assert fwd[0]["upstream"] == up.addr and fwd[0]["answers"][0]["Rdata"] == "192.0.2.1"
    assert fwd[2]["rcode"] == "REFUSED" and fwd[2]["srcaddr"] == "127.0.0.2"
    [over_doh] = by_name["doh.example.test."]
    assert over_doh["transport"] == "DoH" and over_doh["srcaddr"] == "127.0.0.1", over_doh


def test_sampling_logs_about_the_fraction(tmp_path):
    up = LimitedUpstream()
    path = tmp_path / "queries.json"
    d = Daemon(config(up, f'[query_log]\nformat = "json"\npath = "{path}"\nsample = 0.25\ninstance_metadata = false'), tmp_path)
    try:
        n = 800
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2)
        for i in range(n):
            s.sendto(dns.message.make_query(A, "A").to_wire(), (d.host, d.port))
            s.recv(512)
        assert wait_for(lambda: d.metric("mskdns_query_log_records_total") > 0, 5)
        time.sleep(1)
        logged = len(path.read_text().splitlines())
        # Binomial(800, 0.25): mean 200, sd ~12; 6 sd either way.
        assert 130 < logged < 270, logged
    finally:
        d.stop()
        up.stop()


class StalledCollector:
    """A unix socket that accepts and then never reads: after answering READY with ACCEPT, or
    before (it never answers). `back()` starts reading (and, if needed, the handshake) again."""

    def __init__(self, path, handshake):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(8)
        self.handshake = handshake
        self.conns = []
        self.reading = threading.Event()
        self.frames = 0
        self.stopped = False
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        self.sock.settimeout(0.2)
        while not self.stopped:
            try:
                c, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.conns.append(c)
            threading.Thread(target=self.serve, args=(c,), daemon=True).start()

    def serve(self, c):
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        if not self.handshake:
            self.reading.wait()
        try:
            self.read_control(c)  # READY
            accept = b"protobuf:dnstap.Dnstap"
            body = struct.pack(">III", 1, 1, len(accept)) + accept
            c.sendall(struct.pack(">II", 0, len(body)) + body)
            self.reading.wait()
            self.read_control(c)  # START
            while not self.stopped:
                (n,) = struct.unpack(">I", recv_exact(c, 4))
                if n == 0:
                    recv_exact(c, struct.unpack(">I", recv_exact(c, 4))[0])
                    return
                recv_exact(c, n)
                self.frames += 1
        except (OSError, EOFError):
            return

    def read_control(self, c):
        assert recv_exact(c, 4) == b"\0\0\0\0"
        (n,) = struct.unpack(">I", recv_exact(c, 4))
        return recv_exact(c, n)

    def back(self):
        self.reading.set()

    def stop(self):
        self.stopped = True
        self.sock.close()
        for c in self.conns:
            c.close()


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@pytest.mark.parametrize("handshake", [False, True], ids=["before-handshake", "after-handshake"])
def test_a_collector_that_stops_reading_costs_no_answer_and_no_memory(tmp_path, handshake):
    require("dnsperf")
    up = LimitedUpstream()
    sock = tmp_path / "stalled.sock"
    col = StalledCollector(sock, handshake)
    log = f'[query_log]\nformat = "dnstap"\npath = "unix:{sock}"\nmax_queue_bytes = 1048576'
    d = Daemon(config(up, log), tmp_path)
    try:
        names = tmp_path / "names"
        names.write_text(f"{A} A\n" * 1000)
        # A first run brings the daemon to its working size (buffers, allocator, the queue full):
        # the second, as long as the first, is measured.
        perf = ["dnsperf", "-s", d.host, "-p", str(d.port), "-d", str(names), "-l", "8", "-Q", "5000"]
        subprocess.run(perf, capture_output=True, text=True, timeout=60)
        before = rss_kib(d.proc.pid)
        out = subprocess.run(perf, capture_output=True, text=True, timeout=60)
        lost = [line for line in out.stdout.splitlines() if "Queries lost" in line]
        assert lost and lost[0].split()[2] == "0", out.stdout
        grown = rss_kib(d.proc.pid) - before
        # 40,000 records of ~300 bytes (12 MB) went by; the queue holds 1 MiB, a batch in writing
        # another: at its working size, the daemon grows by much less than the records.
        assert grown < 6 * 1024, f"RSS grew {grown} KiB"
        assert d.metric("mskdns_query_log_dropped_total") > 10000
        # The collector comes back: records reach it again.
        col.back()
        start = col.frames
        assert wait_for(lambda: (ask(d, A) and col.frames > start), 40, interval=0.5), "no records after the collector came back"
    finally:
        d.stop()
        col.stop()
        up.stop()


def test_a_full_disk_costs_no_answer_and_one_log_line(tmp_path):
    up = LimitedUpstream()
    d = Daemon(config(up, '[query_log]\nformat = "json"\npath = "/dev/full"\ninstance_metadata = false\nmax_file_bytes = 0'), tmp_path)
    try:
        for _ in range(3):
            for _ in range(50):
                assert ask(d, A).answer
            time.sleep(0.5)
        assert wait_for(lambda: d.metric("mskdns_query_log_write_errors_total") >= 2, 5)
        assert d.metric("mskdns_query_log_dropped_total", reason="write_error") >= 100
        d.log.flush()
        d.log.seek(0)
        lines = [x for x in d.log if "query log: cannot write" in x]
        assert len(lines) == 1, lines
    finally:
        d.stop()
        up.stop()


def test_a_reload_starts_and_stops_the_log(tmp_path):
    up = LimitedUpstream()
    path = tmp_path / "queries.json"
    without = config(up, "")
    d = Daemon(without, tmp_path)
    try:
        assert ask(d, A).answer
        time.sleep(0.5)
        assert not path.exists()
        d.config.write_text(config(up, f'[query_log]\nformat = "json"\npath = "{path}"\ninstance_metadata = false'))
        d.proc.send_signal(signal.SIGHUP)

        def logged():
            ask(d, A)
            return path.exists() and path.read_text().count("\n") > 0

        assert wait_for(logged, 10)
        # Views renamed by a reload that leaves the log alone: the lines name the views in force.
        logged_with = config(up, f'[query_log]\nformat = "json"\npath = "{path}"\ninstance_metadata = false')
        for name in ("vpc-one", "vpc-two"):
            view = f'\n[[views]]\nname = "{name}"\nlisteners = ["127.0.0.1:0"]\n'
            d.config.write_text(logged_with + view)
            d.proc.send_signal(signal.SIGHUP)

            def named():
                ask(d, A)
                lines = [json.loads(x) for x in path.read_text().splitlines()]
                return lines and lines[-1].get("view") == name

            assert wait_for(named, 10), name
        assert path.exists() and "query log on" in d.log_text() and d.log_text().count("query log on") == 1
        d.config.write_text(without)
        d.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: d.metric("mskdns_config_reloads_total", result="ok") >= 4, 10)
        time.sleep(1)
        n = path.read_text().count("\n")
        for _ in range(20):
            assert ask(d, A).answer
        time.sleep(1)
        assert path.read_text().count("\n") == n, "records after the log was removed"
    finally:
        d.stop()
        up.stop()
