#!/usr/bin/env bash
# Measurements the shared harness cannot make cleanly, on its workload files:
#  1. miss: every query forwarded, against nsd with response rate limiting off (the harness's nsd
#     limits to 200 answers/s per source), for unbound really forwarding (local-zone "test."
#     nodefault: unbound otherwise answers test. names itself) and mskdns;
#  2. RSS after that miss workload filled each cache;
#  3. multi-core: mskdns on CPU 1 only vs on both CPUs (dnsperf always on CPU 0).
# usage: benches/extra.sh [seconds]   (run ../shared/bench/run.sh once first: it writes the workload)
set -u
SECS=${1:-10}; W=${BENCH_WORK:-/tmp/bench}; PORT=15353; UP=15300
BIN=${MSKDNS_BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/release/mskdns}
[ -f "$W/miss.txt" ] && [ -f "$W/mskdns.toml" ] || { echo "run ../shared/bench/run.sh first" >&2; exit 1; }
sed 's/^server:$/server:\n  rrl-ratelimit: 0/' "$W/nsd.conf" > "$W/nsd-norrl.conf"
nsd -c "$W/nsd-norrl.conf" -P "$W/nsd.pid"; sleep 1
sed 's/^server:$/server:\n local-zone: "test." nodefault/' "$W/unbound.conf" > "$W/unbound-fwd.conf"
run() { # $1 name, $2 query file -> qps, loss, CPU us/query at 20k qps
  local pid; pid=$(cat "$W/server.pid")
  taskset -c 0 dnsperf -s 127.0.0.1 -p $PORT -d "$2" -l "$SECS" -c 8 -q 200 -t 2 2>&1 |
    awk -v n="$1" '/Queries per second/{q=$4} /Queries lost/{l=$3} END{printf "%-28s %8.0f qps  lost %s", n, q, l}'
  local t0 t1; t0=$(awk '{print $14+$15}' "/proc/$pid/stat")
  local done; done=$(taskset -c 0 dnsperf -s 127.0.0.1 -p $PORT -d "$2" -l "$SECS" -c 8 -q 200 -t 2 -Q 20000 2>&1 | awk '/Queries completed/{print $3}')
  t1=$(awk '{print $14+$15}' "/proc/$pid/stat")
  awk -v a="$t0" -v b="$t1" -v n="$done" -v k="$(getconf CLK_TCK)" 'BEGIN{printf "  cpu %.2f us/query", (b-a)/k*1e6/n}'
  printf "  rss %s MiB\n" "$(awk '/VmRSS/{printf "%.1f", $2/1024}' "/proc/$pid/status")"
}
stop() { kill "$(cat "$W/server.pid")"; wait "$(cat "$W/server.pid")" 2>/dev/null; sleep 1; }
taskset -c 1 unbound -d -c "$W/unbound-fwd.conf" >/dev/null 2>&1 & echo $! > "$W/server.pid"; sleep 2
run "unbound (forwarding) miss" "$W/miss.txt"; stop
taskset -c 1 "$BIN" --config "$W/mskdns.toml" >/dev/null 2>&1 & echo $! > "$W/server.pid"; sleep 2
run "mskdns miss" "$W/miss.txt"; stop
taskset -c 1 "$BIN" --config "$W/mskdns.toml" >/dev/null 2>&1 & echo $! > "$W/server.pid"; sleep 2
run "mskdns msk, CPU 1" "$W/msk.txt"; stop
"$BIN" --config "$W/mskdns.toml" >/dev/null 2>&1 & echo $! > "$W/server.pid"; sleep 2
run "mskdns msk, CPUs 0+1" "$W/msk.txt"; stop
kill "$(cat "$W/nsd.pid")" 2>/dev/null; true
