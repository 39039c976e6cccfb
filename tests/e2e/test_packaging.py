"""The packaging files pass the validators that run here."""
import glob
import socket
import subprocess

from conftest import BIN, ROOT, require


def run(*cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{cmd}: {r.stdout}{r.stderr}"
    return r.stdout + r.stderr


def test_systemd_unit_verifies(tmp_path):
    # verify checks that ExecStart exists: point it at the binary just built.
    unit = (ROOT / "packaging/systemd/mskdns.service").read_text().replace("/usr/bin/mskdns", str(BIN))
    (tmp_path / "mskdns.service").write_text(unit)
    (tmp_path / "mskdns.socket").write_text((ROOT / "packaging/systemd/mskdns.socket").read_text())
    out = run(require("systemd-analyze"), "verify", str(tmp_path / "mskdns.socket"), str(tmp_path / "mskdns.service"))
    assert "mskdns.service" not in out and "mskdns.socket" not in out, out  # any finding names the unit
    assert "DynamicUser=yes" in unit and "CapabilityBoundingSet=CAP_NET_BIND_SERVICE" in unit


def test_cloudformation_lints():
    run(require("cfn-lint"), str(ROOT / "packaging/cloudformation/mskdns.yaml"))


def test_kubernetes_manifests_validate():
    files = sorted(glob.glob(str(ROOT / "packaging/kubernetes/*.yaml")))
    assert len(files) == 2
    out = run(require("kubernetes-validate"), "--strict", *files)
    assert out.count("passed") == 4, out


def test_readiness_is_signalled_to_systemd(daemon, tmp_path, nsd):
    """Type=notify: with NOTIFY_SOCKET set, mskdns sends READY=1 once its sockets are bound."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    d = daemon(f"""
[dns]
listen = ["127.0.0.1:0"]
upstreams = ["127.0.0.1:{nsd.port}"]
[admin]
listen = "127.0.0.1:0"
""", env={"NOTIFY_SOCKET": path})
    assert b"READY=1" in sock.recv(4096)
    assert d.alive()
