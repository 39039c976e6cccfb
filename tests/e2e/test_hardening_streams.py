"""Clients inside `allow` that try to starve the stream transports (TCP, DoT, DoH) and the SNI
proxy, against the real binary: each is cut off within its timeout or bound while another client
is still served."""
import socket
import ssl
import struct
import threading
import time

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import pytest

from conftest import wait_for
from test_encrypted_dns import HOST, config as dns_config, pki  # noqa: F401 (pki is a fixture)
from test_hardening import closed_within, tcp_query

SLOW = "slow.example.test"


class SlowUpstream:
    """A UDP upstream on loopback that answers every A query with 192.0.2.7 after `delay`
    seconds (or never, with `delay=None`), counting the queries it gets."""

    def __init__(self, delay, txt=0):
        self.delay, self.txt = delay, txt
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.asked = 0
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            self.asked += 1
            if self.delay is None:
                continue
            q = dns.message.from_wire(data)
            r = dns.message.make_response(q)
            if self.txt and q.question[0].rdtype == dns.rdatatype.TXT:
                chunks = " ".join(f'"{"x" * 250}"' for _ in range(self.txt // 250))
                r.answer.append(dns.rrset.from_text(q.question[0].name, 300, "IN", "TXT", chunks))
            else:
                r.answer.append(dns.rrset.from_text(q.question[0].name, 300, "IN", "A", "192.0.2.7"))
            if self.delay:
                threading.Timer(self.delay, self.reply, args=(r.to_wire(), peer)).start()
            else:
                self.reply(r.to_wire(), peer)

    def reply(self, wire, peer):
        try:
            self.sock.sendto(wire, peer)
        except OSError:
            pass

    def close(self):
        self.sock.close()


@pytest.fixture
def slow_upstream():
    made = []

    def make(delay, **kw):
        u = SlowUpstream(delay, **kw)
        made.append(u)
        return u

    yield make
    for u in made:
        u.close()


def tls(d, kind, pki, alpn=None, source="127.0.0.1"):
    ca, _, _ = pki
    ctx = ssl.create_default_context(cafile=str(ca.file))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    host, port = getattr(d, kind)[0]
    raw = socket.create_connection((host, port), timeout=5, source_address=(source, 0))
    return ctx.wrap_socket(raw, server_hostname=HOST)


def h2_conn(sock, window=None):
    c = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    c.initiate_connection()
    if window is not None:
        c.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
    sock.sendall(c.data_to_send())
    return c


def doh_headers(d, method="POST", path="/dns-query", length=None):
    h = [(":method", method), (":path", path), (":scheme", "https"), (":authority", HOST)]
    if method == "POST":
        h += [("content-type", "application/dns-message")]
        if length is not None:
            h += [("content-length", str(length))]
    return h


def doh_works(d, pki, source="127.0.0.2"):
    ca, _, _ = pki
    host, port = d.doh[0]
    q = dns.message.make_query("www.example.test", "A")
    try:
        r = dns.query.https(q, f"https://{HOST}:{port}/dns-query", verify=ssl.create_default_context(cafile=str(ca.file)),
                            bootstrap_address=host, source=source, timeout=3)
        return r.rcode() == dns.rcode.NOERROR and r.answer
    except Exception:
        return False


def dot_works(d, pki, source="127.0.0.2"):
    ca, _, _ = pki
    host, port = d.dot[0]
    try:
        r = dns.query.tls(dns.message.make_query("www.example.test", "A"), host, port=port, timeout=3, source=source,
                          ssl_context=ssl.create_default_context(cafile=str(ca.file)), server_hostname=HOST)
        return bool(r.answer)
    except Exception:
        return False


LIMITS = """max_tcp_connections = 4
tcp_idle_timeout_ms = 1000
tcp_write_timeout_ms = 1000
allow = ["127.0.0.0/8"]"""


def test_doh_requests_whose_body_never_comes_are_cut_off(daemon, nsd, pki, tmp_path):
    """HTTP/1.1 with a Content-Length and no body, HTTP/2 HEADERS without END_STREAM: each held a
    DoH slot for as long as the client liked while others were refused."""
    d = daemon(dns_config(pki, tmp_path, nsd.port, extra_dns=LIMITS))
    hogs = []
    for _ in range(2):
        s = tls(d, "doh", pki, alpn=["http/1.1"])
        s.sendall(f"POST /dns-query HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/dns-message\r\n"
                  "Content-Length: 100\r\n\r\n".encode())
        hogs.append(s)
    for _ in range(2):
        s = tls(d, "doh", pki, alpn=["h2"])
        c = h2_conn(s)
        c.send_headers(1, doh_headers(d, length=100), end_stream=False)
        s.sendall(c.data_to_send())
        hogs.append(s)
    time.sleep(0.3)
    started = time.time()
    assert not doh_works(d, pki), "the four slots are held"
    # Body deadline (tcp_idle_timeout_ms) then the write timeout: each is gone in about 2 s.
    for s in hogs:
        assert closed_within(s, 5), "a request without its body does not hold the connection"
    assert time.time() - started < 5
    assert wait_for(lambda: doh_works(d, pki), timeout=3), "the slots are free again"
    for s in hogs:
        s.close()


def test_http1_request_without_its_body_gets_408(daemon, nsd, pki, tmp_path):
    d = daemon(dns_config(pki, tmp_path, nsd.port, extra_dns=LIMITS))
    s = tls(d, "doh", pki, alpn=["http/1.1"])
    s.sendall(f"POST /dns-query HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/dns-message\r\n"
              "Content-Length: 40\r\n\r\n".encode() + b"\x00" * 10)
    s.settimeout(5)
    head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 408"), head
    s.close()


def test_doh_zero_window_client_is_closed_while_others_are_served(daemon, nsd, pki, tmp_path):
    """A client that opens no flow-control window takes no response; a request every half second
    used to keep its connection, and every answered response, alive."""
    d = daemon(dns_config(pki, tmp_path, nsd.port, extra_dns=LIMITS))
    s = tls(d, "doh", pki, alpn=["h2"])
    c = h2_conn(s, window=0)
    wire = dns.message.make_query("big.example.test", "TXT").to_wire()
    import base64
    path = "/dns-query?dns=" + base64.urlsafe_b64encode(wire).decode().rstrip("=")
    stream = 1
    started, closed = time.time(), False
    s.settimeout(0.05)
    while time.time() - started < 8 and not closed:
        try:
            c.send_headers(stream, doh_headers(d, method="GET", path=path), end_stream=True)
            s.sendall(c.data_to_send())
        except (OSError, h2.exceptions.ProtocolError):
            closed = True
            break
        stream += 2
        deadline = time.time() + 0.5
        while time.time() < deadline:
            try:
                data = s.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                closed = True
                break
            if not data:
                closed = True
                break
            c.receive_data(data)  # never acknowledges DATA: the window stays shut
        assert doh_works(d, pki), "another client is served meanwhile"
    elapsed = time.time() - started
    assert closed, "the connection that takes no response is closed"
    assert elapsed < 5, f"within about the write timeout, not {elapsed:.1f} s"
    s.close()


@pytest.mark.parametrize("kind", ["dns", "dot"])
def test_stream_clients_that_never_read_or_send_half_a_query_are_cut_off(daemon, slow_upstream, pki, tmp_path, kind):
    """A client that pipelines misses and never reads held its slot for a minute and more: every
    answer queued behind the first failed write waited a write timeout of its own."""
    up = slow_upstream(0.0, txt=1000)  # within the 1232 bytes mskdns asks for
    d = daemon(dns_config(pki, tmp_path, up.port, extra_dns=LIMITS + "\nrate_limit = 0"))
    ca, _, _ = pki
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(d.dns[0] if kind == "dns" else d.dot[0])
    deaf = raw if kind == "dns" else ssl.create_default_context(cafile=str(ca.file)).wrap_socket(raw, server_hostname=HOST)
    half = socket.create_connection(d.dns[0]) if kind == "dns" else tls(d, "dot", pki)
    half.sendall(tcp_query("www.example.test")[:9])
    stop = threading.Event()

    def flood():
        # Misses with large answers, sent on and on: the client is busy, never idle.
        i = 0
        while not stop.is_set():
            try:
                deaf.sendall(b"".join(tcp_query(f"n{i + k}.example.test", "TXT", qid=(i + k) % 65536) for k in range(50)))
            except OSError:
                return
            i += 50
            time.sleep(0.05)

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    transport = "tcp" if kind == "dns" else "dot"
    assert wait_for(lambda: d.metric("mskdns_tcp_connections_active", transport=transport) == 2, timeout=3)
    assert (dot_works(d, pki) if kind == "dot" else dns.query.tcp(
        dns.message.make_query("other.example.test", "A"), d.host, port=d.port, timeout=3, source="127.0.0.2").answer)
    assert closed_within(half, 4), "half a query: closed at the idle timeout"
    started = time.time()
    # Closed about one write timeout after its answers stop being taken, though it still sends.
    gone = wait_for(lambda: d.metric("mskdns_tcp_connections_active", transport=transport) == 0, timeout=10)
    stop.set()
    assert gone, "the client that never reads still holds its connection"
    assert time.time() - started < 6
    assert up.asked > 64
    deaf.close()
    half.close()


def test_connection_caps_are_per_process_with_an_exempt_list(daemon, nsd, pki, tmp_path):
    extra = """max_tcp_connections_per_client = 2
tcp_idle_timeout_ms = 30000
allow = ["127.0.0.0/8"]
tcp_per_client_exempt = ["127.0.0.3/32"]"""
    d = daemon(dns_config(pki, tmp_path, nsd.port, extra_dns=extra))
    held = []
    for _ in range(2):
        s = socket.create_connection((d.host, d.port), timeout=5, source_address=("127.0.0.1", 0))
        held.append(s)
    time.sleep(0.2)
    # The same address on DoT: its two connections are already open (on plain TCP).
    raw = socket.create_connection(d.dot[0], timeout=5, source_address=("127.0.0.1", 0))
    assert closed_within(raw, 3), "a third connection from the address is closed, whatever the listener"
    assert d.metric("mskdns_tcp_connections_rejected_total", reason="per_client", transport="dot") >= 1
    assert dot_works(d, pki, source="127.0.0.2")
    # An exempt address (a resolver in front) opens more than the per-client cap.
    many = [socket.create_connection((d.host, d.port), timeout=5, source_address=("127.0.0.3", 0)) for _ in range(5)]
    for s in many:
        s.sendall(tcp_query("www.example.test", qid=7))
        s.settimeout(3)
        assert len(s.recv(4096)) > 12
    for s in held + many + [raw]:
        s.close()


def test_the_inflight_limit_is_shared_by_every_transport(daemon, slow_upstream, tmp_path):
    """Misses over TCP used to ignore dns.max_inflight: a TCP client could take every socket while
    a UDP client's query waited for its turn."""
    up = slow_upstream(None)  # never answers: every miss holds its slot for the whole deadline
    d = daemon(f"""
[dns]
listen = ["127.0.0.1:0"]
upstreams = ["127.0.0.1:{up.port}"]
upstream_timeout_ms = 2000
max_inflight = 4
rate_limit = 0

[admin]
listen = "127.0.0.1:0"
""")
    s = socket.create_connection((d.host, d.port), timeout=5)
    s.sendall(b"".join(tcp_query(f"t{i}.example.test", qid=i) for i in range(10)))
    # Six of the ten are past the limit: SERVFAIL at once, over TCP.
    s.settimeout(1.5)
    got = []
    buf = b""
    deadline = time.time() + 1.5
    while len(got) < 6 and time.time() < deadline:
        try:
            buf += s.recv(4096)
        except socket.timeout:
            break
        while len(buf) >= 2 and len(buf) >= 2 + struct.unpack("!H", buf[:2])[0]:
            n = struct.unpack("!H", buf[:2])[0]
            got.append(dns.message.from_wire(buf[2:2 + n]))
            buf = buf[2 + n:]
    assert len(got) == 6 and all(r.rcode() == dns.rcode.SERVFAIL for r in got), [r.rcode() for r in got]
    # A UDP client's miss meets the same limit: SERVFAIL at once, not after the upstream timeout.
    started = time.time()
    r = dns.query.udp(dns.message.make_query("u.example.test", "A"), d.host, port=d.port, timeout=3)
    assert r.rcode() == dns.rcode.SERVFAIL
    assert time.time() - started < 1
    assert d.metric("mskdns_inflight_rejected_total") >= 7
    assert d.metric("mskdns_inflight") == 4, "the four TCP misses still hold their slots"
    assert wait_for(lambda: d.metric("mskdns_inflight") == 0, timeout=8), "given back once they time out"
    s.close()


def test_a_doh_client_that_resets_its_stream_does_not_fail_others_asking_the_same_name(
        daemon, slow_upstream, pki, tmp_path):
    up = slow_upstream(0.15)
    d = daemon(dns_config(pki, tmp_path, up.port, extra_dns='allow = ["127.0.0.0/8"]\nrate_limit = 0'))
    failures = 0
    for i in range(5):
        name = f"r{i}.example.test"
        s = tls(d, "doh", pki, alpn=["h2"])
        c = h2_conn(s)
        wire = dns.message.make_query(name, "A").to_wire()
        c.send_headers(1, doh_headers(d, length=len(wire)), end_stream=False)
        c.send_data(1, wire, end_stream=True)
        s.sendall(c.data_to_send())
        time.sleep(0.03)
        result = {}
        t = threading.Thread(target=lambda: result.update(r=dns.query.udp(
            dns.message.make_query(name, "A"), d.host, port=d.port, timeout=3, source="127.0.0.2")))
        t.start()
        time.sleep(0.03)
        c.reset_stream(1)
        s.sendall(c.data_to_send())
        s.close()
        t.join()
        r = result["r"]
        if r.rcode() != dns.rcode.NOERROR or [x.to_text() for rr in r.answer for x in rr] != ["192.0.2.7"]:
            failures += 1
    assert failures == 0, f"{failures} of 5 lookups failed because another client went away"


def test_silent_sni_connections_from_one_address_hold_only_its_own_slots(daemon, tmp_path):
    """The per-client slot used to be taken after the ClientHello: one address's silent
    connections held every slot until client_hello_timeout_ms."""
    from test_proxy_sni import NAME, PROXY_IP, EchoBroker, ask, config as sni_config
    broker = EchoBroker(tmp_path)
    d = daemon(sni_config(broker.port, "max_connections = 6\nmax_connections_per_client = 2\n"
                                       "client_hello_timeout_ms = 30000"))
    silent = [socket.create_connection((PROXY_IP, broker.port), timeout=5, source_address=("127.0.0.1", 0))
              for _ in range(8)]
    time.sleep(0.3)
    closed = [s for s in silent if closed_within(s, 0.3)]
    assert len(closed) == 6, "all but the address's two are closed at accept"
    assert d.metric("mskdns_proxy_sni_connections_total", outcome="limit") == 6
    assert ask(broker.ca.file, NAME, broker.port, source="127.0.0.2") == b"ping\n", "another client gets in"
    for s in silent:
        s.close()


def test_an_sni_target_that_is_the_proxy_itself_is_refused_not_looped(daemon, tmp_path):
    from test_proxy_sni import NAME, PROXY_IP, EchoBroker, ask, config as sni_config
    broker = EchoBroker(tmp_path)
    # The cluster's target is the proxy's own listening address: connecting would loop.
    d = daemon(sni_config(broker.port).replace('addresses = ["127.0.0.10"]', f'addresses = ["{PROXY_IP}"]'))
    for _ in range(3):
        with pytest.raises((ssl.SSLError, OSError)):
            ask(broker.ca.file, NAME, broker.port)
    assert d.metric("mskdns_proxy_sni_connections_total", outcome="refused_target") == 3
    assert d.metric("mskdns_proxy_sni_connections_total", outcome="routed") == 0
    d.log.seek(0)
    assert d.log.read().count("not connected (logged once per cluster)") == 1


def test_refused_sni_connections_do_not_flood_the_log(daemon, tmp_path):
    from test_proxy_sni import PROXY_IP, EchoBroker, config as sni_config
    broker = EchoBroker(tmp_path)
    d = daemon(sni_config(broker.port))
    for _ in range(60):
        with socket.create_connection((PROXY_IP, broker.port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            s.settimeout(3)
            assert s.recv(100) == b""
    assert d.metric("mskdns_proxy_sni_connections_total", outcome="not_tls") == 60
    d.log.seek(0)
    lines = [l for l in d.log.read().splitlines() if "not TLS: closed" in l]
    assert 1 <= len(lines) <= 10, f"{len(lines)} lines for 60 refusals"


def test_a_silent_client_on_a_port_of_no_known_broker_costs_the_cluster_nothing(daemon, tmp_path):
    """With node_id ports, a connection to a port no broker has yet made the proxy ask the cluster
    for its brokers before the client had sent anything."""
    from test_proxy import port_range
    cluster = socket.create_server(("127.0.0.1", 0))
    cluster.settimeout(0.2)

    def config(first, last):
        return f"""
[dns]
listen = ["127.0.0.1:0"]
upstreams = ["127.0.0.1:9"]

[admin]
listen = "127.0.0.1:0"

[[proxies]]
listen = "127.0.0.1:0"
upstream = "127.0.0.1:{cluster.getsockname()[1]}"
advertise_host = "127.0.0.1"
broker_ports = "{first}-{last}"
port_assignment = "node_id"
first_request_timeout_ms = 3000
"""

    # node_id binds the whole range at start: a range another process holds a port of is
    # tried again elsewhere.
    for attempt in range(5):
        first, last = port_range()
        try:
            d = daemon(config(first, last), name=f"silent-{attempt}.toml")
            break
        except RuntimeError as e:
            if "Address already in use" not in str(e):
                raise
    else:
        pytest.fail("no free broker port range in 5 tries")
    assert d.proxies, "the bootstrap listener is up"

    def accepted_within(seconds):
        deadline = time.time() + seconds
        while time.time() < deadline:
            try:
                conn, _ = cluster.accept()
                conn.close()
                return True
            except socket.timeout:
                continue
        return False

    assert accepted_within(3), "asked once at start (this cluster gives no broker)"
    time.sleep(1.2)  # past the one-ask-a-second limit
    # node_id ports are bound for every port of the range up front; this one holds no broker.
    silent = socket.create_connection(("127.0.0.1", first + 3), timeout=5)
    assert not accepted_within(1.5), "nothing was sent: the cluster is not asked"
    silent.sendall(b"\x00\x00\x00\x0a")
    assert accepted_within(3), "the client's first bytes make it ask"
    silent.close()
    cluster.close()
