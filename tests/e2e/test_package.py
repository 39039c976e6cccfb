"""The Debian package: built by cargo-deb from the binary the tests use, installed with dpkg, its
default configuration checked by the installed binary, its units verified by systemd-analyze, the
installed binary started as its units start it (the socket passed, here by systemd-socket-activate
on a test port) and answering, then removed."""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import dns.message
import dns.query

from conftest import BIN, free_port, require

ROOT = Path(__file__).resolve().parents[2]


def run(*argv, **kw):
    r = subprocess.run(argv, capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{argv}: {r.stdout}{r.stderr}"
    return r.stdout + r.stderr


def test_the_package_builds_installs_serves_and_removes(tmp_path):
    require("cargo-deb")
    require("dpkg")
    activate = require("systemd-socket-activate")
    analyze = require("systemd-analyze")
    if Path("/usr/bin/mskdns").exists() and subprocess.run(["dpkg", "-s", "mskdns"], capture_output=True).returncode != 0:
        raise AssertionError("/usr/bin/mskdns exists and is not the package's: not overwriting it")
    deb = tmp_path / "mskdns.deb"
    # The binary under test (a dev build: cargo-deb warns that it packages releases; the package's
    # layout is what is tested here). --no-build: it is built already, in the target directory.
    target = BIN.parent.parent
    run("cargo", "deb", "--profile", "dev", "--no-build", "--fast", "-o", str(deb), cwd=ROOT,
        env={**os.environ, "CARGO_TARGET_DIR": str(target)})
    listing = run("dpkg-deb", "-c", str(deb))
    for path in ("./usr/bin/mskdns", "./etc/mskdns/mskdns.toml", "./usr/lib/systemd/system/mskdns.service",
                 "./usr/lib/systemd/system/mskdns.socket", "./usr/share/doc/mskdns/examples/two-clusters.toml"):
        assert path in listing, f"{path} not in the package:\n{listing}"
    assert "/etc/mskdns/mskdns.toml" in run("dpkg-deb", "-I", str(deb), "conffiles")
    units = ["/usr/lib/systemd/system/mskdns.socket", "/usr/lib/systemd/system/mskdns.service"]
    run("dpkg", "-i", str(deb))
    try:
        assert "ok" in run("/usr/bin/mskdns", "check", "/etc/mskdns/mskdns.toml")
        out = run(analyze, "verify", *units)
        assert "mskdns." not in out, out
        # ExecStart as the unit gives it, its socket passed; the default config's addresses moved
        # to a test port (the unit's are 0.0.0.0:53).
        service = Path(units[1]).read_text()
        exec_start = next(line.split("=", 1)[1] for line in service.splitlines() if line.startswith("ExecStart="))
        argv = exec_start.split()
        assert argv[0] == "/usr/bin/mskdns" and argv[-1] == "/etc/mskdns/mskdns.toml", argv
        port = free_port()
        cfg = tmp_path / "mskdns.toml"
        cfg.write_text(Path("/etc/mskdns/mskdns.toml").read_text()
                       .replace('listen = ["0.0.0.0:53"]', f'listen = ["127.0.0.1:{port}"]\nupstreams = ["127.0.0.1:9"]')
                       .replace('listen = "127.0.0.1:9153"', 'listen = "127.0.0.1:0"')
                       + '\n[[clusters]]\nbootstrap = "boot-abcd1234.c2.kafka-serverless.us-east-1.amazonaws.com"\naddresses = ["10.1.0.10"]\n')
        proc = subprocess.Popen(
            [activate, "--datagram", "-l", f"127.0.0.1:{port}", *argv[:-1], str(cfg)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "AWS_EC2_METADATA_DISABLED": "true"},
        )
        try:
            time.sleep(0.5)
            q = dns.message.make_query("boot-abcd1234.c2.kafka-serverless.us-east-1.amazonaws.com", "A")
            r = dns.query.udp(q, "127.0.0.1", port=port, timeout=15)
            assert [x.address for x in r.answer[0]] == ["10.1.0.10"]
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
    finally:
        run("dpkg", "-r", "mskdns")
    assert not Path("/usr/bin/mskdns").exists()
    assert not Path(units[1]).exists()
    # The conffile stays until purged, as Debian keeps configuration.
    run("dpkg", "-P", "mskdns")
    assert not Path("/etc/mskdns/mskdns.toml").exists()
    shutil.rmtree("/etc/mskdns", ignore_errors=True)
