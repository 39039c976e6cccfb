"""Fixtures for end-to-end tests: the real mskdns binary on port 0, a real nsd upstream."""
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("MSKDNS_BIN", ROOT / "target" / "debug" / "mskdns"))


def require(tool):
    """A missing tool is a failure, never a silent skip: tests/run.sh installs them."""
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed (tests/run.sh installs it)")
    return path


def recv_exact(sock, n):
    """Exactly `n` bytes from `sock`; EOFError when it closes first."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError("closed")
        data += chunk
    return data


def free_port():
    """A port free for both UDP and TCP on 127.0.0.1, for servers that cannot bind port 0."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port")


class Daemon:
    """mskdns started from a TOML config; reads the bound addresses it prints on stdout."""

    def __init__(self, config_text, tmp_path, env=None, name="mskdns.toml", preexec_fn=None, wrap=None, pass_fds=()):
        assert BIN.exists(), f"{BIN} is missing: build with cargo build first"
        self.config = tmp_path / name
        self.config.write_text(config_text)
        self.log = open(tmp_path / (name.removesuffix(".toml") + ".log"), "w+")
        argv = [str(BIN), "--config", str(self.config)]
        self.proc = subprocess.Popen(
            wrap(argv) if wrap else argv,
            pass_fds=pass_fds,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            # Never the instance metadata service: tests talk to loopback only.
            env={**os.environ, "RUST_LOG": "mskdns=debug", "AWS_EC2_METADATA_DISABLED": "true", **(env or {})},
            preexec_fn=preexec_fn,
        )
        self.dns = []
        self.dot = []
        self.doh = []
        self.proxies = []
        self.admin = None
        deadline = time.time() + 30
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                self.log.seek(0)
                raise RuntimeError(f"mskdns exited early: {self.log.read()}")
            words = line.split()
            if words[:2] == ["listening", "dns"]:
                host, port = words[2].rsplit(":", 1)
                self.dns.append((host.strip("[]"), int(port)))
            elif words[:2] in (["listening", "dot"], ["listening", "doh"]):
                host, port = words[2].rsplit(":", 1)
                getattr(self, words[1]).append((host.strip("[]"), int(port)))
            elif words[:2] == ["listening", "proxy"]:
                host, port = words[2].rsplit(":", 1)
                self.proxies.append((host.strip("[]"), int(port)))
            elif words[:2] == ["listening", "admin"]:
                host, port = words[2].rsplit(":", 1)
                self.admin = (host, int(port))
            elif line.strip() == "ready":
                break
        else:
            raise RuntimeError("mskdns did not become ready")

    @property
    def host(self):
        return self.dns[0][0]

    @property
    def port(self):
        return self.dns[0][1]

    def http(self, path):
        try:
            with urllib.request.urlopen(f"http://{self.admin[0]}:{self.admin[1]}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metric(self, name, **labels):
        """Sum of a metric's samples whose labels include `labels`."""
        _, text = self.http("/metrics")
        total = 0.0
        for line in text.splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            series, value = line.rsplit(" ", 1)
            metric, _, rest = series.partition("{")
            if metric != name:
                continue
            if all(f'{k}="{v}"' in rest for k, v in labels.items()):
                total += float(value)
        return total

    def log_text(self):
        """What the daemon wrote to stderr so far."""
        with open(self.log.name) as f:
            return f.read()

    def alive(self):
        return self.proc.poll() is None

    def assert_stops_at_once(self, within=5):
        """SIGTERM ends it cleanly within `within` seconds, waiting for no task to its grace period's end
        (a hung AWS call, say)."""
        started = time.monotonic()
        assert self.stop() == 0
        assert time.monotonic() - started < within
        assert "still running at the end of the shutdown grace period" not in self.log_text()

    def stop(self):
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise
        return self.proc.returncode


@pytest.fixture
def daemon(tmp_path):
    started = []

    def start(config_text, **kw):
        d = Daemon(config_text, tmp_path, **kw)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


NSD_ZONE = """$ORIGIN example.test.
$TTL 300
@       IN SOA ns.example.test. hostmaster.example.test. 1 3600 600 86400 30
@       IN NS ns
ns      IN A 192.0.2.1
www     IN A 192.0.2.10
www     IN AAAA 2001:db8::10
short   60 IN A 192.0.2.11
quick   2 IN A 192.0.2.12
warm    10 IN A 192.0.2.13
big     IN TXT "{txt}"
""".replace("{txt}", "x" * 200)
NSD_ZONE += "".join(f'big IN TXT "record-{i:02d}-{"y" * 180}"\n' for i in range(12))


class Nsd:
    """A real authoritative server (nsd) for one zone on a loopback port."""

    def __init__(self, tmp_path, zone="example.test", text=NSD_ZONE, probe="ns.example.test."):
        require("nsd")
        self.dir = tmp_path / f"nsd-{zone}"
        self.dir.mkdir()
        self.port = free_port()
        self.probe = probe
        (self.dir / "zone").write_text(text)
        (self.dir / "nsd.conf").write_text(f"""server:
  ip-address: 127.0.0.1@{self.port}
  zonesdir: "{self.dir}"
  username: ""
  pidfile: "{self.dir}/nsd.pid"
  database: ""
  zonelistfile: "{self.dir}/zone.list"
  xfrdfile: "{self.dir}/xfrd.state"
  server-count: 1
  verbosity: 1
remote-control:
  control-enable: no
zone:
  name: {zone}
  zonefile: zone
""")
        self.start()

    def start(self):
        """Starts nsd (again) on the same port."""
        self.proc = subprocess.Popen(
            ["nsd", "-d", "-c", str(self.dir / "nsd.conf")],
            stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "nsd.log", "a"),
        )
        self.wait_ready()

    def wait_ready(self):
        import dns.message
        import dns.query

        deadline = time.time() + 15
        while time.time() < deadline:
            try:
                dns.query.udp(dns.message.make_query(self.probe, "A"), "127.0.0.1", port=self.port, timeout=0.5)
                return
            except Exception:
                if self.proc.poll() is not None:
                    raise RuntimeError((self.dir / "nsd.log").read_text())
                time.sleep(0.1)
        raise RuntimeError("nsd did not start")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@pytest.fixture
def nsd(tmp_path):
    n = Nsd(tmp_path)
    yield n
    n.stop()


class Moto:
    """A real AWS API emulator (moto server) on a loopback port, and a boto3 EC2 client for it."""

    def __init__(self, tmp_path):
        import boto3

        require("moto_server")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp_path / "moto.log", "w")
        self.proc = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(self.port)], stdout=self.log, stderr=self.log)
        self.ec2 = boto3.client(
            "ec2", region_name="us-east-1", endpoint_url=self.url, aws_access_key_id="test", aws_secret_access_key="test"
        )
        deadline = time.time() + 30
        while True:
            try:
                self.ec2.describe_vpcs()
                break
            except Exception:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("moto_server did not start")
                time.sleep(0.2)

    @property
    def env(self):
        """What the daemon needs to talk to this moto (and never to a real AWS endpoint)."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@pytest.fixture
def moto(tmp_path):
    m = Moto(tmp_path)
    yield m
    m.stop()


def fix_timestamps(body):
    """moto writes MSK timestamps without a UTC offset (`2026-11-23T17:21:32.530872`), which
    the API never does and the Rust SDK rightly rejects: add the `Z` the real API sends."""
    import re

    return re.sub(rb'("creationTime": "[0-9T:.-]+)"', rb'\1Z"', body)


class MskFront:
    """The MSK endpoint the daemon talks to: every call is relayed to moto unchanged, except
    GetBootstrapBrokers, which moto does not implement: it answers that one from `bootstrap`
    (cluster ARN -> broker string), as MSK would once the test has registered the names.
    The only fake in the discovery tests, and only for what no emulator here provides."""

    def __init__(self, moto):
        import http.server
        import threading
        import urllib.parse

        self.moto = moto
        self.bootstrap = {}
        self.calls = []
        self.auth = []
        # Every call as (access key id, service, method, path, status): who asked what.
        self.log = []
        # Services (as the signature names them: "kafka", "ec2", "s3") whose calls are taken and
        # never answered while listed: an endpoint that stalls.
        self.stall = set()
        self.closing = False
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def relay(self):
                import re

                path = urllib.parse.unquote(self.path.split("?")[0])
                front.calls.append((self.command, path))
                auth = self.headers.get("Authorization", "")
                front.auth.append((path, auth))
                m = re.search(r"Credential=([^/]+)/[^/]+/[^/]+/([^/]+)/", auth)
                self.caller = (m.group(1), m.group(2)) if m else ("", "")
                if self.caller[1] in front.stall:
                    front.log.append((*self.caller, self.command, path, "stalled"))
                    while self.caller[1] in front.stall and not front.closing:
                        time.sleep(0.05)
                    self.close_connection = True
                    return
                if self.command == "GET" and path.startswith("/v1/clusters/") and path.endswith("/bootstrap-brokers"):
                    arn = path[len("/v1/clusters/"):-len("/bootstrap-brokers")]
                    return self.bootstrap_brokers(arn)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length", "expect")}
                req = urllib.request.Request(front.moto.url + self.path, data=body or None, headers=headers, method=self.command)
                try:
                    with urllib.request.urlopen(req, timeout=10) as r:
                        self.reply(r.status, fix_timestamps(r.read()), r.headers.get("Content-Type"), passed=r.headers)
                except urllib.error.HTTPError as e:
                    self.reply(e.code, e.read(), e.headers.get("Content-Type"), passed=e.headers)
                except OSError:
                    # moto is down: drop the connection, as an unreachable endpoint would.
                    self.close_connection = True

            def bootstrap_brokers(self, arn):
                import json

                if arn not in front.bootstrap:
                    body = {"message": f"cluster {arn} not found"}
                    return self.reply(404, json.dumps(body).encode(), "application/json", "NotFoundException")
                answer = front.bootstrap[arn]
                if isinstance(answer, str):
                    kind = "bootstrapBrokerStringSaslIam" if ".kafka-serverless." in answer else "bootstrapBrokerStringTls"
                    answer = {kind: answer}
                self.reply(200, json.dumps(answer).encode(), "application/json")

            def reply(self, status, body, ctype, error_type=None, passed=None):
                front.log.append((*self.caller, self.command, urllib.parse.unquote(self.path.split("?")[0]), status))
                self.send_response(status)
                self.send_header("Content-Type", ctype or "application/json")
                self.send_header("Content-Length", str(len(body)))
                if error_type:
                    self.send_header("x-amzn-ErrorType", error_type)
                # What S3 clients read from the headers (the ETag of a GET, a PUT, a 304).
                for k, v in (passed or {}).items():
                    if k.lower() == "etag" or k.lower() == "last-modified" or k.lower().startswith("x-amz"):
                        self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD" and status != 304:
                    self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = relay

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def env(self):
        return {**self.moto.env, "AWS_ENDPOINT_URL_KAFKA": self.url}

    def stop(self):
        self.closing = True
        self.server.shutdown()
        self.server.server_close()


def relay(sock, upstream_port, delay=0.0, seen=None):
    """Answers what arrives on `sock` by asking 127.0.0.1:upstream_port after `delay` seconds
    (each datagram in its own thread, so they overlap); records queries in `seen`. Stops when
    `sock` is closed or idle for 10 s."""
    import threading

    def forward(data, peer):
        time.sleep(delay)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as up:
            up.settimeout(2)
            up.sendto(data, ("127.0.0.1", upstream_port))
            try:
                sock.sendto(up.recv(4096), peer)
            except OSError:
                pass  # the test is over and closed the socket

    def serve():
        sock.settimeout(10)
        while True:
            try:
                data, peer = sock.recvfrom(4096)
            except OSError:
                return
            if seen is not None:
                seen.append(data)
            threading.Thread(target=forward, args=(data, peer), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()


def wait_for(predicate, timeout=10, interval=0.1):
    """Polls until predicate() is truthy; returns its last value."""
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value or time.time() > deadline:
            return value
        time.sleep(interval)


class ClientHost:
    """A client host for the tests: a network namespace the test creates, joined to this one by a
    veth pair (this side `host_ip` and the spare `host_ips`, its side `ip`), whose /etc/resolv.conf
    names `nameserver` (default `host_ip`; `resolvers` sets several, asked in turn).
    Programs run in it with `ip netns exec`, which mounts /etc/netns/<name>/resolv.conf over
    /etc/resolv.conf: they resolve through the system resolver, as on a user's host."""

    def __init__(self, nameserver=None):
        import random
        import uuid

        require("ip")
        tag = uuid.uuid4().hex[:6]
        self.name = f"mskdns-{tag}"
        octet = random.randrange(1, 250)
        net = f"10.213.{octet}"
        self.host_ip, self.ip = f"{net}.1", f"{net}.2"
        self.host_ips = [f"{net}.3", f"{net}.4"]
        here, there = f"mk{tag}h", f"mk{tag}n"
        self.etc = Path("/etc/netns") / self.name
        self.etc.mkdir(parents=True)
        self.resolvers([nameserver or self.host_ip])
        for argv in (
            ["ip", "netns", "add", self.name],
            ["ip", "link", "add", here, "type", "veth", "peer", "name", there],
            ["ip", "link", "set", there, "netns", self.name],
            *(["ip", "addr", "add", f"{a}/29", "dev", here] for a in [self.host_ip, *self.host_ips]),
            ["ip", "link", "set", here, "up"],
            ["ip", "-n", self.name, "addr", "add", f"{self.ip}/29", "dev", there],
            ["ip", "-n", self.name, "link", "set", there, "up"],
            ["ip", "-n", self.name, "link", "set", "lo", "up"],
        ):
            subprocess.run(argv, check=True, capture_output=True)

    def resolvers(self, addresses):
        """The host's /etc/resolv.conf: these name servers, in turn (`rotate`)."""
        lines = [f"nameserver {a}" for a in addresses] + ["options timeout:2 attempts:2 rotate"]
        (self.etc / "resolv.conf").write_text("\n".join(lines) + "\n")

    def run(self, argv, timeout=180):
        """Runs argv on the client host; returns the CompletedProcess (text)."""
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *map(str, argv)], capture_output=True, text=True, timeout=timeout
        )

    def stop(self):
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        shutil.rmtree(self.etc, ignore_errors=True)


@pytest.fixture
def client_host():
    h = ClientHost()
    yield h
    h.stop()
