#!/usr/bin/env bash
# Soak: dnsperf at a fixed rate (default half the measured max) for a long time against the
# release binary, sampling the server's RSS and the queries lost; memory should stay flat and
# nothing should be lost. Uses the shared harness's workload (run ../shared/bench/run.sh once).
# usage: benches/soak.sh [seconds=600] [qps=75000] [workload file=mix]
set -u
SECS=${1:-600}; RATE=${2:-75000}; W=${BENCH_WORK:-/tmp/bench}; PORT=15353
BIN=${MSKDNS_BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/release/mskdns}
[ -f "$W/mskdns.toml" ] || { echo "run ../shared/bench/run.sh first" >&2; exit 1; }
sed 's/^server:$/server:\n  rrl-ratelimit: 0/' "$W/nsd.conf" > "$W/nsd-norrl.conf"
nsd -c "$W/nsd-norrl.conf" -P "$W/nsd.pid"; sleep 1
# A mix: cluster names, cached forwarded names, and one new name in twenty (a cache miss).
paste -d '\n' "$W/msk.txt" "$W/fwd.txt" | head -180000 > "$W/soak.txt"
awk 'NR % 20 == 0' "$W/miss.txt" | head -20000 >> "$W/soak.txt"
shuf -o "$W/soak.txt" "$W/soak.txt"
taskset -c 1 "$BIN" --config "$W/mskdns.toml" >"$W/soak-server.log" 2>&1 & pid=$!; sleep 2
taskset -c 0 dnsperf -s 127.0.0.1 -p $PORT -d "$W/soak.txt" -l "$SECS" -c 8 -q 500 -t 2 -Q "$RATE" >"$W/soak-dnsperf.txt" 2>&1 & load=$!
echo "second rss_mib"
start=$(date +%s)
while kill -0 $load 2>/dev/null; do
  echo "$(( $(date +%s) - start )) $(awk '/VmRSS/{printf "%.1f", $2/1024}' /proc/$pid/status)"
  sleep 30
done
grep -E "Queries (sent|completed|lost)|Queries per second|Average Latency" "$W/soak-dnsperf.txt"
curl -s "http://127.0.0.1:9153/metrics" | grep -E '^mskdns_responses_total|^mskdns_cache_entries' | grep -v ' 0$'
kill $pid; kill "$(cat "$W/nsd.pid")" 2>/dev/null; true
