"""The upstream packet budget (`dns.upstream_max_pps`) against the real binary.

The upstream here behaves as the VPC resolver does at its limit: it answers at most N packets in
any second and silently drops the rest; it records the kernel's receive time of every packet
(SO_TIMESTAMPNS), so that a slow Python reader does not bunch them up. The default (no key: 900/s
for the VPC resolver's addresses) is tested in a network namespace the test creates, where
169.254.169.253 and fd00:ec2::253 are addresses of its own loopback.
"""

import ctypes
import os
import socket
import struct
import subprocess
import threading
import time
import uuid

import dns.edns
import dns.message
import dns.rcode
import dns.rrset

from conftest import Daemon, require, wait_for

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
CLONE_NEWNET = 0x40000000


class LimitedUpstream:
    """A UDP resolver that answers at most `limit` packets in any second (None: all) and drops the
    rest; every name is 192.0.2.1, with TTL 2 under cached.test., 10 under prefetch.test. (the
    shortest mskdns prefetches), 300 elsewhere."""

    def __init__(self, host="127.0.0.1", limit=None, sock=None):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = sock or socket.socket(family, socket.SOCK_DGRAM)
        if sock is None:
            self.sock.bind((host, 0))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.host = host
        self.limit = limit
        self.received = []  # kernel receive times, seconds
        self.answered = []
        self.stopped = False
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    @property
    def addr(self):
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def serve(self):
        while not self.stopped:
            try:
                data, anc, _, peer = self.sock.recvmsg(4096, 64)
            except (socket.timeout, OSError):
                continue
            at = time.time()
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", raw[:16])
                    at = sec + nsec / 1e9
            self.received.append(at)
            if self.limit is not None:
                while self.answered and at - self.answered[0] >= 1.0:
                    self.answered.pop(0)
                if len(self.answered) >= self.limit:
                    continue  # dropped, as AWS does past its limit
                self.answered.append(at)
            try:
                q = dns.message.from_wire(data)
            except Exception:
                continue
            r = dns.message.make_response(q)
            name = q.question[0].name
            if q.question[0].rdtype == 1:
                text = name.to_text()
                ttl = 2 if text.endswith("cached.test.") else 10 if text.endswith("prefetch.test.") else 300
                r.answer.append(dns.rrset.from_text(name, ttl, "IN", "A", "192.0.2.1"))
            try:
                self.sock.sendto(r.to_wire(), peer)
            except OSError:
                pass

    def max_per_second(self, since=0.0):
        """The most packets received within any closed one-second interval."""
        ts = sorted(t for t in self.received if t >= since)
        best, j = 0, 0
        for i in range(len(ts)):
            while ts[i] - ts[j] > 1.0:
                j += 1
            best = max(best, i - j + 1)
        return best

    def stop(self):
        self.stopped = True
        self.thread.join(timeout=2)
        self.sock.close()


class Load:
    """Sends queries at a steady rate from one socket and matches every answer to its query:
    (name, sent at, answer, received at)."""

    def __init__(self, server, sock=None):
        self.server = server
        family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        self.sock = sock or socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.settimeout(0.2)
        self.sent = {}  # id -> (name, time)
        self.results = []
        self.stopped = False
        self.next_id = 1
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.receive, daemon=True)
        self.thread.start()

    def ask(self, name):
        with self.lock:
            qid = self.next_id
            self.next_id = (self.next_id + 1) % 65536 or 1
        q = dns.message.make_query(name, "A", use_edns=0, payload=1232)
        q.id = qid
        self.sent[qid] = (name, time.time())
        self.sock.sendto(q.to_wire(), self.server)

    def receive(self):
        while not self.stopped:
            try:
                data = self.sock.recv(4096)
            except (socket.timeout, OSError):
                continue
            at = time.time()
            r = dns.message.from_wire(data)
            name, sent = self.sent.pop(r.id, (None, None))
            if name is not None:
                self.results.append((name, sent, r, at))

    def run(self, rate, seconds, name_of, also=None):
        """`rate` queries a second for `seconds`, the i-th named `name_of(i)`; `also(t)` is called
        between them (for queries of its own)."""
        start = time.time()
        i = 0
        while True:
            now = time.time()
            if now - start >= seconds:
                break
            due = int((now - start) * rate)
            while i < due:
                self.ask(name_of(i))
                i += 1
            if also:
                also(now - start)
            time.sleep(0.002)
        return i

    def stop(self):
        self.stopped = True
        self.thread.join(timeout=2)
        self.sock.close()


def ede_of(r):
    return [(o.code, o.text or "") for o in r.options if isinstance(o, dns.edns.EDEOption)]


def config(upstreams, max_pps=None, extra=""):
    key = "" if max_pps is None else f"upstream_max_pps = {max_pps}\n"
    ups = ", ".join(f'"{u}"' for u in upstreams)
    return f"""
[dns]
listen = ["127.0.0.1:0"]
upstreams = [{ups}]
allow = ["127.0.0.0/8"]
rate_limit = 0
upstream_timeout_ms = 1000
{key}{extra}
[admin]
listen = "127.0.0.1:0"
"""


def test_overload_at_ten_times_the_budget_is_answered_at_once_and_the_upstream_stays_within_it(tmp_path):
    budget = 50
    up = LimitedUpstream(limit=budget)
    d = Daemon(config([up.addr], budget), tmp_path)
    load = Load((d.host, d.port))
    try:
        # Warm five names (TTL 2) before the overload: queried throughout, they must keep answering.
        cached = [f"c{i}.cached.test." for i in range(5)]
        for n in cached:
            load.ask(n)
        assert wait_for(lambda: len(load.results) == 5, 5)
        assert all(r.rcode() == dns.rcode.NOERROR for _, _, r, _ in load.results)
        assert d.http("/readyz")[0] == 200 and "degraded" not in d.http("/readyz")[1]
        load.results.clear()
        sent_before = d.metric("mskdns_upstream_packets_total", upstream=up.addr)
        received_before = len(up.received)

        last_cached = [0.0]
        degraded_seen = []

        def also(t):
            if t - last_cached[0] >= 0.2:
                last_cached[0] = t
                for n in cached:
                    load.ask(n)
            if 3 < t and not degraded_seen:
                code, body = d.http("/readyz")
                if "degraded" in body:
                    degraded_seen.append(body)

        tag = uuid.uuid4().hex[:6]
        n = load.run(budget * 10, 10, lambda i: f"u{i}-{tag}.load.test.", also)
        assert n >= budget * 10 * 9
        # Every query is answered: none is left to a client timeout.
        assert wait_for(lambda: not load.sent, 5), f"{len(load.sent)} queries never answered"

        # The upstream never received more than the budget in any second.
        peak = up.max_per_second()
        assert peak <= budget, f"{peak} packets within one second, budget {budget}"
        # What mskdns says it sent agrees with what the upstream received (within 10%).
        sent = d.metric("mskdns_upstream_packets_total", upstream=up.addr) - sent_before
        received = len(up.received) - received_before
        assert abs(sent - received) <= max(2, received * 0.1), (sent, received)

        unique = [(name, s, r, at) for name, s, r, at in load.results if "load.test" in name]
        refused = [(s, r, at) for name, s, r, at in unique if r.rcode() == dns.rcode.SERVFAIL]
        forwarded = [r for name, s, r, at in unique if r.rcode() == dns.rcode.NOERROR and r.answer]
        assert len(refused) > n * 0.8, (len(refused), n)
        assert forwarded, "some misses went within the budget"
        # Refused ones carry an EDE saying why, and come at once: 99% within 50 ms.
        for s, r, at in refused:
            assert any("dns.upstream_max_pps" in text for _, text in ede_of(r)), ede_of(r)
        waits = sorted(at - s for s, r, at in refused)
        p99 = waits[int(len(waits) * 0.99)]
        assert p99 < 0.05, f"p99 of budget SERVFAILs {p99 * 1000:.1f} ms"
        print(f"sent {n}, refused {len(refused)}, forwarded {len(forwarded)}, peak {peak}/s, p99 {p99 * 1000:.1f} ms")

        # Cached names kept answering; once expired, stale with EDE 3.
        answers = [(s, r) for name, s, r, at in load.results if "cached.test" in name]
        assert len(answers) > 200
        assert all(r.rcode() == dns.rcode.NOERROR and r.answer for s, r in answers), [
            (r.rcode(), ede_of(r)) for s, r in answers if r.rcode() != dns.rcode.NOERROR or not r.answer
        ][:5]
        stale = [r for s, r in answers if (3, "") in ede_of(r) or any(c == 3 for c, _ in ede_of(r))]
        assert stale, "expired cached names were answered stale with EDE 3"
        assert all(r.answer[0].ttl <= 30 for r in stale)

        # /readyz was degraded during the overload, naming the upstream, and is ready within 10 s.
        assert degraded_seen and up.addr in degraded_seen[0], degraded_seen
        assert wait_for(lambda: "degraded" not in d.http("/readyz")[1], 10), d.http("/readyz")
        # One log line, not one per query (the next would come a minute later).
        d.log.flush()
        d.log.seek(0)
        lines = [line for line in d.log if "upstream packet budget reached" in line]
        assert len(lines) == 1, lines
        assert d.metric("mskdns_upstream_budget_refused_total", budget=up.addr, **{"class": "miss"}) >= len(refused)
        assert d.metric("mskdns_responses_total", outcome="stale") >= len(stale)
    finally:
        load.stop()
        d.stop()
        up.stop()


def test_prefetches_are_skipped_when_the_budget_is_short(tmp_path):
    budget = 20
    up = LimitedUpstream(limit=budget)
    d = Daemon(config([up.addr], budget), tmp_path)
    load = Load((d.host, d.port))
    try:
        cached = [f"p{i}.prefetch.test." for i in range(5)]
        for n in cached:
            load.ask(n)
        assert wait_for(lambda: len(load.results) == 5, 5)
        tag = uuid.uuid4().hex[:6]
        last = [0.0]

        def also(t):
            # Asked through the last tenth of their TTL (10 s): an answer from the cache there asks
            # for a prefetch, which the budget, spent on misses, does not let go.
            if t - last[0] >= 0.1:
                last[0] = t
                for n in cached:
                    load.ask(n)

        load.run(budget * 5, 11, lambda i: f"q{i}-{tag}.load.test.", also)
        assert wait_for(lambda: not load.sent, 5)
        assert d.metric("mskdns_cache_prefetches_skipped_total", reason="budget") > 0
        assert up.max_per_second() <= budget
    finally:
        load.stop()
        d.stop()
        up.stop()


def test_without_the_key_an_upstream_named_in_the_file_is_not_limited(tmp_path):
    require("dnsperf")
    up = LimitedUpstream()
    d = Daemon(config([up.addr]), tmp_path)
    try:
        names = tmp_path / "names"
        tag = uuid.uuid4().hex[:6]
        names.write_text("".join(f"n{i}-{tag}.load.test A\n" for i in range(30000)))
        subprocess.run(
            ["dnsperf", "-s", d.host, "-p", str(d.port), "-d", str(names), "-Q", "3000", "-l", "4", "-t", "2"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert up.max_per_second() > 1500, up.max_per_second()
        assert d.metric("mskdns_upstream_budget_refused_total") == 0
    finally:
        d.stop()
        up.stop()


class Namespace:
    """A network namespace of the test's own, with the VPC resolver's addresses on its loopback."""

    def __init__(self):
        require("ip")
        self.name = f"mskdns-b{uuid.uuid4().hex[:6]}"
        for argv in (
            ["ip", "netns", "add", self.name],
            ["ip", "-n", self.name, "link", "set", "lo", "up"],
            ["ip", "-n", self.name, "addr", "add", "169.254.169.253/32", "dev", "lo"],
            ["ip", "-n", self.name, "-6", "addr", "add", "fd00:ec2::253/128", "dev", "lo", "nodad"],
        ):
            subprocess.run(argv, check=True, capture_output=True)
        self.libc = ctypes.CDLL("libc.so.6", use_errno=True)

    def enter(self):
        """Moves the calling thread (or a child before exec) into the namespace."""
        fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            if self.libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
        finally:
            os.close(fd)

    def socket(self, family, bind):
        """A UDP socket made inside the namespace (it stays there, whichever thread uses it)."""
        out = []

        def make():
            self.enter()
            s = socket.socket(family, socket.SOCK_DGRAM)
            if bind:
                s.bind(bind)
            out.append(s)

        t = threading.Thread(target=make)
        t.start()
        t.join()
        return out[0]

    def run(self, argv, **kw):
        return subprocess.run(["ip", "netns", "exec", self.name, *argv], **kw)

    def stop(self):
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def test_by_default_the_vpc_resolver_gets_900_packets_a_second_on_both_its_addresses(tmp_path):
    require("dnsperf")
    ns = Namespace()
    try:
        for host, family in (("169.254.169.253", socket.AF_INET), ("fd00:ec2::253", socket.AF_INET6)):
            up = LimitedUpstream(host=host, sock=ns.socket(family, (host, 0)))
            d = Daemon(config([up.addr]), tmp_path, name=f"default-{family}.toml", preexec_fn=ns.enter)
            try:
                names = tmp_path / "names"
                tag = uuid.uuid4().hex[:6]
                names.write_text("".join(f"v{i}-{tag}.load.test A\n" for i in range(100000)))
                out = ns.run(
                    ["dnsperf", "-s", d.host, "-p", str(d.port), "-d", str(names), "-Q", "9000", "-l", "10"],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                assert "Queries sent" in out.stdout, out.stdout + out.stderr
                peak = up.max_per_second()
                assert 450 < peak <= 900, f"{host}: {peak} packets within one second"
                lost = [line for line in out.stdout.splitlines() if "Queries lost" in line]
                assert lost and lost[0].split()[2] == "0", lost
            finally:
                d.stop()
                up.stop()
    finally:
        ns.stop()
