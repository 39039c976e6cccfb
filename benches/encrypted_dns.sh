#!/usr/bin/env bash
# DoT and DoH throughput and CPU per query: mskdns against unbound (built with nghttp2), dnsdist and
# knot-resolver, in one run, with the shared harness's workloads (msk: cluster names, fwd: forwarded names cached).
# As in ../shared/bench/run.sh: the server pinned to CPU 1, dnsperf (-m dot / -m doh) to CPU 0, nsd
# as the upstream on loopback; max qps, then the server's CPU µs/query at a fixed RATE.
# A self-signed certificate made for the run (dnsperf does not verify it).
# usage: benches/encrypted_dns.sh [seconds] [server...]   (servers: unbound dnsdist kresd project
#        project-nagle; project-nagle is mskdns with dns.tcp_nodelay = false, as unbound's TCP and DoT)
# env: MSKDNS_BIN (default target/release/mskdns), RATE (default 10000), MODES (default "dot doh")
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED:-$ROOT/../shared/bench}
W=${BENCH_WORK:-/tmp/bench-enc}; SECS=${1:-10}; shift || true
SERVERS=${*:-unbound dnsdist kresd project project-nagle}
MODES=${MODES:-dot doh}
need="dnsperf:dnsperf nsd:nsd unbound:unbound dnsdist:dnsdist kresd:knot-resolver dig:bind9-dnsutils kdig:knot-dnsutils openssl:openssl"
missing=$(for p in $need; do command -v "${p%%:*}" >/dev/null || echo "${p#*:}"; done)
if [ -n "$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null || { echo "install failed: $missing" >&2; exit 1; }; fi
mkdir -p "$W"; [ -f "$W/msk.txt" ] || python3 "$SHARED/gen.py" "$W" >/dev/null
awk '{print $2, $1}' "$W/msk-records.txt" > "$W/hosts"
PORT=15353; DOT=15853; DOH=15443; UP=15300; RATE=${RATE:-10000}
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=localhost \
  -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -keyout "$W/key.pem" -out "$W/cert.pem" 2>/dev/null
cat > "$W/nsd.conf" <<C
server:
  ip-address: 127.0.0.1@$UP
  rrl-ratelimit: 0
  zonesdir: "$W"
  username: ""
  pidfile: "$W/nsd.pid"
  database: ""
  zonelistfile: "$W/zone.list"
  xfrdfile: "$W/xfrd.state"
  server-count: 1
remote-control:
  control-enable: no
zone:
  name: bench.test
  zonefile: bench.test.zone
C
nsd -c "$W/nsd.conf" -P "$W/nsd.pid" 2>/dev/null; sleep 1
start() {
  for p in $PORT $DOT $DOH; do
    if ss -Hltn "sport = :$p" | grep -q .; then echo "port $p is busy: stop what holds it first" >&2; exit 1; fi
  done
  case $1 in
  unbound)
    { printf 'server:\n interface: 127.0.0.1@%s\n interface: 127.0.0.1@%s\n interface: 127.0.0.1@%s\n' $PORT $DOT $DOH
      printf ' tls-port: %s\n https-port: %s\n tls-service-key: "%s"\n tls-service-pem: "%s"\n' $DOT $DOH "$W/key.pem" "$W/cert.pem"
      printf ' num-threads: 1\n do-not-query-localhost: no\n chroot: ""\n username: ""\n use-syslog: no\n pidfile: ""\n'
      printf ' access-control: 127.0.0.0/8 allow\n local-zone: "test." nodefault\n msg-cache-size: 64m\n rrset-cache-size: 128m\n'
      printf ' incoming-num-tcp: 1000\n'
      awk '{printf " local-data: \"%s 300 IN A %s\"\n", $1, $2}' "$W/msk-records.txt"
      printf 'forward-zone:\n name: "bench.test."\n forward-addr: 127.0.0.1@%s\n' $UP
      printf 'server:\n domain-insecure: "bench.test."\n'
    } > "$W/unbound.conf"
    taskset -c 1 unbound -d -c "$W/unbound.conf" >"$W/unbound.log" 2>&1 & ;;
  dnsdist)
    { echo "setLocal('127.0.0.1:$PORT')"; echo "setACL({'127.0.0.0/8'})"
      echo "addTLSLocal('127.0.0.1:$DOT', '$W/cert.pem', '$W/key.pem')"
      echo "addDOHLocal('127.0.0.1:$DOH', '$W/cert.pem', '$W/key.pem', '/dns-query')"
      echo "newServer({address='127.0.0.1:$UP'})"
      echo "getPool(''):setCache(newPacketCache(100000))"
      python3 - "$W/clusters.json" <<'P'
import json,sys
for c in json.load(open(sys.argv[1])):
    ips=",".join(f'"{i}"' for i in c["ips"])
    print(f'addAction(RegexRule("^(boot|b[0-9]+)-{c["id"]}\\\\.{c["shard"]}\\\\.kafka-serverless\\\\.{c["region"]}\\\\.amazonaws\\\\.com$"), SpoofAction({{{ips}}}))')
P
    } > "$W/dnsdist.conf"
    taskset -c 1 dnsdist --supervised --disable-syslog -C "$W/dnsdist.conf" >"$W/dnsdist.log" 2>&1 & ;;
  kresd)
    mkdir -p "$W/kresd"
    cat > "$W/kresd.conf" <<C
net.listen('127.0.0.1', $PORT, { kind = 'dns' })
net.listen('127.0.0.1', $DOT, { kind = 'tls' })
net.listen('127.0.0.1', $DOH, { kind = 'doh2' })
net.tls('$W/cert.pem', '$W/key.pem')
modules.load('hints > iterate')
hints.add_hosts('$W/hosts')
policy.add(policy.suffix(policy.STUB({'127.0.0.1@$UP'}), {todname('bench.test.')}))
cache.size = 100 * MB
C
    taskset -c 1 kresd -n -c "$W/kresd.conf" "$W/kresd" >"$W/kresd.log" 2>&1 & ;;
  project|project-nagle)
    python3 - "$W/clusters.json" $PORT $UP $DOT $DOH "$W" "$1" > "$W/mskdns.toml" <<'P'
import json, sys
cs, port, up, dot, doh, w, which = json.load(open(sys.argv[1])), *sys.argv[2:]
print(f'[dns]\nlisten = ["127.0.0.1:{port}"]\nupstreams = ["127.0.0.1:{up}"]\nlisten_dot = ["127.0.0.1:{dot}"]')
print(f'tcp_nodelay = {"false" if which == "project-nagle" else "true"}')
print(f'listen_doh = ["127.0.0.1:{doh}"]\ntls_cert = "{w}/cert.pem"\ntls_key = "{w}/key.pem"\n')
for c in cs:
    ips = ", ".join(f'"{i}"' for i in c["ips"])
    print(f'[[clusters]]\nbootstrap = "boot-{c["id"]}.{c["shard"]}.kafka-serverless.{c["region"]}.amazonaws.com"\naddresses = [{ips}]\nttl = 300\n')
P
    taskset -c 1 "${MSKDNS_BIN:-$ROOT/target/release/mskdns}" --config "$W/mskdns.toml" >"$W/$1.log" 2>&1 & ;;
  esac
  echo $! > "$W/server.pid"; sleep 2
}
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
perf() { # $1 mode, $2 query file -> max qps, latency, loss; then CPU µs/query at ${RATE} qps
  local pid port; pid=$(cat "$W/server.pid"); port=$([ "$1" = dot ] && echo $DOT || echo $DOH)
  taskset -c 0 dnsperf -m "$1" -s 127.0.0.1 -p $port -d "$2" -l "$SECS" -c 8 -q 200 -t 2 2>&1 |
    awk '/Queries per second/{q=$4} /Average Latency/{l=$4} /Queries lost/{lost=$3" "$4} END{printf "%8.0f qps  avg %.6f s  lost %-12s", q, l, lost}'
  local t0 t1 tick sent; tick=$(getconf CLK_TCK); t0=$(cpu_ticks "$pid")
  out=$(taskset -c 0 dnsperf -m "$1" -s 127.0.0.1 -p $port -d "$2" -l "$SECS" -c 8 -q 200 -t 2 -Q "$RATE" 2>&1)
  t1=$(cpu_ticks "$pid")
  sent=$(echo "$out" | awk '/Queries completed/{print $3}'); lat=$(echo "$out" | awk '/Average Latency/{print $4; exit}')
  awk -v a="$t0" -v b="$t1" -v n="$sent" -v k="$tick" -v l="$lat" 'BEGIN{printf "  cpu %.2f us/query at fixed rate (avg %.3f ms)\n", (b-a)/k*1e6/n, l*1000}'
}
printf '%-8s %-4s %-4s %s\n' server mode load result
for s in $SERVERS; do
  start "$s"
  kdig -p $DOT @127.0.0.1 +tls +short "$(head -1 "$W/msk.txt" | cut -d' ' -f1)" | head -1 | sed "s/^/  check $s dot msk: /"
  kdig -p $DOH @127.0.0.1 +https +short h1.bench.test | head -1 | sed "s/^/  check $s doh fwd: /"
  for m in $MODES; do
    printf '%-8s %-4s %-4s %s\n' "$s" "$m" msk "$(perf "$m" "$W/msk.txt")"
    printf '%-8s %-4s %-4s %s\n' "$s" "$m" fwd "$(perf "$m" "$W/fwd.txt")"
  done
  kill "$(cat "$W/server.pid")" 2>/dev/null; wait "$(cat "$W/server.pid")" 2>/dev/null; sleep 1
done
kill "$(cat "$W/nsd.pid")" 2>/dev/null; true
