"""The proxy's TLS when something is wrong: a broker certificate from another CA or for another
name is refused (and no client ever reaches the broker unverified), a plaintext client on a TLS
listener and a client that never finishes its handshake are reported and let go, a renewed
certificate is picked up without a restart, and `mskdns check` names a bad TLS key. Brokers that
require a client certificate get the proxy's (`upstream_tls_cert`)."""
import socket
import ssl
import subprocess
import time

import pytest

from conftest import BIN, wait_for
from pki import CA
from test_proxy import ADVERTISE, Cluster, TlsTansu, bootstrap_of, port_range, proxy_config


@pytest.fixture
def tls_cluster(tmp_path):
    c = Cluster(tmp_path, tls=True)
    yield c
    c.stop()


def start(daemon, tmp_path, cluster, **replace):
    first, last = port_range()
    text = proxy_config(tmp_path, cluster, first, last)
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    return daemon(text)


def log_of(d):
    d.log.seek(0)
    return d.log.read()


def peer_certificate(host, port, ca_file):
    ctx = ssl.create_default_context(cafile=str(ca_file))
    with socket.create_connection((host, port), timeout=5) as s:
        with ctx.wrap_socket(s, server_hostname=host) as t:
            return t.getpeercert()


def test_a_broker_certificate_from_another_ca_is_refused(daemon, tls_cluster, tmp_path):
    from confluent_kafka.admin import AdminClient

    other = CA(tmp_path / "other", name="another CA")
    d = start(daemon, tmp_path, tls_cluster, **{str(tls_cluster.ca.file): str(other.file)})
    admin = AdminClient({"bootstrap.servers": "%s:%d" % bootstrap_of(d), **tls_cluster.confluent})
    with pytest.raises(Exception):
        admin.list_topics(timeout=5)
    assert d.metric("mskdns_proxy_tls_errors_total", side="upstream") >= 1
    assert f"TLS handshake with {tls_cluster.upstream}: invalid peer certificate: UnknownIssuer" in log_of(d)
    # Nothing reached the broker's Kafka side, so no broker port was ever handed out.
    assert d.metric("mskdns_proxy_port_allocations_total") == 0


def test_a_broker_certificate_for_another_name_is_refused(daemon, tls_cluster, tmp_path):
    from confluent_kafka.admin import AdminClient

    # The same broker by address: its certificate names only `localhost`.
    by_address = tls_cluster.upstream.replace("localhost", "127.0.0.1")
    d = start(daemon, tmp_path, tls_cluster, **{tls_cluster.upstream: by_address})
    admin = AdminClient({"bootstrap.servers": "%s:%d" % bootstrap_of(d), **tls_cluster.confluent})
    with pytest.raises(Exception):
        admin.list_topics(timeout=5)
    assert (
        f'TLS handshake with {by_address}: invalid peer certificate: certificate not valid for name "127.0.0.1"'
        in log_of(d)
    )


def test_plaintext_client_and_stalled_handshake_on_the_tls_listener(daemon, tls_cluster, tmp_path):
    from confluent_kafka.admin import AdminClient

    d = start(daemon, tmp_path, tls_cluster, broker_ports="handshake_timeout_ms = 500\nbroker_ports")
    host, port = bootstrap_of(d)
    with pytest.raises(Exception):
        AdminClient({"bootstrap.servers": f"{host}:{port}"}).list_topics(timeout=3)
    assert wait_for(lambda: d.metric("mskdns_proxy_tls_errors_total", side="client", kind="plaintext") >= 1)
    assert "a plaintext Kafka request on a TLS listener" in log_of(d)

    # A client that connects and says nothing is let go after handshake_timeout_ms.
    with socket.create_connection((host, port), timeout=5) as s:
        started = time.monotonic()
        assert s.recv(10) == b""
        assert time.monotonic() - started < 3
    assert wait_for(lambda: d.metric("mskdns_proxy_connections_active") == 0, timeout=5)
    assert d.metric("mskdns_proxy_tls_errors_total", side="client", kind="handshake") >= 1


def test_a_renewed_certificate_is_used_without_a_restart(daemon, tls_cluster, tmp_path):
    d = start(daemon, tmp_path, tls_cluster)
    host, port = bootstrap_of(d)
    before = peer_certificate(host, port, tls_cluster.ca.file)["serialNumber"]
    # A new certificate and key written over the files the config names.
    tls_cluster.ca.issue("proxy", ips=[ADVERTISE])
    assert wait_for(lambda: peer_certificate(host, port, tls_cluster.ca.file)["serialNumber"] != before, timeout=20)
    assert "TLS certificate reloaded" in log_of(d)

    # A broken pair is reported and the renewed certificate stays in use.
    serving = peer_certificate(host, port, tls_cluster.ca.file)["serialNumber"]
    (tls_cluster.ca.dir / "proxy-key.pem").write_text("garbage\n")
    assert wait_for(lambda: d.metric("mskdns_proxy_tls_reload_errors_total") >= 1, timeout=20)
    assert peer_certificate(host, port, tls_cluster.ca.file)["serialNumber"] == serving
    assert "proxies[0].tls_key" in log_of(d)


def test_check_names_a_tls_key_that_does_not_load(tmp_path, tls_cluster):
    first, last = port_range()
    config = tmp_path / "bad.toml"
    config.write_text(proxy_config(tmp_path, tls_cluster, first, last))
    assert subprocess.run([str(BIN), "check", str(config)], capture_output=True).returncode == 0
    (tls_cluster.ca.dir / "proxy-key.pem").write_text("not a key\n")
    r = subprocess.run([str(BIN), "check", str(config)], capture_output=True, text=True)
    assert r.returncode != 0
    assert "proxies[0].tls_key" in r.stderr, r.stderr


def test_brokers_that_require_a_client_certificate_get_the_proxys(daemon, tls_cluster, tmp_path):
    from confluent_kafka.admin import AdminClient

    # A second broker, behind a haproxy that insists on a client certificate from the test CA.
    (tmp_path / "strict").mkdir()
    strict = TlsTansu(tmp_path / "strict", tls_cluster.ca, client_certs=True)
    try:
        tls_cluster.upstream = f"localhost:{strict.port}"
        d = start(daemon, tmp_path, tls_cluster)
        client = {"bootstrap.servers": "%s:%d" % bootstrap_of(d), **tls_cluster.confluent}
        refused = AdminClient(client)
        with pytest.raises(Exception):
            refused.list_topics(timeout=5)
        del refused  # destroyed now: it must not retry into the next daemon
        # TLS 1.3: the broker's demand shows after the handshake, as an alert.
        assert wait_for(lambda: d.metric("mskdns_proxy_tls_errors_total", kind="session") >= 1)
        assert "connection closed: TLS: received fatal alert: CertificateRequired" in log_of(d)
        d.stop()

        cert, key, _ = tls_cluster.ca.issue("proxy-client", client=True)
        d = start(
            daemon,
            tmp_path,
            tls_cluster,
            upstream_ca_file=f'upstream_tls_cert = "{cert}"\nupstream_tls_key = "{key}"\nupstream_ca_file',
        )
        md = AdminClient({**client, "bootstrap.servers": "%s:%d" % bootstrap_of(d)}).list_topics(timeout=10)
        assert md.brokers and all(b.host == ADVERTISE for b in md.brokers.values())
        tls_lines = [line for line in log_of(d).splitlines() if "TLS" in line]
        assert d.metric("mskdns_proxy_tls_errors_total", kind="session") == 0, tls_lines
        assert not any("CertificateRequired" in line for line in tls_lines), tls_lines
    finally:
        strict.stop()
