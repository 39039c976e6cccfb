"""The SNI proxy (`mode = "sni"`): TLS passes through untouched, routed by the ClientHello's name.

The broker here is a TLS echo server with a certificate for its MSK name from a test CA; the
client verifies that certificate through the proxy, which never holds the key. The Kafka-client
tests in a network namespace (issue 14's "done when") are still to come.
"""

import socket
import ssl
import struct
import threading

import pytest

from pki import CA

NAME = "b-1.demo.abc123.c2.kafka.us-east-1.amazonaws.com"
BROKER_IP, PROXY_IP = "127.0.0.10", "127.0.0.20"


class EchoBroker:
    """A TLS server that echoes one line per connection and counts the connections it gets."""

    def __init__(self, tmp_path):
        self.ca = CA(tmp_path / "ca")
        cert, key, _ = self.ca.issue("broker", dns=[NAME])
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(cert, key)
        self.sock = socket.create_server((BROKER_IP, 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self.echo, args=(conn,), daemon=True).start()

    def echo(self, conn):
        try:
            with self.ctx.wrap_socket(conn, server_side=True) as t:
                t.sendall(t.recv(1024))
        except (OSError, ssl.SSLError):
            pass


def config(port, extra=""):
    return f"""
[dns]
listen = ["127.0.0.1:0"]
upstreams = ["127.0.0.1:9"]

[admin]
listen = "127.0.0.1:0"

[[clusters]]
bootstrap = "{NAME}"
addresses = ["{BROKER_IP}"]

[[proxies]]
mode = "sni"
listen = ["{PROXY_IP}:{port}"]
{extra}
"""


def ask(ca_file, server_name, port, payload=b"ping\n", prefix=b""):
    ctx = ssl.create_default_context(cafile=str(ca_file))
    with socket.create_connection((PROXY_IP, port), timeout=5) as s:
        if prefix:
            s.sendall(prefix)
        with ctx.wrap_socket(s, server_hostname=server_name) as t:
            t.sendall(payload)
            return t.recv(1024)


def pp2(client_ip, client_port, vpce=None):
    tlv = b""
    if vpce:
        v = b"\x01" + vpce.encode()
        tlv = b"\xea" + struct.pack(">H", len(v)) + v
    body = socket.inet_aton(client_ip) + socket.inet_aton(PROXY_IP) + struct.pack(">HH", client_port, 9098) + tlv
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack(">H", len(body)) + body


def test_tls_is_routed_by_server_name_and_verifies_end_to_end(daemon, tmp_path):
    broker = EchoBroker(tmp_path)
    d = daemon(config(broker.port))
    assert d.proxies == [(PROXY_IP, broker.port)]
    assert ask(broker.ca.file, NAME, broker.port) == b"ping\n"
    # Upper case in the ClientHello names the same broker.
    assert ask(broker.ca.file, NAME.upper(), broker.port) == b"ping\n"
    assert broker.accepted == 2
    assert d.metric("mskdns_proxy_sni_connections_total", outcome="routed", cluster="demo.abc123.c2.us-east-1") == 2


def test_a_name_not_served_is_refused_without_connecting(daemon, tmp_path):
    broker = EchoBroker(tmp_path)
    d = daemon(config(broker.port))
    for name in ["b-1.other.ffff99.c2.kafka.us-east-1.amazonaws.com", "example.com"]:
        with pytest.raises(ssl.SSLError, match="(?i)unrecognized.name"):
            ask(broker.ca.file, name, broker.port)
    assert broker.accepted == 0
    assert d.metric("mskdns_proxy_sni_connections_total", outcome="unknown_name") == 2
    # Not TLS at all: closed, counted, nothing connected.
    with socket.create_connection((PROXY_IP, broker.port), timeout=5) as s:
        s.sendall(b"\x00\x00\x00\x10kafka-request...")
        assert s.recv(100) == b""
    assert d.metric("mskdns_proxy_sni_connections_total", outcome="not_tls") == 1
    assert broker.accepted == 0


def test_strangers_are_closed_before_anything_is_read(daemon, tmp_path):
    broker = EchoBroker(tmp_path)
    d = daemon(config(broker.port, 'allow = ["10.0.0.0/8"]'))
    with pytest.raises((ssl.SSLError, OSError)):
        ask(broker.ca.file, NAME, broker.port)
    assert broker.accepted == 0
    assert d.metric("mskdns_proxy_sni_connections_total", outcome="not_allowed") == 1


def test_proxy_protocol_v2_client_and_endpoint_are_checked(daemon, tmp_path):
    broker = EchoBroker(tmp_path)
    extra = 'allow = ["10.0.0.0/8"]\nproxy_protocol = true\nallow_endpoints = ["vpce-0aaa"]'
    d = daemon(config(broker.port, extra))
    # Through the allowed endpoint, from an allowed client: routed.
    assert ask(broker.ca.file, NAME, broker.port, prefix=pp2("10.1.2.3", 40000, "vpce-0aaa")) == b"ping\n"
    assert broker.accepted == 1
    # Another endpoint, no endpoint, a client outside allow, no header: closed, nothing connected.
    for prefix in [pp2("10.1.2.3", 40001, "vpce-0bbb"), pp2("10.1.2.3", 40002), pp2("192.0.2.1", 40003, "vpce-0aaa")]:
        with pytest.raises((ssl.SSLError, OSError)):
            ask(broker.ca.file, NAME, broker.port, prefix=prefix)
    with pytest.raises((ssl.SSLError, OSError)):
        ask(broker.ca.file, NAME, broker.port)
    assert broker.accepted == 1
    assert d.metric("mskdns_proxy_sni_connections_total", outcome="not_allowed") == 3
    assert d.metric("mskdns_proxy_sni_connections_total", outcome="not_tls") == 1
